/**
 * Raw garbage on the gRPC port (issue 6 item 5 and "Done when": malformed
 * frames and bodies written with node:http2 get errors, not a crash).
 *
 * The server runs as its own process (tsx server/main.ts, as `npm start`
 * runs it), so a crash shows as an exit, and its log is checked for
 * handler bugs at the end. Each case speaks HTTP/2 directly: malformed gRPC
 * length-prefixed frames, garbage protobuf bodies, wrong content types,
 * unknown paths and methods, oversize declared lengths, streams reset
 * midway, bad headers, other services, and non-HTTP/2 bytes. Every case
 * must get an error answer — an HTTP error status, or a grpc-status that is
 * not OK — and, per api.md ("No input may produce INTERNAL or UNKNOWN"),
 * never INTERNAL or UNKNOWN. Calls addressed to an IommufdService method are
 * failed RPCs of the API, so their status must also carry the ErrorInfo of
 * api.md Errors. At the end the process is still running, serves
 * Health/Check and real RPCs, and logged no error.
 */
import { type ChildProcessByStdio, spawn } from "node:child_process";
import * as http2 from "node:http2";
import * as net from "node:net";
import { join } from "node:path";
import { createInterface } from "node:readline";
import type { Readable } from "node:stream";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { anyUnpack } from "@bufbuild/protobuf/wkt";
import * as grpc from "@grpc/grpc-js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { IommufdClient, type RpcName } from "../../client/client.js";
import { ErrorInfoSchema, QuotaFailureSchema } from "../../gen/google/rpc/error_details_pb.js";
import { type Status, StatusSchema } from "../../gen/google/rpc/status_pb.js";
import { HealthCheckRequestSchema, HealthCheckResponse_ServingStatus, HealthCheckResponseSchema } from "../../gen/grpc/health/v1/health_pb.js";
import { IommufdService } from "../../gen/iommufd/v1/service_pb.js";
import { GetStatsResponseSchema, IommuModel } from "../../gen/iommufd/v1/vm_pb.js";
import { REPO_ROOT } from "./support.js";

const MAX_MESSAGE_BYTES = 65536;
/** Far above any normal answer: a server that stops answering fails the case here. */
const ANSWER_MS = 10_000;

// ---------------------------------------------------------------------------
// The server process

type Child = ChildProcessByStdio<null, Readable, Readable>;

let child: Child;
let exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
let address = "";
const logLines: string[] = [];
let stderr = "";
let client: IommufdClient;

beforeAll(async () => {
  child = spawn(
    join(REPO_ROOT, "node_modules/.bin/tsx"),
    [join(REPO_ROOT, "server/main.ts"), "--listen", "127.0.0.1:0", "--metrics-listen", "off", "--max-message-bytes", String(MAX_MESSAGE_BYTES)],
    { cwd: REPO_ROOT, stdio: ["ignore", "pipe", "pipe"], detached: true },
  );
  exited = new Promise((resolve) => child.once("close", (code, signal) => resolve({ code, signal })));
  child.stderr.setEncoding("utf8").on("data", (chunk: string) => (stderr += chunk));
  address = await new Promise<string>((resolve, reject) => {
    createInterface({ input: child.stdout }).on("line", (line) => {
      logLines.push(line);
      try {
        const entry = JSON.parse(line) as { grpc?: unknown };
        if (typeof entry.grpc === "string") resolve(entry.grpc);
      } catch {
        // Not a log line.
      }
    });
    exited.then((exit) => reject(new Error(`server exited (${exit.code ?? exit.signal}) before listening:\n${stderr}`)));
  });
  client = new IommufdClient(address);
  await client.createVm({ vmId: "h2-vm", model: IommuModel.MOCK, guestMemoryBytes: 1n << 20n });
}, 60_000);

afterAll(async () => {
  client?.close();
  if (child && child.exitCode === null && child.signalCode === null) {
    child.kill("SIGTERM");
    const exit = await Promise.race([exited, new Promise<undefined>((resolve) => setTimeout(() => resolve(undefined), 15_000))]);
    if (exit === undefined && child.pid !== undefined) process.kill(-child.pid, "SIGKILL");
  }
});

// ---------------------------------------------------------------------------
// Raw HTTP/2

interface Answer {
  /** :status of the response headers (undefined if the stream was reset before any). */
  httpStatus?: number;
  /** grpc-status from the trailers, or from a trailers-only response. */
  grpcStatus?: number;
  grpcMessage?: string;
  /** grpc-status-details-bin, decoded. */
  details?: Status;
  data: Buffer;
  /** RST_STREAM code received, if the server reset the stream. */
  rstCode?: number;
  /** Session or stream error, if any. */
  error?: string;
}

interface H2Request {
  path: string;
  method?: string;
  contentType?: string | null;
  headers?: http2.OutgoingHttpHeaders;
  body?: Buffer;
  /** End the stream after the body (default true). */
  end?: boolean;
  /** Reset the stream (RST_STREAM CANCEL) this many ms after sending. */
  resetAfterMs?: number;
}

/** A gRPC length-prefixed message: compressed flag, 4-byte big-endian length, bytes. */
function frame(message: Uint8Array, options: { flags?: number; declared?: number } = {}): Buffer {
  const prefix = Buffer.alloc(5);
  prefix[0] = options.flags ?? 0;
  prefix.writeUInt32BE((options.declared ?? message.length) >>> 0, 1);
  return Buffer.concat([prefix, message]);
}

function encode(rpc: RpcName, request: object): Uint8Array {
  const method = IommufdService.methods.find((m) => m.localName === rpc)!;
  return toBinary(method.input, create(method.input, request as never));
}

const servicePath = (name: string) => `/${IommufdService.typeName}/${name}`;

/** Sends one request on `session` (a new one if not given) and collects whatever comes back. */
function h2(req: H2Request, session?: http2.ClientHttp2Session): Promise<Answer> {
  const own = session === undefined;
  const s = session ?? http2.connect(`http://${address}`);
  return new Promise<Answer>((resolve) => {
    const answer: Answer = { data: Buffer.alloc(0) };
    let finished = false;
    const finish = () => {
      if (finished) return;
      finished = true;
      clearTimeout(timer);
      // The server may answer before we end our side: do not leave the stream half open.
      if (!stream.closed) stream.close(http2.constants.NGHTTP2_CANCEL);
      if (own) s.close();
      resolve(answer);
    };
    const timer = setTimeout(() => {
      answer.error = `no answer within ${ANSWER_MS} ms`;
      finish();
    }, ANSWER_MS);
    s.on("error", (e) => (answer.error = `session: ${e.message}`));
    const headers: http2.OutgoingHttpHeaders = { ":method": req.method ?? "POST", ":path": req.path, te: "trailers", ...req.headers };
    if (req.contentType !== null) headers["content-type"] = req.contentType ?? "application/grpc";
    const stream = s.request(headers, { endStream: false });
    /** grpc-status comes last (trailers, or a trailers-only response): the answer is complete. */
    const grpcFields = (h: http2.IncomingHttpHeaders) => {
      if (h["grpc-message"] !== undefined) answer.grpcMessage = decodeURIComponent(String(h["grpc-message"]));
      const bin = h["grpc-status-details-bin"];
      if (typeof bin === "string") answer.details = fromBinary(StatusSchema, Buffer.from(bin, "base64"));
      if (h["grpc-status"] !== undefined) {
        answer.grpcStatus = Number(h["grpc-status"]);
        setImmediate(finish);
      }
    };
    stream.on("response", (h) => {
      answer.httpStatus = Number(h[":status"]);
      grpcFields(h);
    });
    stream.on("trailers", grpcFields);
    stream.on("data", (d: Buffer) => (answer.data = Buffer.concat([answer.data, d])));
    stream.on("error", (e) => (answer.error = `stream: ${e.message}`));
    stream.on("close", () => {
      if (!finished && stream.rstCode !== http2.constants.NGHTTP2_NO_ERROR) answer.rstCode = stream.rstCode;
      finish();
    });
    if (req.body) stream.write(req.body);
    if (req.resetAfterMs !== undefined) setTimeout(() => !finished && stream.close(http2.constants.NGHTTP2_CANCEL), req.resetAfterMs);
    else if (req.end ?? true) stream.end();
  });
}

const show = (a: Answer) => JSON.stringify({ ...a, data: a.data.length, details: a.details?.details.map((d) => d.typeUrl) });

/** An error answer: an HTTP error status, or a gRPC status other than OK. */
function expectRefused(a: Answer): void {
  expect(a.error === undefined || !a.error.startsWith("no answer"), `an answer at all: ${show(a)}`).toBe(true);
  const httpError = a.httpStatus !== undefined && a.httpStatus >= 400;
  expect(httpError || (a.grpcStatus !== undefined && a.grpcStatus !== grpc.status.OK), `an HTTP or gRPC error: ${show(a)}`).toBe(true);
  if (a.grpcStatus !== undefined) {
    expect([grpc.status.INTERNAL, grpc.status.UNKNOWN], `api.md: no input may produce INTERNAL or UNKNOWN, got ${grpc.status[a.grpcStatus]}: ${a.grpcMessage}`).not.toContain(a.grpcStatus);
  }
}

/**
 * A failed call to an IommufdService method: a gRPC error (HTTP 200,
 * grpc-status not OK/INTERNAL/UNKNOWN) whose grpc-status-details-bin holds
 * one ErrorInfo of domain iommufd.v1 with an errno (api.md Errors); with
 * `errno`, that one.
 */
function expectServiceError(a: Answer, errno?: string): void {
  expectRefused(a);
  expect(a.httpStatus, show(a)).toBe(200);
  expect(a.grpcStatus, show(a)).toBeDefined();
  expect(a.details, `api.md: every failed RPC carries a google.rpc.Status with an ErrorInfo; ${grpc.status[a.grpcStatus!]}: ${a.grpcMessage}`).toBeDefined();
  expect(a.details!.code).toBe(a.grpcStatus);
  const infos = a.details!.details.map((d) => anyUnpack(d, ErrorInfoSchema)).filter((x) => x !== undefined);
  expect(infos, show(a)).toHaveLength(1);
  expect(infos[0].domain).toBe("iommufd.v1");
  expect(Number(infos[0].metadata.errno)).toBeGreaterThan(0);
  if (errno !== undefined) expect(infos[0].reason, a.grpcMessage).toBe(errno);
}

const GET_STATS = encode("getStats", { vmId: "h2-vm" });

// ---------------------------------------------------------------------------

describe("malformed gRPC framing on IommufdService/GetStats", () => {
  it("(the harness: a well-formed frame is answered OK with a GetStatsResponse)", async () => {
    const a = await h2({ path: servicePath("GetStats"), body: frame(GET_STATS) });
    expect(a.httpStatus).toBe(200);
    expect(a.grpcStatus, a.grpcMessage).toBe(grpc.status.OK);
    expect(a.data.readUInt32BE(1)).toBe(a.data.length - 5);
    expect(fromBinary(GetStatsResponseSchema, a.data.subarray(5)).stats).toBeDefined();
  });

  // Message framing is grpc-js's (README "Transport errors"): it refuses a
  // unary call without exactly one whole message with its own status
  // (UNIMPLEMENTED, "Received no request message ..."), without ErrorInfo.
  it.each([
    ["a length prefix cut short (3 of its 5 bytes)", Buffer.from([0, 0, 0])],
    ["a truncated message: the prefix declares 64 bytes, the stream ends after 10", frame(GET_STATS.subarray(0, 10), { declared: 64 })],
    ["no message at all: HEADERS then END_STREAM", undefined],
    ["two messages on a unary method", Buffer.concat([frame(GET_STATS), frame(GET_STATS)])],
  ])("%s: refused by the transport", async (_what, body) => {
    const a = await h2({ path: servicePath("GetStats"), body });
    expectRefused(a);
    expect(a.grpcStatus, a.grpcMessage).toBe(grpc.status.UNIMPLEMENTED);
  });

  it("the compressed flag set without a grpc-encoding header: read as uncompressed (grpc-js), never a failure as a bug", async () => {
    // Valid bytes for an existing VM: only the flag is wrong (the gRPC protocol: "If the
    // Message-Encoding header is omitted then the Compressed-Flag must be 0").
    const a = await h2({ path: servicePath("GetStats"), body: frame(GET_STATS, { flags: 1 }) });
    if (a.grpcStatus !== grpc.status.OK) expectRefused(a);
    else expect(fromBinary(GetStatsResponseSchema, a.data.subarray(5)).stats).toBeDefined();
  });

  it("the compressed flag with grpc-encoding gzip, and bytes that are not gzip: compressed requests are UNIMPLEMENTED/EOPNOTSUPP", async () => {
    const a = await h2({ path: servicePath("GetStats"), headers: { "grpc-encoding": "gzip" }, body: frame(GET_STATS, { flags: 1 }) });
    expectServiceError(a, "EOPNOTSUPP");
    expect(a.grpcStatus).toBe(grpc.status.UNIMPLEMENTED);
  });

  it("a grpc-encoding the server does not support", async () => {
    expectServiceError(await h2({ path: servicePath("GetStats"), headers: { "grpc-encoding": "snappy" }, body: frame(GET_STATS, { flags: 1 }) }), "EOPNOTSUPP");
  });

  it("an undefined flags byte (0x80): only bit 0 is read (grpc-js), never a failure as a bug", async () => {
    const a = await h2({ path: servicePath("GetStats"), body: frame(GET_STATS, { flags: 0x80 }) });
    if (a.grpcStatus !== grpc.status.OK) expectRefused(a);
  });
});

describe("garbage protobuf bodies, well framed", () => {
  const GARBAGE: [string, Buffer][] = [
    ["0xff bytes", Buffer.alloc(8, 0xff)],
    ["wire type 7", Buffer.from([0x0f, 0x01])],
    ["a truncated varint", Buffer.from([0x10, 0x80])],
    ["a varint of 11 bytes", Buffer.from([0x10, ...Array(10).fill(0xff), 0x01])],
    ["a length beyond the body", Buffer.from([0x0a, 0x7f, 0x61])],
    ["a group start without its end", Buffer.from([0x0b, 0x10, 0x01])],
    ["a group end without its start", Buffer.from([0x0c])],
    ["invalid UTF-8 in vm_id", Buffer.from([0x0a, 0x02, 0xc3, 0x28])],
    ["field number 0", Buffer.from([0x00, 0x01])],
  ];
  const METHODS = ["CreateVm", "ListVms", "MapIoas", "AllocHwpt", "Invalidate", "WriteGuestMemory", "Translate"];

  it.each(METHODS)("%s: each garbage body is INVALID_ARGUMENT/EINVAL with its ErrorInfo", async (method) => {
    for (const [what, body] of GARBAGE) {
      const a = await h2({ path: servicePath(method), body: frame(body) });
      try {
        expectServiceError(a, "EINVAL");
        expect(a.grpcStatus).toBe(grpc.status.INVALID_ARGUMENT);
      } catch (e) {
        throw new Error(`${method} with ${what}: ${(e as Error).message}`);
      }
    }
  });
});

describe("requests that are not gRPC calls of the service", () => {
  it.each([
    ["application/json", "application/json"],
    ["text/plain", "text/plain"],
    ["no content-type", null],
  ])("content-type %s is refused", async (_what, contentType) => {
    expectRefused(await h2({ path: servicePath("GetStats"), contentType, body: frame(GET_STATS) }));
  });

  it.each(["/nope.Service/Method", servicePath("NoSuchMethod"), servicePath("getStats"), "/", "/iommufd.v1.IommufdService", "//GetStats"])("unknown path %s is UNIMPLEMENTED", async (path) => {
    const a = await h2({ path, body: frame(GET_STATS) });
    expectRefused(a);
    expect(a.grpcStatus, a.grpcMessage).toBe(grpc.status.UNIMPLEMENTED);
  });

  it.each(["GET", "PUT", "DELETE"])("%s instead of POST, with a valid message, is refused", async (method) => {
    // gRPC is POST only ("Method → \":method POST\"" in PROTOCOL-HTTP2).
    expectRefused(await h2({ path: servicePath("GetStats"), method, body: frame(GET_STATS) }));
  });

  it("GET without a body is refused", async () => {
    expectRefused(await h2({ path: servicePath("GetStats"), method: "GET" }));
  });
});

describe("oversize declared lengths (--max-message-bytes 65536)", () => {
  it("one byte over the limit, sent in full: RESOURCE_EXHAUSTED/EDQUOT with the QuotaFailure", async () => {
    const a = await h2({ path: servicePath("WriteGuestMemory"), body: frame(Buffer.alloc(MAX_MESSAGE_BYTES + 1)) });
    expectServiceError(a, "EDQUOT");
    expect(a.grpcStatus).toBe(grpc.status.RESOURCE_EXHAUSTED);
    expect(a.details!.details.some((d) => anyUnpack(d, QuotaFailureSchema) !== undefined)).toBe(true);
  });

  // Beyond the limit + 1 MiB, grpc-js refuses the declared length before
  // reading the message (so it is never buffered), with its own status.
  it("a prefix declaring 4 GiB - 1 and nothing after it: RESOURCE_EXHAUSTED from the transport", async () => {
    const a = await h2({ path: servicePath("WriteGuestMemory"), body: frame(Buffer.alloc(0), { declared: 0xffff_ffff }), end: false });
    expectRefused(a);
    expect(a.grpcStatus).toBe(grpc.status.RESOURCE_EXHAUSTED);
  });

  it("a prefix declaring 16 MiB, 1 KiB of it, then the stream ends: RESOURCE_EXHAUSTED from the transport", async () => {
    const a = await h2({ path: servicePath("Translate"), body: frame(Buffer.alloc(1024, 0x20), { declared: 16 << 20 }) });
    expectRefused(a);
    expect(a.grpcStatus).toBe(grpc.status.RESOURCE_EXHAUSTED);
  });
});

describe("streams reset midway", () => {
  it("RST_STREAM after a partial message, after a whole one before END_STREAM, right after HEADERS, and 100 at once: the session still serves calls", async () => {
    const session = http2.connect(`http://${address}`);
    try {
      const resets = [
        h2({ path: servicePath("GetStats"), body: frame(GET_STATS.subarray(0, 4), { declared: GET_STATS.length }), resetAfterMs: 20 }, session),
        h2({ path: servicePath("WriteGuestMemory"), body: frame(encode("writeGuestMemory", { vmId: "h2-vm", gpa: 0n, data: Buffer.alloc(100) })), resetAfterMs: 20 }, session),
        h2({ path: servicePath("CreateVm"), resetAfterMs: 0 }, session),
        ...Array.from({ length: 100 }, (_, i) => h2({ path: servicePath("Translate"), body: frame(Buffer.alloc(i, 0x08), { declared: 4096 }), resetAfterMs: i % 7 }, session)),
      ];
      for (const a of await Promise.all(resets)) expect(a.error ?? "", show(a)).not.toMatch(/^(session|no answer)/);
      const after = await h2({ path: servicePath("GetStats"), body: frame(GET_STATS) }, session);
      expect(after.grpcStatus, after.grpcMessage).toBe(grpc.status.OK);
    } finally {
      session.close();
    }
  });

  it("a connection dropped in the middle of a message", async () => {
    const socket = net.connect({ host: "127.0.0.1", port: Number(address.slice(address.lastIndexOf(":") + 1)) });
    const session = http2.connect(`http://${address}`, { createConnection: () => socket });
    session.on("error", () => {});
    const stream = session.request({ ":method": "POST", ":path": servicePath("WriteGuestMemory"), "content-type": "application/grpc", te: "trailers" }, { endStream: false });
    stream.on("error", () => {});
    stream.write(frame(Buffer.alloc(1000), { declared: 60_000 }));
    await new Promise((resolve) => setTimeout(resolve, 50));
    socket.destroy();
    const a = await h2({ path: servicePath("GetStats"), body: frame(GET_STATS) });
    expect(a.grpcStatus, a.grpcMessage).toBe(grpc.status.OK);
  });
});

describe("bad headers", () => {
  it.each(["xyz", "99999999999H", "-1S", "1X"])("grpc-timeout %j: served, or refused with a clean error", async (timeout) => {
    const a = await h2({ path: servicePath("GetStats"), headers: { "grpc-timeout": timeout }, body: frame(GET_STATS) });
    if (a.grpcStatus !== grpc.status.OK) expectServiceError(a);
  });

  it("a header block beyond the server's limit", async () => {
    const a = await h2({ path: servicePath("GetStats"), headers: { "x-big": "x".repeat(100_000) }, body: frame(GET_STATS) });
    expect(a.grpcStatus, "not served").not.toBe(grpc.status.OK);
    if (a.grpcStatus !== undefined) expectRefused(a);
  });

  it("a -bin header that is not base64", async () => {
    const a = await h2({ path: servicePath("GetStats"), headers: { "x-thing-bin": "!!not base64!!" }, body: frame(GET_STATS) });
    // Metadata the server does not use: the call may be served; it must not fail as a bug.
    if (a.grpcStatus !== grpc.status.OK) expectRefused(a);
  });
});

describe("garbage to the other services on the port", () => {
  it.each([
    ["grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Check"],
    ["grpc.health.v1.Health/Watch", "/grpc.health.v1.Health/Watch"],
    ["grpc.reflection.v1.ServerReflection", "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"],
    ["grpc.reflection.v1alpha.ServerReflection", "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"],
  ])("%s with a garbage body", async (_what, path) => {
    const a = await h2({ path, body: frame(Buffer.from([0xff, 0xff, 0xff])) });
    expectRefused(a);
  });
});

describe("bytes that are not HTTP/2", () => {
  /** Writes `bytes` on a fresh TCP connection; resolves when the server closes it (rejects if it does not). */
  function closedAfter(bytes: Buffer): Promise<void> {
    return new Promise((resolve, reject) => {
      const [host, port] = [address.slice(0, address.lastIndexOf(":")), Number(address.slice(address.lastIndexOf(":") + 1))];
      const socket = net.connect({ host, port }, () => socket.write(bytes));
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new Error(`the server kept the connection open for ${ANSWER_MS} ms`));
      }, ANSWER_MS);
      socket.on("data", () => {});
      socket.on("error", () => {});
      socket.on("close", () => {
        clearTimeout(timer);
        resolve();
      });
    });
  }
  const PREFACE = Buffer.from("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");

  it.each([
    ["an HTTP/1.1 request", Buffer.from("POST /iommufd.v1.IommufdService/GetStats HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")],
    ["random bytes", Buffer.from(Array.from({ length: 1024 }, (_, i) => (i * 131 + 7) & 0xff))],
    ["the HTTP/2 preface, then a frame of an unknown type longer than the default max frame size", Buffer.concat([PREFACE, Buffer.from([0xff, 0xff, 0xff, 0xee, 0, 0, 0, 0, 1])])],
    ["the HTTP/2 preface, then a DATA frame on stream 0", Buffer.concat([PREFACE, Buffer.from([0, 0, 4, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4])])],
    ["the HTTP/2 preface, then HEADERS with a garbage HPACK block", Buffer.concat([PREFACE, Buffer.from([0, 0, 4, 1, 5, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff])])],
  ])("%s: the server closes the connection", async (_what, bytes) => {
    await closedAfter(bytes);
  });
});

// ---------------------------------------------------------------------------

describe("afterwards", () => {
  it("the process is alive, Health/Check is SERVING, real RPCs work, and nothing was logged as an error", async () => {
    expect(child.exitCode, stderr).toBeNull();
    expect(child.signalCode).toBeNull();

    const health = new grpc.Client(address, grpc.credentials.createInsecure());
    try {
      for (const service of ["", IommufdService.typeName]) {
        const status = await new Promise<HealthCheckResponse_ServingStatus>((resolve, reject) =>
          health.makeUnaryRequest(
            "/grpc.health.v1.Health/Check",
            (req: { service: string }) => Buffer.from(toBinary(HealthCheckRequestSchema, create(HealthCheckRequestSchema, req))),
            (b: Buffer) => fromBinary(HealthCheckResponseSchema, b),
            { service },
            (err, response) => (err ? reject(err) : resolve(response!.status)),
          ),
        );
        expect(status).toBe(HealthCheckResponse_ServingStatus.SERVING);
      }
    } finally {
      health.close();
    }

    await client.createVm({ vmId: "h2-after", model: IommuModel.INTEL_VTD, guestMemoryBytes: 1n << 20n });
    const vm = client.vm("h2-after");
    expect((await vm.allocIoas()).ioasId).toBe(1);
    expect((await vm.getStats()).stats?.translations).toBe(0n);
    expect((await client.listVms({})).vms.map((v) => v.vmId).sort()).toEqual(["h2-after", "h2-vm"]);

    const errors = logLines.filter((line) => {
      try {
        return (JSON.parse(line) as { level?: number }).level! >= 50;
      } catch {
        return false;
      }
    });
    expect(errors, "error-level log lines (handler bugs)").toEqual([]);
  });
});
