/**
 * "The typed cases behave exactly as their raw encoding" (api.md Hardware
 * page tables): for random valid and invalid AllocHwpt data (vtd_s1,
 * selftest) and Invalidate entries (vtd_s1, selftest), against MOCK and
 * INTEL_VTD VMs, a typed request and its little-endian kernel encoding
 * (RawHwptData / RawInvalidations with the kernel data_type, entry_len,
 * entry_num) give identical results: the same ids, attach outcome and IOTLB
 * contents on success, the same errno and entries_handled on failure.
 *
 * Each run replays the same scenario on two fresh VMs, one typed and one raw,
 * so that ids compare. Seeds are fixed so runs are reproducible.
 */
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import type { IommufdError, RequestOf } from "../../client/client.js";
import {
  bind,
  type Errno,
  ERRNO,
  GRPC_CODE,
  IOMMU_HWPT_DATA_SELFTEST,
  IOMMU_HWPT_DATA_VTD_S1,
  IOMMU_TEST_INVALIDATE_FLAG_ALL,
  IOMMU_VTD_INV_FLAGS_LEAF,
  IommuModel,
  ioas,
  nextId,
  objectCount,
  pagingHwpt,
  rawSelftest,
  rawVtd,
  selftestHwptBytes,
  serverEnv,
  U64_MAX,
  type Vm,
  vtdS1Bytes,
  vtdS1Flags,
} from "./helpers.js";

const env = serverEnv("prop");
const RUNS = 100;

/** The result of an RPC in a comparable form. */
type Outcome = { ok: unknown } | { errno: string | undefined; code: number; entriesHandled: number | undefined };

async function outcome<T>(p: Promise<T>, pick: (x: T) => unknown = (x) => x): Promise<Outcome> {
  try {
    return { ok: pick(await p) };
  } catch (e) {
    const err = e as IommufdError;
    return { errno: err.errno, code: err.code, entriesHandled: err.entriesHandled };
  }
}

/** No failure is INTERNAL/UNKNOWN, and every errno has its api.md gRPC code. */
function expectWellFormed(o: Outcome): void {
  if ("ok" in o) return;
  expect(Object.keys(ERRNO)).toContain(o.errno);
  expect(o.code).toBe(GRPC_CODE[o.errno as Errno]);
}

const u32 = fc.integer({ min: 0, max: 0xffffffff });
const u64 = fc.bigInt({ min: 0n, max: U64_MAX });
const modelArb = fc.constantFrom(IommuModel.MOCK, IommuModel.INTEL_VTD);

/** A VM of `model`, a device, an IOAS, a nest-parent and a plain paging HWPT on it. */
async function scene(model: IommuModel, fiveLevel: boolean, dev: { pasid: boolean; dirty: boolean }) {
  const vm = await env.vm(model, { fiveLevel });
  const devId = await bind(vm, { name: "0000:00:01.0", ...dev });
  const ioasId = await ioas(vm);
  const nestParent = await pagingHwpt(vm, devId, ioasId, { nestParent: true, pasid: true });
  const plain = await pagingHwpt(vm, devId, ioasId);
  return { vm, devId, ioasId, nestParent, plain };
}

async function settleAndDestroy<T>(vm: Vm, run: () => Promise<T>): Promise<T> {
  try {
    return await run();
  } finally {
    await vm.client.destroyVm({ vmId: vm.id });
  }
}

// ---------------------------------------------------------------------------
// AllocHwpt data

/** Mostly false: invalid flags are covered without drowning the valid cases. */
const rarely = fc.oneof({ weight: 7, arbitrary: fc.constant(false) }, { weight: 1, arbitrary: fc.constant(true) });

const vtdS1Arb = fc.record({
  sre: rarely,
  eafe: fc.boolean(),
  wpe: fc.boolean(),
  pgtblAddr: fc.oneof(u64, fc.bigInt({ min: 0n, max: 1n << 30n })),
  addrWidth: fc.oneof({ weight: 4, arbitrary: fc.constantFrom(48, 57) }, { weight: 1, arbitrary: fc.constantFrom(0, 39, 47, 56, 64) }, { weight: 1, arbitrary: u32 }),
});
const vtdDataArb = fc.record({ kind: fc.constant("vtd" as const), s1: vtdS1Arb });
const selftestDataArb = fc.record({ kind: fc.constant("selftest" as const), iotlb: u32 });

/** Random scenarios, biased towards data of the VM's own model so that successes are frequent. */
const allocArb = modelArb.chain((model) =>
  fc.record({
    model: fc.constant(model),
    fiveLevel: fc.boolean(),
    dev: fc.record({ pasid: fc.boolean(), dirty: fc.boolean() }),
    target: fc.oneof(
      { weight: 5, arbitrary: fc.constant("nestParent" as const) },
      { weight: 1, arbitrary: fc.constantFrom("ioas" as const, "plain" as const, "missing" as const) },
    ),
    flags: fc.record({ nestParent: rarely, dirtyTracking: rarely, pasid: fc.boolean() }),
    data: fc.oneof(
      { weight: 3, arbitrary: model === IommuModel.INTEL_VTD ? vtdDataArb : selftestDataArb },
      { weight: 1, arbitrary: model === IommuModel.INTEL_VTD ? selftestDataArb : vtdDataArb },
    ),
    attachPasid: fc.option(fc.constantFrom(1, 1024, (1 << 20) - 1), { nil: undefined }),
  }),
);
type AllocCase = typeof allocArb extends fc.Arbitrary<infer T> ? T : never;

type HwptData = NonNullable<RequestOf<"allocHwpt">["data"]>;

function typedData(c: AllocCase): HwptData {
  return c.data.kind === "vtd" ? { case: "vtdS1", value: c.data.s1 } : { case: "selftest", value: { iotlb: c.data.iotlb } };
}

function rawData(c: AllocCase): HwptData {
  const value =
    c.data.kind === "vtd"
      ? { dataType: IOMMU_HWPT_DATA_VTD_S1, data: vtdS1Bytes({ flags: vtdS1Flags(c.data.s1), pgtblAddr: c.data.s1.pgtblAddr, addrWidth: c.data.s1.addrWidth }) }
      : { dataType: IOMMU_HWPT_DATA_SELFTEST, data: selftestHwptBytes(c.data.iotlb) };
  return { case: "raw", value };
}

/** Allocates with `data`, then attaches the device to the result and dumps its IOTLB. */
async function runAlloc(c: AllocCase, data: HwptData) {
  const s = await scene(c.model, c.fiveLevel, c.dev);
  return settleAndDestroy(s.vm, async () => {
    const ptId = { ioas: s.ioasId, nestParent: s.nestParent, plain: s.plain, missing: 77 }[c.target];
    const alloc = await outcome(s.vm.v.allocHwpt({ devId: s.devId, ptId, ...c.flags, data }), (r) => r.hwptId);
    const result: Record<string, unknown> = { alloc };
    if ("ok" in alloc) {
      const hwptId = alloc.ok as number;
      result.attach = await outcome(s.vm.v.attachDevice({ devId: s.devId, ptId: hwptId, ...(c.attachPasid !== undefined && { pasid: c.attachPasid }) }), (r) => r.hwptId);
      result.iotlb = await outcome(s.vm.v.dumpIotlb({ hwptId }), (r) => ({ selftest: [...r.selftestIotlb], entries: r.entries.length }));
    }
    result.objectCount = await objectCount(s.vm);
    result.nextId = await nextId(s.vm);
    return result;
  });
}

// ---------------------------------------------------------------------------
// Invalidate entries

const vtdEntryArb = fc.record({
  addr: fc.oneof(
    { weight: 2, arbitrary: fc.constant(0n) },
    { weight: 6, arbitrary: fc.bigInt({ min: 0n, max: (1n << 40n) - 1n }).map((x) => x * 4096n) },
    { weight: 1, arbitrary: fc.bigInt({ min: 0n, max: 1n << 32n }) },
    { weight: 1, arbitrary: u64 },
  ),
  npages: fc.oneof(fc.constant(U64_MAX), fc.constantFrom(0n, 1n, 2n, 3n, 512n), fc.bigInt({ min: 0n, max: 1n << 20n }), u64),
  leaf: fc.boolean(),
});
const selftestEntryArb = fc.record({
  iotlbId: fc.oneof({ weight: 6, arbitrary: fc.integer({ min: 0, max: 3 }) }, { weight: 1, arbitrary: fc.integer({ min: 4, max: 5 }) }, { weight: 1, arbitrary: u32 }),
  all: fc.boolean(),
});

const vtdEntriesArb = fc.record({ kind: fc.constant("vtd" as const), list: fc.array(vtdEntryArb, { maxLength: 5 }) });
const selftestEntriesArb = fc.record({ kind: fc.constant("selftest" as const), list: fc.array(selftestEntryArb, { maxLength: 5 }) });

/** Random scenarios, biased towards entries of the VM's own model and the nested HWPT as target. */
const invArb = modelArb.chain((model) =>
  fc.record({
    model: fc.constant(model),
    target: fc.oneof({ weight: 6, arbitrary: fc.constant("nested" as const) }, { weight: 1, arbitrary: fc.constantFrom("parent" as const, "missing" as const) }),
    entries: fc.oneof(
      { weight: 3, arbitrary: model === IommuModel.INTEL_VTD ? vtdEntriesArb : selftestEntriesArb },
      { weight: 1, arbitrary: model === IommuModel.INTEL_VTD ? selftestEntriesArb : vtdEntriesArb },
    ),
    iotlb: u32,
  }),
);
type InvCase = typeof invArb extends fc.Arbitrary<infer T> ? T : never;
type Requests = NonNullable<RequestOf<"invalidate">["requests"]>;

function typedRequests(c: InvCase): Requests {
  return c.entries.kind === "vtd"
    ? { case: "vtdS1", value: { entries: c.entries.list } }
    : { case: "selftest", value: { entries: c.entries.list } };
}

function rawRequests(c: InvCase): Requests {
  return c.entries.kind === "vtd"
    ? rawVtd(c.entries.list.map((e) => ({ addr: e.addr, npages: e.npages, flags: e.leaf ? IOMMU_VTD_INV_FLAGS_LEAF : 0 })))
    : rawSelftest(c.entries.list.map((e) => ({ flags: e.all ? IOMMU_TEST_INVALIDATE_FLAG_ALL : 0, iotlbId: e.iotlbId })));
}

async function runInvalidate(c: InvCase, requests: Requests) {
  const s = await scene(c.model, false, { pasid: false, dirty: true });
  return settleAndDestroy(s.vm, async () => {
    const data: HwptData =
      c.model === IommuModel.INTEL_VTD
        ? { case: "vtdS1", value: { sre: false, eafe: false, wpe: false, pgtblAddr: 0x1000n, addrWidth: 48 } }
        : { case: "selftest", value: { iotlb: c.iotlb } };
    const nested = (await s.vm.v.allocHwpt({ devId: s.devId, ptId: s.nestParent, data })).hwptId;
    await s.vm.v.attachDevice({ devId: s.devId, ptId: nested });
    const hwptId = { nested, parent: s.nestParent, missing: 99 }[c.target];
    const result = await outcome(s.vm.v.invalidate({ hwptId, requests }), (r) => r.entriesHandled);
    const iotlb = await s.vm.v.dumpIotlb({ hwptId: nested });
    const { stats } = await s.vm.v.getStats();
    return { result, iotlb: { selftest: [...iotlb.selftestIotlb], entries: iotlb.entries.length }, handledTotal: stats!.invalidationEntries };
  });
}

// ---------------------------------------------------------------------------

describe("typed vs raw (api.md: the typed cases behave exactly as their raw encoding)", () => {
  it(`AllocHwpt: typed vtd_s1/selftest data and its RawHwptData encoding give the same ids, attach result, IOTLB and errors (${RUNS} runs, MOCK and INTEL_VTD)`, async () => {
    await fc.assert(
      fc.asyncProperty(allocArb, async (c) => {
        const typed = await runAlloc(c, typedData(c));
        const raw = await runAlloc(c, rawData(c));
        expect(raw).toEqual(typed);
        for (const o of [typed.alloc, typed.attach, typed.iotlb]) if (o) expectWellFormed(o as Outcome);
      }),
      { numRuns: RUNS, seed: 0x10fd },
    );
  });

  it(`Invalidate: typed vtd_s1/selftest entries and their RawInvalidations encoding give the same entries_handled, errno, IOTLB and counters (${RUNS} runs)`, async () => {
    await fc.assert(
      fc.asyncProperty(invArb, async (c) => {
        const typed = await runInvalidate(c, typedRequests(c));
        const raw = await runInvalidate(c, rawRequests(c));
        expect(raw).toEqual(typed);
        expectWellFormed(typed.result);
        // Invalidate always reports entries_handled, and never more than the entries given.
        const handled = "ok" in typed.result ? (typed.result.ok as number) : typed.result.entriesHandled;
        expect(handled).toBeDefined();
        expect(handled!).toBeLessThanOrEqual(c.entries.list.length);
        expect(typed.handledTotal).toBe(BigInt(handled!));
      }),
      { numRuns: RUNS, seed: 0xbeef },
    );
  });
});

describe("arbitrary raw payloads (api.md Errors: no input may produce INTERNAL or UNKNOWN)", () => {
  it(`AllocHwpt with any data_type and bytes answers an errno with its gRPC code, or a HWPT (${RUNS} runs)`, async () => {
    const vms = { [IommuModel.MOCK]: await scene(IommuModel.MOCK, false, { pasid: true, dirty: true }), [IommuModel.INTEL_VTD]: await scene(IommuModel.INTEL_VTD, true, { pasid: true, dirty: true }) };
    await fc.assert(
      fc.asyncProperty(
        modelArb,
        fc.constantFrom("ioas", "nestParent", "plain") as fc.Arbitrary<"ioas" | "nestParent" | "plain">,
        fc.oneof(fc.constantFrom(0, IOMMU_HWPT_DATA_VTD_S1, 2, IOMMU_HWPT_DATA_SELFTEST), u32),
        fc.uint8Array({ maxLength: 40 }),
        async (model, target, dataType, data) => {
          const s = vms[model];
          const ptId = { ioas: s.ioasId, nestParent: s.nestParent, plain: s.plain }[target];
          const o = await outcome(s.vm.v.allocHwpt({ devId: s.devId, ptId, data: { case: "raw", value: { dataType, data } } }), (r) => r.hwptId);
          expectWellFormed(o);
          if ("ok" in o) await s.vm.v.destroy({ id: o.ok as number });
        },
      ),
      { numRuns: RUNS, seed: 0xa11c },
    );
  });

  it(`Invalidate with any data_type, entry_len, entry_num and bytes answers entries_handled within bounds (${RUNS} runs)`, async () => {
    const targets: { vm: Vm; nested: number }[] = [];
    for (const model of [IommuModel.MOCK, IommuModel.INTEL_VTD]) {
      const s = await scene(model, false, { pasid: false, dirty: true });
      const data: HwptData = model === IommuModel.INTEL_VTD ? { case: "vtdS1", value: { sre: false, eafe: false, wpe: false, pgtblAddr: 0n, addrWidth: 48 } } : { case: "selftest", value: { iotlb: 1 } };
      targets.push({ vm: s.vm, nested: (await s.vm.v.allocHwpt({ devId: s.devId, ptId: s.nestParent, data })).hwptId });
    }
    await fc.assert(
      fc.asyncProperty(
        fc.constantFrom(0, 1),
        fc.oneof(fc.constantFrom(0, 0xdeadbeef, 0xdadbeef, 1), u32),
        fc.oneof(fc.constantFrom(0, 8, 12, 23, 24, 25), u32),
        fc.oneof(fc.integer({ min: 0, max: 6 }), u32),
        fc.uint8Array({ maxLength: 150 }),
        async (which, dataType, entryLen, entryNum, data) => {
          const s = targets[which];
          const o = await outcome(s.vm.v.invalidate({ hwptId: s.nested, requests: { case: "raw", value: { dataType, entryLen, entryNum, data } } }), (r) => r.entriesHandled);
          expectWellFormed(o);
          const handled = "ok" in o ? (o.ok as number) : o.entriesHandled;
          expect(handled).toBeDefined();
          expect(handled!).toBeLessThanOrEqual(entryNum);
          if (entryLen > 0) expect(handled!).toBeLessThanOrEqual(Math.floor(data.length / entryLen));
        },
      ),
      { numRuns: RUNS, seed: 0x5eed },
    );
  });
});
