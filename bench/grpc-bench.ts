import { create, type DescMessage, fromBinary, type MessageInitShape, toBinary } from "@bufbuild/protobuf";
import * as grpc from "@grpc/grpc-js";
import { IommufdClient } from "../client/client.js";
import { SZ_4K, Stage1PageTable } from "../client/pagetable.js";
import { HealthCheckRequestSchema } from "../gen/grpc/health/v1/health_pb.js";
import { AttachDeviceRequestSchema, DetachDeviceRequestSchema, HwInfoRequestSchema } from "../gen/iommufd/v1/device_pb.js";
import { AllocHwptRequestSchema, AllocHwptResponseSchema, DestroyRequestSchema, InvalidateRequestSchema, InvalidateResponseSchema } from "../gen/iommufd/v1/hwpt_pb.js";
import { TranslateRequestSchema } from "../gen/iommufd/v1/dma_pb.js";
import { IommuModel } from "../gen/iommufd/v1/vm_pb.js";
import {
  describeSettings,
  findH2load,
  grpcFrame,
  H2LOAD_INSTALL,
  type H2loadSettings,
  h2load,
  handledByCode,
  type ServerOptions,
  type ServerProcess,
  scratchDir,
  withServers,
} from "./grpc-support.js";
import { percentile, type Result } from "./harness.js";

/**
 * The gRPC-level scenarios of performance.md, against iommufd-service child
 * processes: grpc_translate, grpc_unary, metrics_overhead with h2load as the
 * load source (a grpc-js client saturates at 4-5k calls/s per process), and
 * grpc_latency with a grpc-js client at concurrency 1.
 *
 * GRPC_BENCH_CPU_PROF=DIR writes a V8 CPU profile of every server process
 * into DIR (node --cpu-prof); bench/cpuprofile-top.ts summarises one.
 */

const SERVICE = "iommufd.v1.IommufdService";
const HEALTH = "grpc.health.v1.Health";
const BATCH = 1024;
const GIB = 1n << 30n;
const DATA_AT = 0x4000000n;

/**
 * The load for every h2load scenario. This box has 2 cores: the server is one
 * Node thread (~0.9 core under load), h2load one thread (~0.1 core). 4
 * connections x 16 streams keeps the server busy; per connection 16
 * Translate requests of 3.6 KB stay under the server's 64 KB HTTP/2 receive
 * window. Measured alternatives (-c 1..8, -m 4..64, -t 2) were within the
 * run-to-run noise of this setting.
 */
export const H2LOAD: H2loadSettings = { connections: 4, streams: 16, threads: 1 };

export interface GrpcBenchOptions {
  quick: boolean;
}

const seconds = (o: GrpcBenchOptions) => ({
  warmUp: o.quick ? 1 : 2,
  /** One measured h2load run (grpc_translate). */
  measure: o.quick ? 3 : 10,
  /**
   * Seconds per side of an A/B comparison, split into A B B A rounds of
   * about a second: this box's speed wanders by 10-20% within seconds, so
   * many short alternations beat a few long runs.
   */
  compare: o.quick ? 3 : 16,
  rounds: o.quick ? 2 : 8,
});

/** A B B A, `rounds` times: linear drift of the box's speed cancels out. */
function abba<T>(a: T, b: T, rounds: number): T[] {
  return Array.from({ length: rounds }, () => [a, b, b, a]).flat();
}

function serverOptions(base: ServerOptions): ServerOptions {
  const dir = process.env.GRPC_BENCH_CPU_PROF;
  return dir ? { ...base, cpuProfDir: dir } : base;
}

/** Prints why a scenario is skipped; undefined when h2load is there. */
function h2loadMissing(scenario: string): Result[] | undefined {
  if (findH2load() !== undefined) return undefined;
  console.log(`SKIPPED ${scenario}: h2load not found; install it with: ${H2LOAD_INSTALL}`);
  return [];
}

function note(text: string): void {
  console.error(`  ${text}`);
}

interface NestedVm {
  client: IommufdClient;
  vmId: string;
  devId: number;
  parentId: number;
  nestedId: number;
  s1root: bigint;
  iovas: bigint[];
}

/**
 * A VT-d VM over gRPC, as a VMM builds it: 1 GiB guest RAM identity-mapped
 * in stage 2, a nest parent, `pages` 4 KiB stage-1 pages written through
 * WriteGuestMemory, a nested HWPT the device is attached to, and the IOTLB
 * filled with the batch's translations (checked: the next batch all hits).
 */
export async function nestedVm(server: ServerProcess, vmId: string, pages = BATCH): Promise<NestedVm> {
  const client = new IommufdClient(server.grpc, { channelOptions: { "grpc.use_local_subchannel_pool": 1 } });
  try {
    return await buildNestedVm(client, vmId, pages);
  } catch (e) {
    client.close();
    throw e;
  }
}

async function buildNestedVm(client: IommufdClient, vmId: string, pages: number): Promise<NestedVm> {
  await client.waitForReady();
  await client.createVm({ vmId, model: IommuModel.INTEL_VTD, guestMemoryBytes: GIB, options: { iotlbEntries: 4096 } });
  const vm = client.vm(vmId);
  const { ioasId } = await vm.allocIoas();
  await vm.mapIoas({ ioasId, userVa: 0n, length: GIB, iova: 0n, readable: true, writeable: true });
  const { devId } = await vm.bindDevice({ name: "0000:00:04.0" });
  const { hwptId: parentId } = await vm.allocHwpt({ devId, ptId: ioasId, nestParent: true });
  const s1 = new Stage1PageTable(vm, { tableBase: 0x100000n, tableBytes: 0x100000n });
  // The first page of each 512-page run creates its tables; the rest only write leaves.
  for (let first = 0; first < pages; first += 512) {
    await s1.map(BigInt(first) * SZ_4K, DATA_AT + BigInt(first) * SZ_4K, SZ_4K);
    const rest: Promise<void>[] = [];
    for (let i = first + 1; i < Math.min(first + 512, pages); i++) rest.push(s1.map(BigInt(i) * SZ_4K, DATA_AT + BigInt(i) * SZ_4K, SZ_4K));
    await Promise.all(rest);
  }
  const { hwptId: nestedId } = await vm.allocHwpt({ devId, ptId: parentId, data: { case: "vtdS1", value: { pgtblAddr: s1.root, addrWidth: 48 } } });
  await vm.attachDevice({ devId, ptId: nestedId });
  const iovas = Array.from({ length: pages }, (_, i) => BigInt(i) * SZ_4K + BigInt(i & 0xff8));
  const cold = await vm.translate({ devId, iovas });
  if (cold.faults.length !== 0) throw new Error(`setup: ${cold.faults.length} faults, first ${cold.faults[0].reasonName}`);
  for (let i = 0; i < pages; i++) {
    if (cold.addresses[i] !== DATA_AT + iovas[i]) throw new Error(`setup: iova ${iovas[i]} -> ${cold.addresses[i]}`);
  }
  const warm = await vm.translate({ devId, iovas });
  if (warm.iotlbHits !== pages) throw new Error(`setup: only ${warm.iotlbHits} of ${pages} hit the IOTLB`);
  return { client, vmId, devId, parentId, nestedId, s1root: s1.root, iovas };
}

/** Translations the VM has done so far (GetStats: counted by the core, independent of metrics). */
async function translations(v: NestedVm): Promise<{ translations: number; hits: number; faults: number }> {
  const { stats } = await v.client.getStats({ vmId: v.vmId });
  return { translations: Number(stats!.translations), hits: Number(stats!.iotlbHits), faults: Number(stats!.faults) };
}

export const translateBody = (v: NestedVm) => grpcFrame(toBinary(TranslateRequestSchema, create(TranslateRequestSchema, { vmId: v.vmId, devId: v.devId, iovas: v.iovas })));
const url = (server: ServerProcess, service: string, method: string) => `http://${server.grpc}/${service}/${method}`;

const settle = () => new Promise((r) => setTimeout(r, 100));

interface Rate {
  /** OK responses per second. */
  okPerSec: number;
  ok: number;
  notOk: number;
  seconds: number;
  h2loadReqPerSec: number;
}

/** OK calls/s of one method under h2load, counted from grpc_server_handled_total before and after. */
async function okRate(server: ServerProcess, service: string, method: string, bodyFile: string, duration: number): Promise<Rate> {
  const sum = (m: Map<string, number>) => [...m.values()].reduce((a, b) => a + b, 0);
  const before = await handledByCode(server.metrics, service, method);
  const run = await h2load(url(server, service, method), bodyFile, H2LOAD, duration);
  await settle();
  const after = await handledByCode(server.metrics, service, method);
  const ok = (after.get("OK") ?? 0) - (before.get("OK") ?? 0);
  const notOk = sum(after) - sum(before) - ok;
  if (notOk !== 0) {
    const codes = [...after].filter(([code, n]) => code !== "OK" && n !== (before.get(code) ?? 0)).map(([code, n]) => `${code} ${n - (before.get(code) ?? 0)}`);
    // h2load stops with up to c x m requests in flight; grpc-js ends those whose
    // body never arrived as UNIMPLEMENTED ("received no request message").
    const cutOff = notOk <= H2LOAD.connections * H2LOAD.streams && codes.every((c) => c.startsWith("Unimplemented"));
    note(`${method}: ${notOk} of ${ok + notOk} calls did not end OK (${codes.join(", ")})${cutOff ? ": requests cut off when h2load stopped" : ""}`);
  }
  return { okPerSec: ok / run.seconds, ok, notOk, seconds: run.seconds, h2loadReqPerSec: run.reqPerSec };
}

/**
 * Translations/s of Translate under h2load, counted by the VM's own stats
 * (works with metrics off too); only batches that all hit count.
 */
async function translateRate(server: ServerProcess, v: NestedVm, bodyFile: string, duration: number): Promise<{ perSec: number; batches: number; seconds: number }> {
  const before = await translations(v);
  const run = await h2load(url(server, SERVICE, "Translate"), bodyFile, H2LOAD, duration);
  await settle();
  const after = await translations(v);
  const done = after.translations - before.translations;
  if (after.faults !== before.faults) throw new Error(`Translate faulted ${after.faults - before.faults} times under load`);
  if (after.hits - before.hits !== done) throw new Error(`Translate missed the IOTLB ${done - (after.hits - before.hits)} times under load`);
  return { perSec: done / run.seconds, batches: done / BATCH, seconds: run.seconds };
}

export async function grpcTranslate(o: GrpcBenchOptions): Promise<Result[]> {
  const skip = h2loadMissing("grpc_translate");
  if (skip) return skip;
  const t = seconds(o);
  const scratch = scratchDir();
  try {
    return await withServers([serverOptions({ metrics: true })], async ([server]) => {
      const v = await nestedVm(server, "bench-translate");
      try {
        const body = scratch.file("translate.bin", translateBody(v));
        await h2load(url(server, SERVICE, "Translate"), body, H2LOAD, t.warmUp);
        const statsBefore = await translations(v);
        const rate = await okRate(server, SERVICE, "Translate", body, t.measure);
        const statsAfter = await translations(v);
        // The core's own count must agree with the OK responses (each OK is 1024 hits).
        const byStats = statsAfter.hits - statsBefore.hits;
        if (byStats !== rate.ok * BATCH) note(`grpc_translate: GetStats counted ${byStats} hits, metrics ${rate.ok} OK x ${BATCH}`);
        const settings = describeSettings(H2LOAD, t.measure);
        return [
          { scenario: "grpc_translate", value: rate.okPerSec * BATCH, unit: "translations/s", ceiling: 3e6, target: `≥ 3 M/s (ceiling = target; ${settings})` },
          { scenario: "grpc_translate_calls", value: rate.okPerSec, unit: "OK calls/s", ceiling: 3e6 / BATCH, target: `batches of ${BATCH} IOTLB hits, OK from grpc_server_handled_total`, informational: true },
        ];
      } finally {
        v.client.close();
      }
    });
  } finally {
    scratch.cleanup();
  }
}

export async function grpcUnary(o: GrpcBenchOptions): Promise<Result[]> {
  const skip = h2loadMissing("grpc_unary");
  if (skip) return skip;
  const t = seconds(o);
  const scratch = scratchDir();
  try {
    return await withServers([serverOptions({ metrics: true })], async ([server]) => {
      const client = new IommufdClient(server.grpc);
      try {
        await client.createVm({ vmId: "bench-unary", model: IommuModel.INTEL_VTD, guestMemoryBytes: GIB });
        const { devId } = await client.bindDevice({ vmId: "bench-unary", name: "0000:00:04.0" });
        const hwInfo = scratch.file("hwinfo.bin", grpcFrame(toBinary(HwInfoRequestSchema, create(HwInfoRequestSchema, { vmId: "bench-unary", devId }))));
        const check = scratch.file("check.bin", grpcFrame(toBinary(HealthCheckRequestSchema, create(HealthCheckRequestSchema, {}))));
        await h2load(url(server, HEALTH, "Check"), check, H2LOAD, t.warmUp / 2);
        await h2load(url(server, SERVICE, "HwInfo"), hwInfo, H2LOAD, t.warmUp / 2);
        const order = abba<"Check" | "HwInfo">("Check", "HwInfo", t.rounds);
        const each = t.compare / (2 * t.rounds);
        const ok = { Check: 0, HwInfo: 0 };
        const secs = { Check: 0, HwInfo: 0 };
        for (const m of order) {
          const r = m === "Check" ? await okRate(server, HEALTH, "Check", check, each) : await okRate(server, SERVICE, "HwInfo", hwInfo, each);
          ok[m] += r.ok;
          secs[m] += r.seconds;
        }
        const hw = ok.HwInfo / secs.HwInfo;
        const empty = ok.Check / secs.Check;
        return [
          {
            scenario: "grpc_unary",
            value: hw,
            unit: "HwInfo OK/s",
            ceiling: empty,
            target: `≥ 0.8× Health/Check OK/s (ceiling); ${describeSettings(H2LOAD, each)}, A B B A ×${t.rounds}`,
          },
        ];
      } finally {
        client.close();
      }
    });
  } finally {
    scratch.cleanup();
  }
}

export async function metricsOverhead(o: GrpcBenchOptions): Promise<Result[]> {
  const skip = h2loadMissing("metrics_overhead");
  if (skip) return skip;
  const t = seconds(o);
  const scratch = scratchDir();
  try {
    return await withServers([serverOptions({ metrics: true }), serverOptions({ metrics: false })], async ([on, off]) => {
      const vOn = await nestedVm(on, "bench-overhead");
      const vOff = await nestedVm(off, "bench-overhead");
      try {
        // The same VM name on both: byte-identical request bodies.
        const body = scratch.file("translate.bin", translateBody(vOn));
        const servers = { on: [on, vOn], off: [off, vOff] } as const;
        await h2load(url(on, SERVICE, "Translate"), body, H2LOAD, t.warmUp);
        await h2load(url(off, SERVICE, "Translate"), body, H2LOAD, t.warmUp);
        const order = abba<"on" | "off">("on", "off", t.rounds);
        const each = t.compare / (2 * t.rounds);
        const done = { on: 0, off: 0 };
        const secs = { on: 0, off: 0 };
        for (const which of order) {
          const [server, v] = servers[which];
          const r = await translateRate(server, v, body, each);
          done[which] += r.batches * BATCH;
          secs[which] += r.seconds;
        }
        const rateOn = done.on / secs.on;
        const rateOff = done.off / secs.off;
        return [
          {
            scenario: "metrics_overhead",
            value: rateOn,
            unit: "translations/s, metrics on",
            ceiling: rateOff,
            target: `≥ 0.95× metrics off (ceiling); ${describeSettings(H2LOAD, each)}, A B B A ×${t.rounds}; iotlb_hit: no prom-client call in-process (scrape-time metrics)`,
          },
        ];
      } finally {
        vOn.client.close();
        vOff.client.close();
      }
    });
  } finally {
    scratch.cleanup();
  }
}

/** A request built once (protobuf-es), sent as bytes. */
function body<D extends DescMessage>(schema: D, init: MessageInitShape<D>): Buffer {
  return Buffer.from(toBinary(schema, create(schema, init)));
}

export async function grpcLatency(o: GrpcBenchOptions): Promise<Result[]> {
  // Both processes' JITs need a few thousand calls before the tail settles
  // (p99 of the first 1000 AllocHwpt calls is ~3 ms, ~0.5 ms after 3000).
  const warmUp = o.quick ? 2000 : 4000;
  const samples = o.quick ? 2000 : 10000;
  return withServers([serverOptions({ metrics: true })], async ([server]) => {
    // Only 64 pages: the VM shape matters here, not the IOTLB's fill.
    const v = await nestedVm(server, "bench-latency", 64);
    // A bare grpc-js client with requests encoded up front and responses left
    // as bytes: what is timed is the RPC, not protobuf-es in the bench
    // process (whose allocations also put the bench's GC pauses into the tail).
    const raw = new grpc.Client(server.grpc, grpc.credentials.createInsecure(), { "grpc.use_local_subchannel_pool": 1 });
    const bytes = (b: Buffer) => b;
    const call = (method: string, request: Buffer) =>
      new Promise<Buffer>((resolve, reject) => raw.makeUnaryRequest(`/${SERVICE}/${method}`, bytes, bytes, request, (e, r) => (e ? reject(e) : resolve(r!))));
    const timed = async (method: string, request: Buffer): Promise<[number, Buffer]> => {
      const t0 = performance.now();
      const response = await call(method, request);
      return [performance.now() - t0, response];
    };
    const { vmId, devId } = v;
    const allocReq = body(AllocHwptRequestSchema, { vmId, devId, ptId: v.parentId, data: { case: "vtdS1", value: { pgtblAddr: v.s1root, addrWidth: 48 } } });
    const pages = Array.from({ length: 64 }, (_, i) => BigInt(i) * SZ_4K);
    const translateReq = pages.map((page) => body(TranslateRequestSchema, { vmId, devId, iovas: [page] }));
    const invalidateReq = pages.map((page) => body(InvalidateRequestSchema, { vmId, hwptId: v.nestedId, requests: { case: "vtdS1", value: { entries: [{ addr: page, npages: 1n, leaf: true }] } } }));
    const detachReq = body(DetachDeviceRequestSchema, { vmId, devId });
    const attachReq = body(AttachDeviceRequestSchema, { vmId, devId, ptId: v.nestedId });
    const alloc = new Float64Array(samples);
    const invalidate = new Float64Array(samples);
    const attach = new Float64Array(samples);
    try {
      // One round: each RPC once, its set-up (or undo) call not timed. The
      // three interleave so that drift and transients land on all alike.
      const round = async (i: number, sample: number) => {
        // AllocHwpt: a nested VT-d HWPT over the nest parent, then Destroy.
        const [tAlloc, allocated] = await timed("AllocHwpt", allocReq);
        await call("Destroy", body(DestroyRequestSchema, { vmId, id: fromBinary(AllocHwptResponseSchema, allocated).hwptId }));
        // Invalidate: one 4 KiB page whose IOTLB entry a one-IOVA Translate just put back.
        await call("Translate", translateReq[i % 64]);
        const [tInv, invalidated] = await timed("Invalidate", invalidateReq[i % 64]);
        if (fromBinary(InvalidateResponseSchema, invalidated).entriesHandled !== 1) throw new Error("Invalidate did not handle its entry");
        // AttachDevice: to the nested HWPT after a Detach.
        await call("DetachDevice", detachReq);
        const [tAttach] = await timed("AttachDevice", attachReq);
        if (sample >= 0) {
          alloc[sample] = tAlloc;
          invalidate[sample] = tInv;
          attach[sample] = tAttach;
        }
      };
      for (let i = 0; i < warmUp; i++) await round(i, -1);
      (globalThis as { gc?: () => void }).gc?.();
      for (let i = 0; i < samples; i++) await round(i, i);
    } finally {
      raw.close();
      v.client.close();
    }
    const rows: Result[] = [];
    for (const [name, ms] of [["alloc_hwpt", alloc], ["invalidate", invalidate], ["attach_device", attach]] as const) {
      rows.push({ scenario: `grpc_latency_${name}_p50`, value: percentile(ms, 0.5), unit: "ms p50", ceiling: 0.5, target: `≤ 0.5 ms (grpc-js, concurrency 1, ${samples} samples after ${warmUp} warm-up rounds)` });
      rows.push({ scenario: `grpc_latency_${name}_p99`, value: percentile(ms, 0.99), unit: "ms p99", ceiling: 2, target: "≤ 2 ms" });
    }
    return rows;
  });
}
