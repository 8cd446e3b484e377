/**
 * "Nothing lost": every mutating RPC, swept with fault injection the way the
 * kernel's tools/testing/selftests/iommu/iommufd_fail_nth.c sweeps an ioctl
 * with /proc/self/task/<tid>/fail-nth. For n = 1, 2, ...: build the fixture
 * afresh (as TEST_FAIL_NTH re-runs the fixture's setup), arm failNth(n), call
 * the RPC through a real server and client; while it fails with ENOMEM, the
 * whole state must be what it was before the call; the sweep ends when the
 * call succeeds without reaching the n-th fault point.
 *
 * "State" is everything a later call could observe: captureVm() and
 * capturePages() of every VM, each object's users count, the ids the
 * allocator holds, device names, each IOAS's reserved ranges, alignment,
 * quota usage and domain list, every paging domain's page-table contents
 * (mock pfns; VT-d second-stage leaves and links), VT-d tags and nested
 * children, the IOTLB (DumpIotlb), GetStats, GetIovaRanges, ListVms, the
 * tenant's usage, and Translate results (addresses, references, faults, IOTLB
 * hits) over the mapped IOVAs of every attached device and PASID.
 *
 * Invalidate is the one RPC whose failure keeps a trace by contract: the
 * entries before the failing one are handled and reported in
 * entries_handled (iommufd-semantics.md §3.10). Its failed state must equal
 * that of a successful Invalidate of exactly those entries.
 *
 * Fixtures follow the kernel's: mock_domain (a mock device attached to an
 * IOAS), nested on MOCK (nest parent + selftest nested HWPT) and INTEL_VTD
 * nested (stage 1 written in guest RAM over a nest-parent stage 2).
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { IommufdError, type IommufdClient, type VmMethods } from "../../client/client.js";
import { Stage1PageTable, SZ_2M, SZ_4K } from "../../client/pagetable.js";
import { IommuOption } from "../../gen/iommufd/v1/ioas_pb.js";
import { IommuModel } from "../../gen/iommufd/v1/vm_pb.js";
import { SecondStageTable, SS_PS, SS_R, SS_W } from "../../server/core/drivers/vtd/second-stage.js";
import { VtdDriver } from "../../server/core/drivers/vtd/vtd-driver.js";
import { failNth } from "../../server/core/fail-nth.js";
import { Device, HwptNested, HwptPaging, Ioas } from "../../server/core/objects.js";
import { capturePages, captureVm } from "../../server/core/vm-state.js";
import type { Vm } from "../../server/core/vm.js";
import { startTestServer, type TestServer } from "../helpers/server.js";

const MIB = 1n << 20n;
const BUF = 0x200000n;
const MOCK_APERTURE_START = 1n << 24n;
const U64_MAX = (1n << 64n) - 1n;
/** iommufd_fail_nth.c gives up at 400 iterations; so do we. */
const MAX_N = 400;
/** The fixture VM. */
const FX = "fx";

let t: TestServer;
let client: IommufdClient;

beforeAll(async () => {
  t = await startTestServer();
  client = t.client;
});

afterAll(async () => {
  failNth.disarm();
  await t?.close();
});

// ---------------------------------------------------------------------------
// Fixtures (each builds VM "fx" in an empty server)

interface Fixture {
  readonly v: VmMethods;
  readonly ids: Record<string, number>;
  /** IOVAs to probe beside the areas' (stage-1 IOVAs of a nested VT-d domain). */
  readonly extraIovas?: readonly bigint[];
  /** Anything else the call needs (an exported snapshot). */
  snapshot?: Buffer;
}

const bindReq = (name: string, pasid = true) => ({ name, pasidCapable: pasid, dirtyTrackingCapable: true });

async function createVm(vmId: string, model: IommuModel): Promise<VmMethods> {
  await client.createVm({ vmId, model, guestMemoryBytes: 32n * MIB });
  return client.vm(vmId);
}

/** FIXTURE(mock_domain): a mock device attached to an IOAS (auto domain), 64 KiB mapped, a page of RAM written. */
async function mockDomain(): Promise<Fixture> {
  const v = await createVm(FX, IommuModel.MOCK);
  const { devId: dev } = await v.bindDevice(bindReq("0000:00:01.0"));
  const { ioasId: ioas } = await v.allocIoas();
  const { hwptId: hwpt } = await v.attachDevice({ devId: dev, ptId: ioas });
  await v.mapIoas({ ioasId: ioas, userVa: BUF, length: 0x10000n, iova: MOCK_APERTURE_START, readable: true, writeable: true });
  await v.writeGuestMemory({ gpa: BUF, data: new Uint8Array(4096).fill(0xa5) });
  return { v, ids: { dev, ioas, hwpt } };
}

/** mock_domain plus a second, unattached PASID-capable device. */
async function mockDomainTwoDevices(): Promise<Fixture> {
  const fx = await mockDomain();
  const { devId: dev2 } = await fx.v.bindDevice(bindReq("0000:00:02.0"));
  return { ...fx, ids: { ...fx.ids, dev2 } };
}

/** FIXTURE(iommufd_mock_nested): a nest-parent paging HWPT, a selftest nested HWPT on it, the device attached to it. */
async function mockNested(): Promise<Fixture> {
  const v = await createVm(FX, IommuModel.MOCK);
  const { devId: dev } = await v.bindDevice(bindReq("0000:00:01.0"));
  const { ioasId: ioas } = await v.allocIoas();
  await v.mapIoas({ ioasId: ioas, userVa: BUF, length: 0x10000n, iova: MOCK_APERTURE_START, readable: true, writeable: true });
  const { hwptId: parent } = await v.allocHwpt({ devId: dev, ptId: ioas, nestParent: true });
  const { hwptId: nested } = await v.allocHwpt({ devId: dev, ptId: parent, data: { case: "selftest", value: { iotlb: 0xbadbeef } } });
  await v.attachDevice({ devId: dev, ptId: nested });
  await v.writeGuestMemory({ gpa: BUF, data: new Uint8Array(8192).fill(0x5a) });
  return { v, ids: { dev, ioas, parent, nested } };
}

const S1_IOVA = 0x4000_0000n;

/**
 * INTEL_VTD nested: guest RAM [0, 8 MiB) identity-mapped in an IOAS, a
 * nest-parent HWPT on it, a guest stage 1 (4 KiB and 2 MiB leaves) in guest
 * RAM, a nested HWPT on it with the device attached; a second device on the
 * nest parent directly (so the IOAS's one domain has a nested child and a
 * stage-2 user, both with cached translations once probed).
 */
async function vtdNested(): Promise<Fixture> {
  const v = await createVm(FX, IommuModel.INTEL_VTD);
  const { devId: dev } = await v.bindDevice(bindReq("0000:00:01.0"));
  const { devId: dev2 } = await v.bindDevice(bindReq("0000:00:02.0"));
  const { ioasId: ioas } = await v.allocIoas();
  await v.mapIoas({ ioasId: ioas, userVa: 0n, length: 8n * MIB, iova: 0n, readable: true, writeable: true });
  const { hwptId: parent } = await v.allocHwpt({ devId: dev, ptId: ioas, nestParent: true });
  const s1 = new Stage1PageTable(v, { tableBase: 0x100000n, tableBytes: 0x100000n });
  await s1.map(S1_IOVA, 0x300000n, SZ_4K);
  await s1.map(S1_IOVA + SZ_4K, 0x301000n, SZ_4K);
  await s1.map(S1_IOVA + SZ_2M, 0x400000n, SZ_2M);
  const { hwptId: nested } = await v.allocHwpt({
    devId: dev,
    ptId: parent,
    data: { case: "vtdS1", value: { sre: false, eafe: false, wpe: false, pgtblAddr: s1.root, addrWidth: s1.addrWidth } },
  });
  await v.attachDevice({ devId: dev, ptId: nested });
  await v.attachDevice({ devId: dev2, ptId: parent });
  return { v, ids: { dev, dev2, ioas, parent, nested }, extraIovas: [S1_IOVA, S1_IOVA + SZ_4K + 0x123n, S1_IOVA + 2n * SZ_4K, S1_IOVA + SZ_2M + 0x5000n] };
}

// ---------------------------------------------------------------------------
// The state a failed call must leave as it was

interface Probe {
  readonly vmId: string;
  readonly devId: number;
  readonly pasid: number | undefined;
  readonly iovas: bigint[];
}

const vmsOf = (): Vm[] => [...t.server.vms.all()].sort((a, b) => (a.name < b.name ? -1 : 1));

/** Every leaf and link of a VT-d second-stage table, by input page number. */
function secondStageContents(table: SecondStageTable): string[] {
  const out: string[] = [];
  const walk = (index: number, level: number, basePfn: number) => {
    for (let x = 0; x < 512; x++) {
      const w = (index << 10) + 2 * x;
      const lo = table.words[w];
      const hi = table.words[w + 1];
      if ((lo & (SS_R | SS_W)) === 0) continue;
      const pfn = basePfn + x * 512 ** (level - 1);
      if (level === 1 || (lo & SS_PS) !== 0) {
        out.push(`leaf L${level} ${pfn.toString(16)} ${hi.toString(16)}:${lo.toString(16)}`);
      } else {
        out.push(`link L${level} ${pfn.toString(16)} -> ${lo >>> 12}`);
        walk(lo >>> 12, level - 1, pfn);
      }
    }
  };
  walk(0, table.levels, 0);
  return out;
}

type DomainInternals = { pfns?: Map<number, number>; table?: SecondStageTable; tags?: Map<number, number>; children?: Set<unknown> };

/** The server-side state of one VM, beyond captureVm(): what no RPC shows whole. */
function vmInternals(vm: Vm) {
  const ctx = vm.ctx;
  const objects = [...ctx.objects()].sort((a, b) => a.id - b.id);
  const hwptOfDomain = new Map<unknown, number>();
  for (const o of objects) if (o instanceof HwptPaging || o instanceof HwptNested) hwptOfDomain.set(o.domain, o.id);
  const { invalidationSeconds: _s, invalidationSecondsSum: _sum, ...counters } = ctx.stats;
  return {
    users: objects.map((o) => [o.id, o.type, o.users]),
    idsInUse: ctx.idsInUse(),
    devicesByName: [...ctx.devicesByName].map(([name, d]) => [name, d.id]).sort(),
    ioas: objects
      .filter((o): o is Ioas => o instanceof Ioas)
      .map((o) => ({
        id: o.id,
        ranges: o.iopt.iovaRanges(),
        reserved: o.iopt.reservedRanges().map((r) => ({ start: r.start, last: r.last, owner: hwptOfDomain.get(r.owner) ?? "unknown owner" })),
        alignment: o.iopt.iovaAlignment,
        mappedBytes: o.iopt.mappedBytesUsed,
        areaBytes: o.iopt.allAreas().reduce((sum, a) => sum + a.last - a.iova + 1n, 0n),
        domains: o.iopt.domains.map((d) => hwptOfDomain.get(d) ?? "unknown domain"),
      })),
    domains: objects
      .filter((o): o is HwptPaging | HwptNested => o instanceof HwptPaging || o instanceof HwptNested)
      .map((o) => {
        const d = o.domain as unknown as DomainInternals;
        return {
          id: o.id,
          pfns: d.pfns && [...d.pfns].sort((a, b) => a[0] - b[0]),
          table: d.table && { tableCount: d.table.tableCount, contents: secondStageContents(d.table) },
          tags: d.tags && [...d.tags],
          children: d.children && [...d.children].map((c) => hwptOfDomain.get(c) ?? "unknown domain"),
        };
      }),
    counters: { ...counters },
    driver: {
      iotlbOccupancy: ctx.driver.iotlbOccupancy,
      iotlbEntriesInvalidated: ctx.driver.iotlbEntriesInvalidated,
      caches: ctx.driver instanceof VtdDriver ? { fsPsc: ctx.driver.caches.fsPsc?.size, ssCache: ctx.driver.caches.ssCache?.size } : undefined,
    },
  };
}

async function settled<T>(p: Promise<T>): Promise<T | string> {
  return p.then(
    (x) => x,
    (e: unknown) => `error ${e instanceof IommufdError ? e.errno : String(e)}`,
  );
}

/** Everything but Translate (which moves counters and fills the IOTLB). */
async function state() {
  const vms = [];
  for (const vm of vmsOf()) {
    const v = client.vm(vm.id);
    const captured = captureVm(vm);
    const rpc: Record<string, unknown> = { stats: await settled(v.getStats()) };
    for (const o of captured.objects) {
      if (o.kind === "ioas") rpc[`ranges ${o.id}`] = await settled(v.getIovaRanges({ ioasId: o.id }));
      if (o.kind === "hwpt_paging" || o.kind === "hwpt_nested") rpc[`iotlb ${o.id}`] = await settled(v.dumpIotlb({ hwptId: o.id }));
    }
    // Copies: the state holds live typed arrays (counters) that later DMA would change under us.
    vms.push(structuredClone({ captured, pages: [...capturePages(vm)].map((p) => [p.gpa, p.data]), internals: vmInternals(vm) }));
    vms.push(rpc);
  }
  return { vms, usage: t.server.vms.usage(""), list: await client.listVms({ pageSize: 1000 }) };
}

/** DMA of every attached device and PASID over the mapped IOVAs (plus the fixture's extras). */
function probePlan(fx: Fixture): Probe[] {
  const probes: Probe[] = [];
  for (const vm of vmsOf()) {
    const iovas: bigint[] = [];
    for (const o of vm.ctx.objects()) {
      if (!(o instanceof Ioas)) continue;
      for (const a of o.iopt.allAreas()) iovas.push(a.iova, (a.iova + (a.last - a.iova) / 2n) & ~0xfffn, a.last & ~0xfffn, a.last + 1n);
    }
    if (vm.id === FX) iovas.push(...(fx.extraIovas ?? []));
    for (const o of vm.ctx.objects()) {
      if (!(o instanceof Device)) continue;
      probes.push({ vmId: vm.id, devId: o.id, pasid: undefined, iovas });
      for (const pasid of o.attachments.keys()) if (pasid !== 0) probes.push({ vmId: vm.id, devId: o.id, pasid, iovas });
    }
  }
  return probes;
}

async function probe(plan: readonly Probe[]) {
  const out = [];
  for (const p of plan) {
    for (const write of [false, true]) {
      const r = await settled(client.translate({ vmId: p.vmId, devId: p.devId, ...(p.pasid !== undefined && { pasid: p.pasid }), iovas: p.iovas, write }));
      out.push(
        typeof r === "string"
          ? r
          : { addresses: r.addresses, refs: r.memoryReferences, faults: r.faults.map((f) => [f.index, f.reasonName]), hits: r.iotlbHits },
      );
    }
  }
  return out;
}

// ---------------------------------------------------------------------------
// The sweep

interface Case {
  readonly name: string;
  readonly setup: () => Promise<Fixture>;
  readonly call: (fx: Fixture) => Promise<unknown>;
  /** Fault points the successful call must pass (empty: the RPC has none). */
  readonly points: readonly string[];
  /** Invalidate: the state after a failure that handled k entries is that of this call succeeding. */
  readonly prefix?: (fx: Fixture, k: number) => Promise<unknown>;
}

async function reset(): Promise<void> {
  for (const vm of vmsOf()) await client.destroyVm({ vmId: vm.id });
}

/** setup, then DMA until the caches are steady; returns the fixture, its probe plan and the DMA results. */
async function prepare(c: Case): Promise<{ fx: Fixture; plan: Probe[]; dma: unknown }> {
  await reset();
  const fx = await c.setup();
  const plan = probePlan(fx);
  await probe(plan);
  return { fx, plan, dma: await probe(plan) };
}

async function sweep(c: Case): Promise<{ failures: number; trace: readonly string[] }> {
  let failures = 0;
  for (let n = 1; n < MAX_N; n++) {
    const { fx, plan, dma } = await prepare(c);
    const before = await state();

    failNth.arm(n);
    let error: unknown;
    let ok = false;
    try {
      await c.call(fx);
      ok = true;
    } catch (e) {
      error = e;
    }
    const run = failNth.disarm();

    if (ok) {
      // Succeeded without reaching the armed point, having passed the same
      // points as every failed attempt (the fixture is deterministic).
      expect(run.failedAt, `${c.name}: succeeded although fault point ${n} was reached`).toBeUndefined();
      expect(run.passed).toBe(n - 1);
      return { failures, trace: run.trace };
    }

    const where = `${c.name}, n = ${n}${run.failedAt ? ` (${run.failedAt})` : ""}`;
    expect(error, where).toBeInstanceOf(IommufdError);
    const e = error as IommufdError;
    expect(e.errno, `${where}: ${e.message}`).toBe("ENOMEM");
    expect(run.failedAt, where).toBe(run.trace[n - 1]);
    expect(e.message, where).toContain(run.failedAt);
    failures++;

    const after = { state: await state(), dma: await probe(plan) };
    if (c.prefix === undefined) {
      expect(after.state, `${where}: state changed`).toEqual(before);
      expect(after.dma, `${where}: DMA changed`).toEqual(dma);
    } else {
      const k = e.entriesHandled;
      expect(k, `${where}: entries_handled`).toBe(n - 1);
      const ref = await prepare(c);
      if (k! > 0) await c.prefix(ref.fx, k!);
      expect(after.state, `${where}: state differs from handling ${k} entries`).toEqual(await state());
      expect(after.dma, `${where}: DMA differs from handling ${k} entries`).toEqual(await probe(ref.plan));
    }
  }
  throw new Error(`${c.name}: no success within ${MAX_N} fault points`);
}

function sweepCase(c: Case): void {
  it(c.name, { timeout: 180_000 }, async () => {
    const { failures, trace } = await sweep(c);
    if (process.env.FAIL_NTH_TRACE) console.log(`${c.name}: ${failures} failures: ${trace.join(", ")}`);
    // Every point passed was made to fail once.
    expect(failures).toBe(trace.length);
    if (c.points.length === 0) {
      expect(trace, `${c.name} has no fault points`).toEqual([]);
    } else {
      expect(failures).toBeGreaterThan(0);
      expect([...new Set(trace)].sort()).toEqual([...new Set(c.points)].sort());
    }
  });
}

// Fault point names, as the core spells them.
const OBJ = "iommufd_object_alloc";
const MOCK_PAGING = "mock_domain_alloc_paging_flags";
const MOCK_NESTED = "mock_domain_alloc_nested";
const MOCK_MAP = "mock_domain_map_pages";
const VTD_PAGING = "intel_iommu_domain_alloc_paging_flags";
const VTD_NESTED = "intel_iommu_domain_alloc_nested";
const VTD_ATTACH = "domain_attach_iommu";
const PT_ALLOC = "iommu_alloc_pages_node";
const RESV = "iopt_reserve_iova";
const XA_RESERVE = "xa_reserve";
const FILL = "iopt_area_fill_domains";
const AREA = "iopt_alloc_area";
const PAGES = "iopt_alloc_user_pages";
const GET_PAGES = "iopt_get_pages";
const HW_ATTACH = "iommufd_hw_pagetable_attach";
const ATTACH_HANDLE = "iommufd_hwpt_attach_device";
const REPLACE_HANDLE = "iommufd_hwpt_replace_device";
const ALLOC_PAGE = "alloc_page";

/** A paging HWPT joining an IOAS that has areas (iommufd_hwpt_paging_alloc() + iopt_table_add_domain()). */
const MOCK_ADD_DOMAIN = [MOCK_PAGING, OBJ, RESV, XA_RESERVE, FILL, MOCK_MAP];
const VTD_ADD_DOMAIN = [VTD_PAGING, OBJ, RESV, XA_RESERVE, FILL, PT_ALLOC];

// ---------------------------------------------------------------------------

describe("VM lifecycle", () => {
  sweepCase({
    name: "CreateVm (MOCK)",
    setup: mockDomain,
    call: () => client.createVm({ vmId: "new", model: IommuModel.MOCK, guestMemoryBytes: 16n * MIB }),
    points: ["iommufd_fops_open"],
  });
  sweepCase({
    name: "CreateVm (INTEL_VTD)",
    setup: mockDomain,
    call: () => client.createVm({ vmId: "new", model: IommuModel.INTEL_VTD, guestMemoryBytes: 16n * MIB, options: { pagingStructureCaches: true } }),
    points: ["iommufd_fops_open"],
  });
  sweepCase({
    name: "DestroyVm",
    setup: vtdNested,
    call: () => client.destroyVm({ vmId: FX }),
    points: [],
  });
  sweepCase({
    name: "ImportVm (MOCK: nested, two domains, RAM)",
    setup: async () => {
      const fx = await mockNested();
      const { devId: dev2 } = await fx.v.bindDevice(bindReq("0000:00:02.0"));
      await fx.v.attachDevice({ devId: dev2, ptId: fx.ids.ioas });
      fx.snapshot = await client.exportVm({ vmId: FX });
      return fx;
    },
    call: (fx) => client.importVm({ vmId: "imported", snapshot: fx.snapshot! }),
    // restoreObjects(): the areas before any domain, then each domain filled as it joins.
    points: ["iommufd_fops_open", OBJ, AREA, MOCK_PAGING, RESV, XA_RESERVE, FILL, MOCK_MAP, MOCK_NESTED, ALLOC_PAGE],
  });
  sweepCase({
    name: "ImportVm (INTEL_VTD nested)",
    setup: async () => {
      const fx = await vtdNested();
      fx.snapshot = await client.exportVm({ vmId: FX });
      return fx;
    },
    call: (fx) => client.importVm({ vmId: "imported", snapshot: fx.snapshot! }),
    points: ["iommufd_fops_open", OBJ, AREA, VTD_PAGING, RESV, XA_RESERVE, FILL, PT_ALLOC, VTD_NESTED, VTD_ATTACH, ALLOC_PAGE],
  });
});

describe("IOAS", () => {
  sweepCase({ name: "AllocIoas", setup: mockDomain, call: (fx) => fx.v.allocIoas(), points: [OBJ] });
  const mapPoints = [PAGES, AREA, FILL, MOCK_MAP];
  sweepCase({
    name: "MapIoas fixed (mock_domain)",
    setup: mockDomain,
    call: (fx) => fx.v.mapIoas({ ioasId: fx.ids.ioas, userVa: BUF + 0x10000n, length: 0x8000n, iova: MOCK_APERTURE_START + 0x100000n, readable: true, writeable: true }),
    points: mapPoints,
  });
  sweepCase({
    name: "MapIoas auto (mock_domain)",
    setup: mockDomain,
    call: (fx) => fx.v.mapIoas({ ioasId: fx.ids.ioas, userVa: BUF + 0x20000n, length: 0x4000n, readable: true, writeable: false }),
    points: mapPoints,
  });
  sweepCase({
    name: "MapIoas fixed into two domains (mock_domain + a manual HWPT): iopt_area_fill_domains() unwinds the first",
    setup: async () => {
      const fx = await mockDomain();
      const { hwptId: hwpt2 } = await fx.v.allocHwpt({ devId: fx.ids.dev, ptId: fx.ids.ioas, dirtyTracking: true });
      return { ...fx, ids: { ...fx.ids, hwpt2 } };
    },
    call: (fx) => fx.v.mapIoas({ ioasId: fx.ids.ioas, userVa: BUF, length: 0x4000n, iova: MOCK_APERTURE_START + 0x200000n, readable: true, writeable: true }),
    points: mapPoints,
  });
  sweepCase({
    name: "MapIoas into an IOAS without domains",
    setup: async () => {
      const fx = await mockDomain();
      const { ioasId: ioas2 } = await fx.v.allocIoas();
      return { ...fx, ids: { ...fx.ids, ioas2 } };
    },
    call: (fx) => fx.v.mapIoas({ ioasId: fx.ids.ioas2, userVa: BUF, length: 0x4000n, readable: true, writeable: true }),
    points: [PAGES, AREA],
  });
  sweepCase({
    name: "MapIoas fixed (INTEL_VTD nested: new second-stage tables under a parent with a nested child)",
    setup: vtdNested,
    // 1 GiB up: a new level-3 table, then a 2 MiB leaf and a level-1 table for the 4 KiB tail.
    call: (fx) => fx.v.mapIoas({ ioasId: fx.ids.ioas, userVa: 0x600000n, length: SZ_2M + SZ_4K, iova: 0x4000_0000n, readable: true, writeable: true }),
    points: [PAGES, AREA, FILL, PT_ALLOC],
  });
  sweepCase({
    name: "MapIoas fixed into two domains (INTEL_VTD nested + a paging HWPT): the unwind keeps the nested child's IOTLB",
    setup: async () => {
      const fx = await vtdNested();
      const { hwptId: hwpt2 } = await fx.v.allocHwpt({ devId: fx.ids.dev2, ptId: fx.ids.ioas });
      return { ...fx, ids: { ...fx.ids, hwpt2 } };
    },
    call: (fx) => fx.v.mapIoas({ ioasId: fx.ids.ioas, userVa: 0x600000n, length: SZ_2M, iova: 0x4000_0000n, readable: true, writeable: true }),
    points: [PAGES, AREA, FILL, PT_ALLOC],
  });
  sweepCase({
    name: "MapIoas over empty tables an unmap left (INTEL_VTD, two domains): the superpage that replaced one is undone",
    setup: async () => {
      const fx = await vtdNested();
      const { hwptId: hwpt2 } = await fx.v.allocHwpt({ devId: fx.ids.dev2, ptId: fx.ids.ioas });
      // A 4 KiB mapping builds level-2 and level-1 tables at 1 GiB in both domains; its unmap leaves them empty.
      await fx.v.mapIoas({ ioasId: fx.ids.ioas, userVa: 0x600000n, length: SZ_4K, iova: 0x4000_0000n, readable: true, writeable: true });
      await fx.v.unmapIoas({ ioasId: fx.ids.ioas, iova: 0x4000_0000n, length: SZ_4K });
      return { ...fx, ids: { ...fx.ids, hwpt2 } };
    },
    // A 2 MiB leaf replaces the empty level-1 table, then the 4 KiB tail needs a new one.
    call: (fx) => fx.v.mapIoas({ ioasId: fx.ids.ioas, userVa: 0x600000n, length: SZ_2M + SZ_4K, iova: 0x4000_0000n, readable: true, writeable: true }),
    points: [PAGES, AREA, FILL, PT_ALLOC],
  });
  sweepCase({
    name: "MapIoas auto (INTEL_VTD nested)",
    setup: vtdNested,
    call: (fx) => fx.v.mapIoas({ ioasId: fx.ids.ioas, userVa: 0x700000n, length: 3n * SZ_4K, readable: true, writeable: true }),
    points: [PAGES, AREA, FILL, PT_ALLOC],
  });
  sweepCase({
    name: "UnmapIoas (mock_domain)",
    setup: mockDomain,
    call: (fx) => fx.v.unmapIoas({ ioasId: fx.ids.ioas, iova: MOCK_APERTURE_START, length: 0x10000n }),
    points: [],
  });
  sweepCase({
    name: "UnmapIoas all (INTEL_VTD nested)",
    setup: vtdNested,
    call: (fx) => fx.v.unmapIoas({ ioasId: fx.ids.ioas, iova: 0n, length: U64_MAX }),
    points: [],
  });
  sweepCase({
    name: "CopyIoas across two areas into an IOAS with a domain (mock)",
    setup: async () => {
      const fx = await mockDomain();
      await fx.v.mapIoas({ ioasId: fx.ids.ioas, userVa: BUF + 0x40000n, length: 0x10000n, iova: MOCK_APERTURE_START + 0x10000n, readable: true, writeable: true });
      const { ioasId: ioas2 } = await fx.v.allocIoas();
      await fx.v.allocHwpt({ devId: fx.ids.dev, ptId: ioas2 });
      return { ...fx, ids: { ...fx.ids, ioas2 } };
    },
    call: (fx) =>
      fx.v.copyIoas({ dstIoasId: fx.ids.ioas2, srcIoasId: fx.ids.ioas, srcIova: MOCK_APERTURE_START + 0x8000n, length: 0x10000n, readable: true, writeable: true }),
    points: [GET_PAGES, AREA, FILL, MOCK_MAP],
  });
  sweepCase({
    name: "CopyIoas within one IOAS (INTEL_VTD nested)",
    setup: vtdNested,
    call: (fx) => fx.v.copyIoas({ dstIoasId: fx.ids.ioas, srcIoasId: fx.ids.ioas, srcIova: 0x200000n, length: SZ_2M, dstIova: 0x8000_0000n, readable: true, writeable: true }),
    points: [GET_PAGES, AREA, FILL, PT_ALLOC],
  });
  sweepCase({
    name: "AllowIovas (mock_domain)",
    setup: mockDomain,
    call: (fx) =>
      fx.v.allowIovas({
        ioasId: fx.ids.ioas,
        ranges: [
          { start: 0x200_0000n, last: 0x2ff_ffffn },
          { start: 0x400_0000n, last: 0x4ff_ffffn },
        ],
      }),
    points: ["iommufd_ioas_load_iovas"],
  });
  sweepCase({
    name: "SetOption HUGE_PAGES",
    setup: async () => {
      const fx = await mockDomain();
      const { ioasId: ioas2 } = await fx.v.allocIoas();
      await fx.v.mapIoas({ ioasId: ioas2, userVa: BUF, length: 0x4000n, readable: true, writeable: true });
      return { ...fx, ids: { ...fx.ids, ioas2 } };
    },
    call: (fx) => fx.v.setOption({ option: IommuOption.HUGE_PAGES, objectId: fx.ids.ioas2, value: 0n }),
    points: [],
  });
});

describe("devices", () => {
  sweepCase({ name: "BindDevice", setup: mockDomain, call: (fx) => fx.v.bindDevice(bindReq("0000:00:09.0")), points: ["iommufd_get_group", OBJ] });
  sweepCase({ name: "UnbindDevice (attached, last user of its auto domain)", setup: mockDomain, call: (fx) => fx.v.unbindDevice({ devId: fx.ids.dev }), points: [] });
  sweepCase({
    name: "DetachDevice (last user of its auto domain)",
    setup: mockDomain,
    call: (fx) => fx.v.detachDevice({ devId: fx.ids.dev }),
    points: [],
  });
  sweepCase({
    name: "AttachDevice IOAS -> existing auto domain (mock_domain)",
    setup: mockDomainTwoDevices,
    call: (fx) => fx.v.attachDevice({ devId: fx.ids.dev2, ptId: fx.ids.ioas }),
    points: [HW_ATTACH, ATTACH_HANDLE],
  });
  sweepCase({
    name: "AttachDevice IOAS -> new auto domain (mock)",
    setup: async () => {
      const fx = await mockDomainTwoDevices();
      const { ioasId: ioas2 } = await fx.v.allocIoas();
      await fx.v.mapIoas({ ioasId: ioas2, userVa: BUF, length: 0x8000n, iova: MOCK_APERTURE_START, readable: true, writeable: true });
      await fx.v.mapIoas({ ioasId: ioas2, userVa: BUF, length: 0x8000n, iova: MOCK_APERTURE_START + 0x8000n, readable: true, writeable: false });
      return { ...fx, ids: { ...fx.ids, ioas2 } };
    },
    call: (fx) => fx.v.attachDevice({ devId: fx.ids.dev2, ptId: fx.ids.ioas2 }),
    points: [...MOCK_ADD_DOMAIN, HW_ATTACH, ATTACH_HANDLE],
  });
  sweepCase({
    name: "AttachDevice IOAS -> new auto domain (INTEL_VTD)",
    setup: async () => {
      const fx = await vtdNested();
      const { devId: dev3 } = await fx.v.bindDevice(bindReq("0000:00:03.0"));
      const { ioasId: ioas2 } = await fx.v.allocIoas();
      await fx.v.mapIoas({ ioasId: ioas2, userVa: 0x200000n, length: SZ_2M + 2n * SZ_4K, iova: 0x10_0000_0000n, readable: true, writeable: true });
      return { ...fx, ids: { ...fx.ids, dev3, ioas2 } };
    },
    call: (fx) => fx.v.attachDevice({ devId: fx.ids.dev3, ptId: fx.ids.ioas2 }),
    points: [...VTD_ADD_DOMAIN, HW_ATTACH, ATTACH_HANDLE, VTD_ATTACH],
  });
  sweepCase({
    name: "AttachDevice HWPT (mock paging)",
    setup: async () => {
      const fx = await mockDomainTwoDevices();
      const { hwptId: manual } = await fx.v.allocHwpt({ devId: fx.ids.dev2, ptId: fx.ids.ioas });
      return { ...fx, ids: { ...fx.ids, manual } };
    },
    call: (fx) => fx.v.attachDevice({ devId: fx.ids.dev2, ptId: fx.ids.manual }),
    points: [HW_ATTACH, ATTACH_HANDLE],
  });
  sweepCase({
    name: "AttachDevice nested HWPT (mock)",
    setup: async () => {
      const fx = await mockNested();
      const { devId: dev2 } = await fx.v.bindDevice(bindReq("0000:00:02.0"));
      return { ...fx, ids: { ...fx.ids, dev2 } };
    },
    call: (fx) => fx.v.attachDevice({ devId: fx.ids.dev2, ptId: fx.ids.nested }),
    points: [HW_ATTACH, ATTACH_HANDLE],
  });
  sweepCase({
    name: "AttachDevice nested HWPT (INTEL_VTD)",
    setup: async () => {
      const fx = await vtdNested();
      const { devId: dev3 } = await fx.v.bindDevice(bindReq("0000:00:03.0"));
      return { ...fx, ids: { ...fx.ids, dev3 } };
    },
    call: (fx) => fx.v.attachDevice({ devId: fx.ids.dev3, ptId: fx.ids.nested }),
    points: [HW_ATTACH, ATTACH_HANDLE, VTD_ATTACH],
  });
  sweepCase({
    name: "AttachDevice PASID (mock)",
    setup: async () => {
      const fx = await mockDomainTwoDevices();
      const { hwptId: pasidHwpt } = await fx.v.allocHwpt({ devId: fx.ids.dev2, ptId: fx.ids.ioas, pasid: true });
      return { ...fx, ids: { ...fx.ids, pasidHwpt } };
    },
    call: (fx) => fx.v.attachDevice({ devId: fx.ids.dev2, ptId: fx.ids.pasidHwpt, pasid: 5 }),
    points: [HW_ATTACH, ATTACH_HANDLE],
  });
  sweepCase({
    name: "AttachDevice PASID (INTEL_VTD nested with the PASID flag)",
    setup: async () => {
      const fx = await vtdNested();
      // A third device, its RID unattached: a PASID may go where the RID's HWPT allows (iommufd_hwpt_pasid_compat()).
      const { devId: dev3 } = await fx.v.bindDevice(bindReq("0000:00:03.0"));
      const { hwptId: pasidNested } = await fx.v.allocHwpt({
        devId: dev3,
        ptId: fx.ids.parent,
        pasid: true,
        data: { case: "vtdS1", value: { sre: false, eafe: false, wpe: false, pgtblAddr: 0x100000n, addrWidth: 48 } },
      });
      return { ...fx, ids: { ...fx.ids, dev3, pasidNested } };
    },
    call: (fx) => fx.v.attachDevice({ devId: fx.ids.dev3, ptId: fx.ids.pasidNested, pasid: 7 }),
    points: [HW_ATTACH, ATTACH_HANDLE, VTD_ATTACH],
  });
  sweepCase({
    name: "AttachDevice replace HWPT -> HWPT (mock; the old auto domain goes)",
    setup: async () => {
      const fx = await mockDomain();
      const { hwptId: manual } = await fx.v.allocHwpt({ devId: fx.ids.dev, ptId: fx.ids.ioas });
      return { ...fx, ids: { ...fx.ids, manual } };
    },
    call: (fx) => fx.v.attachDevice({ devId: fx.ids.dev, ptId: fx.ids.manual, replace: true }),
    points: [REPLACE_HANDLE],
  });
  sweepCase({
    name: "AttachDevice replace -> IOAS with a new auto domain (mock)",
    setup: async () => {
      const fx = await mockDomain();
      const { ioasId: ioas2 } = await fx.v.allocIoas();
      await fx.v.mapIoas({ ioasId: ioas2, userVa: BUF, length: 0x8000n, iova: MOCK_APERTURE_START, readable: true, writeable: true });
      return { ...fx, ids: { ...fx.ids, ioas2 } };
    },
    call: (fx) => fx.v.attachDevice({ devId: fx.ids.dev, ptId: fx.ids.ioas2, replace: true }),
    points: [...MOCK_ADD_DOMAIN, REPLACE_HANDLE],
  });
  sweepCase({
    name: "AttachDevice replace nested -> nest parent (INTEL_VTD)",
    setup: vtdNested,
    call: (fx) => fx.v.attachDevice({ devId: fx.ids.dev, ptId: fx.ids.parent, replace: true }),
    points: [REPLACE_HANDLE, VTD_ATTACH],
  });
  sweepCase({
    name: "AttachDevice replace PASID (mock)",
    setup: async () => {
      const fx = await mockDomainTwoDevices();
      const { hwptId: p1 } = await fx.v.allocHwpt({ devId: fx.ids.dev2, ptId: fx.ids.ioas, pasid: true });
      const { hwptId: p2 } = await fx.v.allocHwpt({ devId: fx.ids.dev2, ptId: fx.ids.ioas, pasid: true });
      await fx.v.attachDevice({ devId: fx.ids.dev2, ptId: p1, pasid: 5 });
      return { ...fx, ids: { ...fx.ids, p1, p2 } };
    },
    call: (fx) => fx.v.attachDevice({ devId: fx.ids.dev2, ptId: fx.ids.p2, pasid: 5, replace: true }),
    points: [REPLACE_HANDLE],
  });
});

describe("HWPTs", () => {
  for (const flags of [{}, { nestParent: true }, { dirtyTracking: true }, { pasid: true }]) {
    const label = Object.keys(flags)[0] ?? "no flags";
    sweepCase({
      name: `AllocHwpt paging, ${label} (mock_domain)`,
      setup: mockDomain,
      call: (fx) => fx.v.allocHwpt({ devId: fx.ids.dev, ptId: fx.ids.ioas, ...flags }),
      points: MOCK_ADD_DOMAIN,
    });
    sweepCase({
      name: `AllocHwpt paging, ${label} (INTEL_VTD)`,
      setup: vtdNested,
      call: (fx) => fx.v.allocHwpt({ devId: fx.ids.dev, ptId: fx.ids.ioas, ...flags }),
      points: VTD_ADD_DOMAIN,
    });
  }
  sweepCase({
    name: "AllocHwpt nested selftest (mock)",
    setup: mockNested,
    call: (fx) => fx.v.allocHwpt({ devId: fx.ids.dev, ptId: fx.ids.parent, data: { case: "selftest", value: { iotlb: 0x1234 } } }),
    points: [MOCK_NESTED, OBJ],
  });
  sweepCase({
    name: "AllocHwpt nested vtd_s1 (INTEL_VTD)",
    setup: vtdNested,
    call: (fx) =>
      fx.v.allocHwpt({ devId: fx.ids.dev, ptId: fx.ids.parent, data: { case: "vtdS1", value: { sre: false, eafe: false, wpe: false, pgtblAddr: 0x100000n, addrWidth: 48 } } }),
    points: [VTD_NESTED, OBJ],
  });
  sweepCase({
    name: "Invalidate selftest (mock nested): a failure keeps the entries before it",
    setup: mockNested,
    call: (fx) => fx.v.invalidate({ hwptId: fx.ids.nested, requests: { case: "selftest", value: { entries: [{ iotlbId: 1 }, { iotlbId: 3 }, { iotlbId: 0 }] } } }),
    prefix: (fx, k) =>
      fx.v.invalidate({ hwptId: fx.ids.nested, requests: { case: "selftest", value: { entries: [{ iotlbId: 1 }, { iotlbId: 3 }, { iotlbId: 0 }].slice(0, k) } } }),
    points: ["mock_domain_cache_invalidate_user"],
  });
  const vtdEntries = [
    Stage1PageTable.invalidation(S1_IOVA, SZ_4K),
    Stage1PageTable.invalidation(S1_IOVA + SZ_2M, SZ_2M),
    Stage1PageTable.invalidation(S1_IOVA + SZ_4K, SZ_4K),
  ];
  sweepCase({
    name: "Invalidate vtd_s1 (INTEL_VTD nested): a failure keeps the entries before it",
    setup: vtdNested,
    call: (fx) => fx.v.invalidate({ hwptId: fx.ids.nested, requests: { case: "vtdS1", value: { entries: vtdEntries } } }),
    prefix: (fx, k) => fx.v.invalidate({ hwptId: fx.ids.nested, requests: { case: "vtdS1", value: { entries: vtdEntries.slice(0, k) } } }),
    points: ["intel_nested_flush_cache"],
  });
  sweepCase({
    name: "Destroy paging HWPT (mock, areas mapped)",
    setup: async () => {
      const fx = await mockDomain();
      const { hwptId: manual } = await fx.v.allocHwpt({ devId: fx.ids.dev, ptId: fx.ids.ioas });
      return { ...fx, ids: { ...fx.ids, manual } };
    },
    call: (fx) => fx.v.destroy({ id: fx.ids.manual }),
    points: [],
  });
  sweepCase({
    name: "Destroy nested HWPT (INTEL_VTD, detached)",
    setup: async () => {
      const fx = await vtdNested();
      await fx.v.attachDevice({ devId: fx.ids.dev, ptId: fx.ids.parent, replace: true });
      return fx;
    },
    call: (fx) => fx.v.destroy({ id: fx.ids.nested }),
    points: [],
  });
  sweepCase({
    name: "Destroy IOAS (mapped, no HWPT)",
    setup: async () => {
      const fx = await mockDomain();
      const { ioasId: ioas2 } = await fx.v.allocIoas();
      await fx.v.mapIoas({ ioasId: ioas2, userVa: BUF, length: 0x4000n, readable: true, writeable: true });
      return { ...fx, ids: { ...fx.ids, ioas2 } };
    },
    call: (fx) => fx.v.destroy({ id: fx.ids.ioas2 }),
    points: [],
  });
});

describe("guest memory", () => {
  sweepCase({
    name: "WriteGuestMemory over touched and untouched pages (mock_domain)",
    setup: mockDomain,
    // From the last 16 bytes of the touched page at BUF over three untouched ones.
    call: (fx) => fx.v.writeGuestMemory({ gpa: BUF + 0xff0n, data: new Uint8Array(0x3000).fill(0x3c) }),
    points: [ALLOC_PAGE],
  });
  sweepCase({
    name: "WriteGuestMemory into a stage-1 table and beyond (INTEL_VTD nested)",
    setup: vtdNested,
    // The last entry of the stage-1 level-1 table (touched) and the page after it (not).
    call: (fx) => fx.v.writeGuestMemory({ gpa: 0x103ff8n, data: new Uint8Array(16).fill(0xff) }),
    points: [ALLOC_PAGE],
  });
});
