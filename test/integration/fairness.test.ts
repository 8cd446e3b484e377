/**
 * Fairness (issue 6 item 4): a heavy tenant's huge Translate batches and
 * invalidation storms must not stall another tenant's RPCs — the server
 * bounds the work it does per event-loop turn. A light client issues unary
 * RPCs one after another on its own VM while the heavy load runs, and its
 * p99 latency must stay under 100 ms: a loose bound, as the issue asks, so
 * that the test is not timing-flaky (exact figures belong to the benchmarks).
 * The heavy work must complete, and correctly.
 *
 * Without mutual TLS every caller is the one implicit tenant; that does not
 * matter here, since what is measured is the event loop the server shares
 * between calls: the heavy and the light client use different VMs. The
 * server runs in this process, so the clients do nothing heavy while the
 * latencies are measured: heavy requests are encoded before and their
 * responses decoded after, and travel as raw bytes.
 */
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import type * as grpc from "@grpc/grpc-js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { VmMethods } from "../../client/client.js";
import { TranslateRequestSchema, TranslateResponseSchema } from "../../gen/iommufd/v1/dma_pb.js";
import { InvalidateRequestSchema, InvalidateResponseSchema } from "../../gen/iommufd/v1/hwpt_pb.js";
import { IommufdService } from "../../gen/iommufd/v1/service_pb.js";
import { IommuModel } from "../../gen/iommufd/v1/vm_pb.js";
import { startTestServer, type TestServer } from "../helpers/server.js";
import { createNestedVm, GIB, MIB, type NestedVm, stats } from "./translate-helpers.js";

/** The light client's p99 bound (issue 6: "e.g. p99 under 100 ms"). */
const P99_BOUND_MS = 100;
/** Enough light calls for a p99 to mean something. */
const MIN_SAMPLES = 50;

/** IOVAs per Translate: the default translateBatch quota. */
const BATCH = 65536;
/**
 * Concurrent Translate streams of the heavy client, each in its own 1 GiB
 * IOVA window (a VMM with many queues, or a simulation with many devices,
 * keeps this many batches in flight).
 */
const TRANSLATE_STREAMS = 16;
/** Concurrent streams of maximal Invalidates. */
const INVALIDATE_STREAMS = 4;
/** The heavy load goes on until the light client has made this many calls (or LOAD_CAP_MS passed). */
const LIGHT_CALLS = 100;
const LOAD_CAP_MS = 10_000;

const PAGE = 4096n;
/** Stage 1 maps window w: IOVA w·1 GiB + i·4 KiB -> GPA TARGET + i·4 KiB, for i < BATCH (256 MiB). */
const TARGET = 0x1000_0000n;
/** Where this test builds its stage-1 tables (beyond createNestedVm's own table region). */
const PML4 = 0x20_0000n;
const PDPT = PML4 + PAGE;
const PD = PDPT + PAGE;
const PT0 = PD + PAGE;
const P_RW_US = 0x7n;

let t: TestServer;
let heavy: NestedVm;
let light: VmMethods;

/** A 4 KiB table of 8-byte entries. */
function table(entries: bigint[]): Buffer {
  const b = Buffer.alloc(4096);
  entries.forEach((e, i) => b.writeBigUInt64LE(e, i * 8));
  return b;
}

const iovaOf = (window: number, i: number) => (BigInt(window) << 30n) + BigInt(i) * PAGE + 0x18n;
const addressOf = (i: number) => TARGET + BigInt(i) * PAGE + 0x18n;

beforeAll(async () => {
  t = await startTestServer();
  // The heavy VM: 512 MiB identity-mapped by stage 2 in 4 KiB pages, so that
  // every distinct 4 KiB IOVA is its own IOTLB entry and a cold walk reads 24 entries.
  heavy = await createNestedVm(t, "heavy", { guestBytes: GIB, areas: [{ iova: 0n, userVa: 0n, length: 512n * MIB }], pgtblAddr: PML4 });
  // Stage 1, written a table at a time: every window shares the PD and its 128 leaf tables.
  const vm = heavy.vm;
  await vm.writeGuestMemory({ gpa: PML4, data: table([PDPT | P_RW_US]) });
  await vm.writeGuestMemory({ gpa: PDPT, data: table(Array.from({ length: TRANSLATE_STREAMS }, () => PD | P_RW_US)) });
  await vm.writeGuestMemory({ gpa: PD, data: table(Array.from({ length: BATCH / 512 }, (_, j) => (PT0 + BigInt(j) * PAGE) | P_RW_US)) });
  for (let j = 0; j < BATCH / 512; j++) {
    await vm.writeGuestMemory({ gpa: PT0 + BigInt(j) * PAGE, data: table(Array.from({ length: 512 }, (_, k) => (TARGET + BigInt(j * 512 + k) * PAGE) | P_RW_US)) });
  }
  await t.client.createVm({ vmId: "light", model: IommuModel.MOCK, guestMemoryBytes: MIB });
  light = t.client.vm("light");
}, 60_000);

afterAll(async () => {
  await t?.close();
});

/** A unary call with raw bytes both ways. */
function raw(name: string, request: Buffer): Promise<Buffer> {
  return new Promise((resolve, reject) =>
    t.client.grpc.makeUnaryRequest(
      `/${IommufdService.typeName}/${name}`,
      (b: Buffer) => b,
      (b: Buffer) => b,
      request,
      (err: grpc.ServiceError | null, response?: Buffer) => (err ? reject(err) : resolve(response!)),
    ),
  );
}

function translateRequest(window: number): Buffer {
  const iovas = Array.from({ length: BATCH }, (_, i) => iovaOf(window, i));
  return Buffer.from(toBinary(TranslateRequestSchema, create(TranslateRequestSchema, { vmId: "heavy", devId: heavy.devId, iovas })));
}

/** The largest Invalidate the default quota allows: one leaf entry per page of a window. */
function bigInvalidate(window: number): Buffer {
  const entries = Array.from({ length: BATCH }, (_, i) => ({ addr: iovaOf(window, i) & ~0xfffn, npages: 1n, leaf: true }));
  return Buffer.from(toBinary(InvalidateRequestSchema, create(InvalidateRequestSchema, { vmId: "heavy", hwptId: heavy.nestedId, requests: { case: "vtdS1", value: { entries } } })));
}

/** A whole-domain Invalidate: one entry. */
function domainInvalidate(): Buffer {
  const entries = [{ addr: 0n, npages: (1n << 64n) - 1n, leaf: false }];
  return Buffer.from(toBinary(InvalidateRequestSchema, create(InvalidateRequestSchema, { vmId: "heavy", hwptId: heavy.nestedId, requests: { case: "vtdS1", value: { entries } } })));
}

interface Latencies {
  count: number;
  p50: number;
  p99: number;
  max: number;
  loadMs: number;
}

/**
 * The heavy load, in parts: `streams` concurrent loops each, every loop
 * sending `next(stream)` to `method` once the previous request is answered,
 * until every loop has sent one request and the light client has made
 * LIGHT_CALLS calls (or LOAD_CAP_MS passed).
 */
type Load = { streams: number; method: string; next: (stream: number) => Buffer }[];

/**
 * Runs `load` while the light client calls GetStats, AllocIoas and Destroy
 * on its own VM, one at a time; the latency of each light call made while
 * the load ran, and the answers of the load (per part, per loop, in order).
 */
async function whileLightClientRuns(load: Load): Promise<{ latencies: Latencies; answers: Buffer[][][] }> {
  // Warm up the light path (JIT, connection) before anything is measured.
  for (let i = 0; i < 20; i++) await light.getStats();
  const samples: number[] = [];
  let running = true;
  const timed = async <T>(call: () => Promise<T>): Promise<T> => {
    const start = performance.now();
    const result = await call();
    if (running) samples.push(performance.now() - start);
    return result;
  };
  const lightLoop = (async () => {
    while (running) {
      await timed(() => light.getStats());
      const { ioasId } = await timed(() => light.allocIoas());
      await timed(() => light.destroy({ id: ioasId }));
    }
  })();
  const start = performance.now();
  const enough = () => samples.length >= LIGHT_CALLS || performance.now() - start > LOAD_CAP_MS;
  let answers: Buffer[][][];
  let loadMs: number;
  try {
    answers = await Promise.all(
      load.map((part) =>
        Promise.all(
          Array.from({ length: part.streams }, async (_, stream) => {
            const got: Buffer[] = [];
            do got.push(await raw(part.method, part.next(stream)));
            while (!enough());
            return got;
          }),
        ),
      ),
    );
    loadMs = performance.now() - start;
  } finally {
    running = false;
    await lightLoop;
  }
  samples.sort((a, b) => a - b);
  const at = (q: number) => samples[Math.min(samples.length - 1, Math.ceil(q * samples.length) - 1)];
  return { latencies: { count: samples.length, p50: at(0.5), p99: at(0.99), max: samples[samples.length - 1], loadMs }, answers };
}

const fmt = (l: Latencies) =>
  `${l.count} light calls in ${l.loadMs.toFixed(0)} ms of load: p50 ${l.p50.toFixed(1)} ms, p99 ${l.p99.toFixed(1)} ms, max ${l.max.toFixed(1)} ms`;

function expectFair(l: Latencies): void {
  if (process.env.IOMMUFD_FAIRNESS_REPORT === "1") console.log(fmt(l));
  expect(l.p99, `the light client's p99 under ${P99_BOUND_MS} ms: ${fmt(l)}`).toBeLessThan(P99_BOUND_MS);
  expect(l.count, `enough light calls for a p99: ${fmt(l)}`).toBeGreaterThanOrEqual(MIN_SAMPLES);
}

/** Every access of a heavy batch translated to its address by a cold 24-read walk. */
function expectColdTranslations(response: Buffer): void {
  const r = fromBinary(TranslateResponseSchema, response);
  expect(r.faults).toEqual([]);
  expect(r.addresses).toHaveLength(BATCH);
  const wrong = r.addresses.findIndex((a, i) => a !== addressOf(i));
  expect(wrong, `address of access ${wrong}`).toBe(-1);
  expect(r.memoryReferences.every((m) => m === 24), "every access a cold 4-over-4 walk (24 reads)").toBe(true);
  expect(r.iotlbHits).toBe(0);
}

const entriesHandled = (answer: Buffer) => fromBinary(InvalidateResponseSchema, answer).entriesHandled;

describe("a light client's unary RPCs while a heavy one loads the server", () => {
  it(`${TRANSLATE_STREAMS} concurrent streams of ${BATCH}-IOVA Translate batches that miss the IOTLB`, async () => {
    const requests = Array.from({ length: TRANSLATE_STREAMS }, (_, w) => translateRequest(w));
    expectColdTranslations(await raw("Translate", requests[0])); // warm-up, not measured
    const before = await stats(heavy.vm);
    const { latencies, answers } = await whileLightClientRuns([{ streams: TRANSLATE_STREAMS, method: "Translate", next: (w) => requests[w] }]);

    const responses = answers[0].flat();
    for (const response of responses) expectColdTranslations(response);
    const after = await stats(heavy.vm);
    const n = responses.length * BATCH;
    expect({
      translations: after.translations - before.translations,
      iotlbMisses: after.iotlbMisses - before.iotlbMisses,
      iotlbHits: after.iotlbHits - before.iotlbHits,
      memoryReferences: after.memoryReferences - before.memoryReferences,
      faults: after.faults - before.faults,
    }).toEqual({ translations: n, iotlbMisses: n, iotlbHits: 0, memoryReferences: 24 * n, faults: 0 });
    expectFair(latencies);
  }, 60_000);

  it(`an invalidation storm: ${INVALIDATE_STREAMS} streams of ${BATCH}-entry Invalidates and a flood of whole-domain ones`, async () => {
    const big = Array.from({ length: INVALIDATE_STREAMS }, (_, w) => bigInvalidate(w));
    const small = domainInvalidate();
    const before = await stats(heavy.vm);
    const { latencies, answers } = await whileLightClientRuns([
      { streams: INVALIDATE_STREAMS, method: "Invalidate", next: (w) => big[w] },
      { streams: 64, method: "Invalidate", next: () => small },
    ]);

    const [bigAnswers, smallAnswers] = answers.map((a) => a.flat().map(entriesHandled));
    expect(bigAnswers.every((h) => h === BATCH)).toBe(true);
    expect(smallAnswers.every((h) => h === 1)).toBe(true);
    expect((await stats(heavy.vm)).invalidationEntries - before.invalidationEntries).toBe(bigAnswers.length * BATCH + smallAnswers.length);
    expectFair(latencies);
  }, 60_000);

  it("both at once: Translate batches and invalidation storms", async () => {
    const translates = Array.from({ length: TRANSLATE_STREAMS }, (_, w) => translateRequest(w));
    const big = bigInvalidate(0);
    const { latencies, answers } = await whileLightClientRuns([
      { streams: TRANSLATE_STREAMS, method: "Translate", next: (w) => translates[w] },
      { streams: 2, method: "Invalidate", next: () => big },
    ]);

    // Invalidations drop cached translations but change no table: every address is still right.
    for (const response of answers[0].flat()) {
      const r = fromBinary(TranslateResponseSchema, response);
      expect(r.faults).toEqual([]);
      expect(r.addresses.findIndex((a, i) => a !== addressOf(i))).toBe(-1);
    }
    expect(answers[1].flat().map(entriesHandled).every((h) => h === BATCH)).toBe(true);
    expectFair(latencies);
  }, 60_000);
});
