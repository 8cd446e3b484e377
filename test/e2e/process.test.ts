import { createInterface } from "node:readline";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import * as grpc from "@grpc/grpc-js";
import { afterEach, describe, expect, it } from "vitest";
import { IommufdClient } from "../../client/client.js";
import {
  type HealthCheckRequest,
  HealthCheckRequestSchema,
  type HealthCheckResponse,
  HealthCheckResponse_ServingStatus as ServingStatus,
  HealthCheckResponseSchema,
} from "../../gen/grpc/health/v1/health_pb.js";
import { IommuModel } from "../../gen/iommufd/v1/vm_pb.js";
import { type Exit, killServers, launch, runToExit } from "./server-process.js";

/** The server as `npm start` runs it: tsx, a real process, real signals. */

const EPHEMERAL = ["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"];

afterEach(killServers);

interface ServerProcess {
  child: ReturnType<typeof launch>["child"];
  exited: Promise<Exit>;
  /** Bound addresses, HOST:PORT, from the "listening" log line. */
  grpc: string;
  metrics: string;
}

/** Starts the server and waits for the pino line that names the bound addresses. */
async function startProcess(args: string[], env: NodeJS.ProcessEnv = {}): Promise<ServerProcess> {
  const { child, exited, stderr } = launch(args, env);
  const addresses = await new Promise<{ grpc: string; metrics: string }>((resolve, reject) => {
    createInterface({ input: child.stdout }).on("line", (line) => {
      let entry: { grpc?: unknown; metrics?: unknown };
      try {
        entry = JSON.parse(line);
      } catch {
        return;
      }
      if (typeof entry.grpc === "string" && typeof entry.metrics === "string") resolve({ grpc: entry.grpc, metrics: entry.metrics });
    });
    exited.then((exit) => reject(new Error(`server exited (${exit.code ?? exit.signal}) before listening:\n${stderr()}`)));
  });
  return { child, exited, ...addresses };
}

/** GET over HTTP; bounded so that a server that stops answering fails the test here, not by its timeout. */
function get(url: string): Promise<Response> {
  return fetch(url, { signal: AbortSignal.timeout(10_000) });
}

/** `promise`, or a failure naming `what` after a bound far above any normal wait. */
async function bounded<T>(promise: Promise<T>, what: string, ms = 30_000): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const expired = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`${what} within ${ms} ms`)), ms)));
  try {
    return await Promise.race([promise, expired]);
  } finally {
    clearTimeout(timer);
  }
}

function port(hostPort: string): number {
  return Number(hostPort.slice(hostPort.lastIndexOf(":") + 1));
}

/** A grpc.health.v1.Health/Watch stream and promises for the statuses it reports. */
function watchHealth(client: grpc.Client, service: string) {
  const call = client.makeServerStreamRequest(
    "/grpc.health.v1.Health/Watch",
    (request: HealthCheckRequest) => Buffer.from(toBinary(HealthCheckRequestSchema, request)),
    (bytes: Buffer) => fromBinary(HealthCheckResponseSchema, bytes),
    create(HealthCheckRequestSchema, { service }),
  );
  // Both listeners are attached now so that no update is missed.
  const reached = (status: ServingStatus) =>
    new Promise<void>((resolve, reject) => {
      call.on("data", (response: HealthCheckResponse) => response.status === status && resolve());
      call.once("error", reject);
    });
  return { serving: reached(ServingStatus.SERVING), notServing: reached(ServingStatus.NOT_SERVING), cancel: () => call.cancel() };
}

describe("server process", () => {
  it("names its bound addresses and serves /healthz and /metrics", async () => {
    const server = await startProcess(EPHEMERAL);
    expect(port(server.grpc)).toBeGreaterThan(0);
    expect(port(server.metrics)).toBeGreaterThan(0);

    const healthz = await get(`http://${server.metrics}/healthz`);
    expect(healthz.status).toBe(200);
    expect(await healthz.text()).toBe("ok\n");

    const metrics = await get(`http://${server.metrics}/metrics`);
    expect(metrics.status).toBe(200);
    expect(metrics.headers.get("content-type")).toMatch(/^text\/plain/);
    const body = await metrics.text();
    expect(body).toContain("# TYPE iommufd_vms gauge");
    expect(body).toContain("# TYPE iommufd_objects gauge");

    expect((await get(`http://${server.metrics}/nope`)).status).toBe(404);

    server.child.kill("SIGTERM");
    expect(await server.exited).toEqual({ code: 0, signal: null });
  });

  it(
    "on SIGTERM goes NOT_SERVING, completes every in-flight RPC and exits 0",
    async () => {
      // A drain timeout far beyond the test's needs: a forced shutdown would
      // fail the calls and hide what this test checks.
      const server = await startProcess([...EPHEMERAL, "--drain-timeout-ms", "600000"]);
      const client = new IommufdClient(server.grpc);
      const healthClient = new grpc.Client(server.grpc, grpc.credentials.createInsecure());
      try {
        await client.waitForReady();
        await client.createVm({ vmId: "drain", model: IommuModel.MOCK, guestMemoryBytes: 64n << 20n });
        const vm = client.vm("drain");
        // Open Watch streams are themselves in flight, so the drain cannot
        // finish before we have seen NOT_SERVING and cancelled them.
        const watches = ["", "iommufd.v1.IommufdService"].map((service) => watchHealth(healthClient, service));
        await Promise.all(watches.map((w) => w.serving));

        const chunk = Buffer.alloc(1 << 20, 0xa5);
        const calls: Promise<unknown>[] = [];
        for (let i = 0; i < 256; i++) {
          calls.push(vm.writeGuestMemory({ gpa: BigInt(i % 64) << 20n, data: chunk }));
          if (i % 4 === 0) calls.push(vm.getStats(), vm.readGuestMemory({ gpa: 0n, length: 4096 }));
        }
        let settled = 0;
        for (const call of calls) call.then(() => settled++, () => settled++);
        // One answer means the server is reading the calls' streams.
        await Promise.race(calls);
        server.child.kill("SIGTERM");
        const pendingAtSignal = calls.length - settled;

        await bounded(Promise.all(watches.map((w) => w.notServing)), "health did not go NOT_SERVING after SIGTERM");
        const healthz = await get(`http://${server.metrics}/healthz`);
        expect(healthz.status).toBe(503);
        for (const w of watches) w.cancel();

        const results = await Promise.allSettled(calls);
        expect(results.filter((r) => r.status === "rejected")).toEqual([]);
        expect(pendingAtSignal, "SIGTERM came after every call had finished: nothing was drained").toBeGreaterThan(0);
        expect(await server.exited).toEqual({ code: 0, signal: null });
      } finally {
        client.close();
        healthClient.close();
      }
    },
    120_000,
  );

  it("honours IOMMUFD_LISTEN and IOMMUFD_METRICS_LISTEN", async () => {
    const server = await startProcess([], { IOMMUFD_LISTEN: "127.0.0.1:0", IOMMUFD_METRICS_LISTEN: "127.0.0.1:0" });
    // Without the env vars it would bind the defaults, 50051 and 9464.
    expect(port(server.grpc)).not.toBe(50051);
    expect(port(server.metrics)).not.toBe(9464);
    expect((await get(`http://${server.metrics}/healthz`)).status).toBe(200);
    const client = new IommufdClient(server.grpc);
    try {
      const { vms } = await client.listVms({});
      expect(vms).toEqual([]);
    } finally {
      client.close();
    }
    server.child.kill("SIGTERM");
    expect(await server.exited).toEqual({ code: 0, signal: null });
  });

  it("validates the env vars, and flags take precedence over them", async () => {
    const bad = await runToExit([], { IOMMUFD_LISTEN: "nonsense", IOMMUFD_METRICS_LISTEN: "127.0.0.1:0" });
    expect(bad.code).toBe(2);
    expect(bad.stderr).toContain('"nonsense"');

    const server = await startProcess(EPHEMERAL, { IOMMUFD_LISTEN: "nonsense", IOMMUFD_METRICS_LISTEN: "nonsense" });
    server.child.kill("SIGTERM");
    expect(await server.exited).toEqual({ code: 0, signal: null });
  });

  it.each([
    ["a malformed --listen", ["--listen", "nonsense"]],
    ["a malformed --metrics-listen", ["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:99999"]],
    ["an unknown flag", ["--bogus"]],
  ])("exits 2 with usage on stderr for %s", async (_what, args) => {
    const r = await runToExit(args);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/^iommufd-service: /);
    expect(r.stderr).toContain("usage: iommufd-service");
    expect(r.stdout).toBe("");
  });

  it("prints usage on stdout and exits 0 for --help", async () => {
    const r = await runToExit(["--help"]);
    expect(r.code).toBe(0);
    expect(r.stdout).toContain("usage: iommufd-service");
    expect(r.stdout).toContain("--listen HOST:PORT");
    expect(r.stderr).toBe("");
  });
});
