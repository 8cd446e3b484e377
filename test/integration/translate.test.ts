import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { FS_A, FS_D, FS_EA, FS_P, FS_PS, FS_RW, FS_US, SZ_1G, SZ_2M, SZ_4K, Stage1PageTable } from "../../client/pagetable.js";
import { IommuOption } from "../../gen/iommufd/v1/ioas_pb.js";
import { IommuModel } from "../../gen/iommufd/v1/vm_pb.js";
import { expectErrno } from "../helpers/errors.js";
import { startTestServer, type TestServer } from "../helpers/server.js";
import {
  type Area,
  createNestedVm,
  dump,
  expectFault,
  expectFaults,
  GIB,
  mapArea,
  MIB,
  stats,
  TABLE_BASE,
} from "./translate-helpers.js";

/**
 * Translate over gRPC against the emulated VT-d: the nested walk and its
 * reference count (vtd.md §2.2, api.md "Guest memory and DMA"), the IOTLB
 * and its invalidation (vtd.md §4, api.md DumpIotlb), A/D updates (§1.3),
 * every fault reason the API can produce (§2.3, §3), stage-2-only
 * translation, PASID tagging, and the GetStats counting rules (api.md
 * "Fine points").
 */

let t: TestServer;
beforeAll(async () => {
  t = await startTestServer();
});
afterAll(() => t.close());

let seq = 0;
const vmName = (what: string) => `tr-${what}-${++seq}`;

/** The bits a walk may set in a stage-1 entry. */
const AD = FS_A | FS_D | FS_EA;

describe("nested walk length with empty caches: (n+1)(m+1)-1 (vtd.md §2.2, api.md Translate)", () => {
  it("4-level stage 1 over 4-level stage 2 with 4 KiB pages reads 24 entries; the second access hits with 0", async () => {
    const { vm, devId, s1 } = await createNestedVm(t, vmName("24"));
    await s1.map(0x1000n, 0x800000n, SZ_4K);
    const r = await vm.translate({ devId, iovas: [0x1234n, 0x1ff8n] });
    expect(r.faults).toEqual([]);
    expect(r.addresses).toEqual([0x800234n, 0x800ff8n]);
    expect(r.memoryReferences).toEqual([24, 0]);
    expect(r.iotlbHits).toBe(1);
  });

  it("5-level stage 1 (addr_width 57) over 5-level stage 2 (five_level VM) reads (5+1)(5+1)-1 = 35", async () => {
    // vtd.md §2.2: 5/5 -> 35. A five_level VM's stage 2 is always 5-level
    // (api.md VmOptions), so addr_width 57 always runs over 5 stage-2 levels.
    const { vm, devId, s1 } = await createNestedVm(t, vmName("35"), { options: { fiveLevel: true }, levels: 5 });
    const iova = 0x00ab_0000_0000_3000n; // uses the PML5 index (bits 56:48)
    await s1.map(iova, 0x800000n, SZ_4K);
    const high = 0xff00_0000_0000_1000n; // canonical in 57 bits (bits 63:57 copy bit 56)
    await s1.map(high, 0x900000n, SZ_4K);
    const r = await vm.translate({ devId, iovas: [iova + 0x10n, high + 0x20n] });
    expect(r.faults).toEqual([]);
    expect(r.addresses).toEqual([0x800010n, 0x900020n]);
    expect(r.memoryReferences).toEqual([35, 35]);
  });

  it("4-level stage 1 over 5-level stage 2 (five_level VM) reads (4+1)(5+1)-1 = 29", async () => {
    const { vm, devId, s1 } = await createNestedVm(t, vmName("29"), { options: { fiveLevel: true }, levels: 4 });
    await s1.map(0x7000n, 0x800000n, SZ_4K);
    const r = await vm.translate({ devId, iovas: [0x7abcn] });
    expect(r.faults).toEqual([]);
    expect(r.addresses).toEqual([0x800abcn]);
    expect(r.memoryReferences).toEqual([29]);
  });

  it("a 2 MiB stage-1 leaf over 4 KiB stage-2 pages removes one stage-1 level: 3·5+4 = 19", async () => {
    const { vm, devId, nestedId, s1 } = await createNestedVm(t, vmName("19a"));
    await s1.map(0x200000n, 0x400000n, SZ_2M);
    const r = await vm.translate({ devId, iovas: [0x212345n, 0x212fffn, 0x3ff000n] });
    expect(r.addresses).toEqual([0x412345n, 0x412fffn, 0x5ff000n]);
    // Cached at min(2 MiB, 4 KiB) = 4 KiB: another 4 KiB page of the leaf walks again.
    expect(r.memoryReferences).toEqual([19, 0, 19]);
    expect(await dump(vm, nestedId)).toEqual([
      { iova: 0x212000n, pageSize: 0x1000n, address: 0x412000n, readable: true, writeable: true, pasid: undefined },
      { iova: 0x3ff000n, pageSize: 0x1000n, address: 0x5ff000n, readable: true, writeable: true, pasid: undefined },
    ]);
  });

  it("a 4 KiB stage-1 leaf over 2 MiB stage-2 pages (HUGE_PAGES 1) removes one level from every stage-2 walk: 4·4+3 = 19", async () => {
    // 512 MiB from 0: 1 GiB-aligned but too short for a 1 GiB leaf, so stage 2 uses 2 MiB pages.
    const { vm, devId, s1 } = await createNestedVm(t, vmName("19b"), { hugePages: true, areas: [{ iova: 0n, userVa: 0n, length: GIB / 2n }] });
    await s1.map(0x1000n, 0x600000n, SZ_4K);
    const r = await vm.translate({ devId, iovas: [0x1008n], write: true });
    expect(r.faults).toEqual([]);
    expect(r.addresses).toEqual([0x600008n]);
    expect(r.memoryReferences).toEqual([19]);
  });

  it("2 MiB over 2 MiB reads 3·4+3 = 15 and caches one 2 MiB entry that serves the whole page", async () => {
    const { vm, devId, nestedId, s1 } = await createNestedVm(t, vmName("15"), { hugePages: true, areas: [{ iova: 0n, userVa: 0n, length: GIB / 2n }] });
    await s1.map(0x200000n, 0x400000n, SZ_2M);
    const r = await vm.translate({ devId, iovas: [0x200010n, 0x3ffff0n] });
    expect(r.addresses).toEqual([0x400010n, 0x5ffff0n]);
    expect(r.memoryReferences).toEqual([15, 0]);
    expect(await dump(vm, nestedId)).toEqual([{ iova: 0x200000n, pageSize: SZ_2M, address: 0x400000n, readable: true, writeable: true, pasid: undefined }]);
  });

  it("over a 1 GiB stage-2 leaf: 4 KiB / 2 MiB / 1 GiB stage-1 leaves read 14 / 11 / 8 and are cached at min(stage 1, stage 2)", async () => {
    // A 1 GiB-aligned 1 GiB area gets one 1 GiB stage-2 leaf (api.md Fine points): m = 2 entries per stage-2 walk.
    const { vm, devId, nestedId, s1 } = await createNestedVm(t, vmName("1g"), { hugePages: true, areas: [{ iova: 0n, userVa: 0n, length: GIB }] });
    await s1.map(0x1000n, 0x800000n, SZ_4K);
    await s1.map(0x20_0000_0000n, 0xa00000n, SZ_2M);
    await s1.map(0x40_4000_0000n, 0n, SZ_1G);
    const iovas = [0x1010n, 0x20_0012_3450n, 0x40_4000_1234n, 0x40_7fff_f000n];
    const r = await vm.translate({ devId, iovas });
    expect(r.faults).toEqual([]);
    expect(r.addresses).toEqual([0x800010n, 0xb23450n, 0x1234n, 0x3fff_f000n]);
    expect(r.memoryReferences).toEqual([4 * 3 + 2, 3 * 3 + 2, 2 * 3 + 2, 0]);
    expect(await dump(vm, nestedId)).toEqual([
      { iova: 0x1000n, pageSize: SZ_4K, address: 0x800000n, readable: true, writeable: true, pasid: undefined },
      { iova: 0x20_0000_0000n, pageSize: SZ_2M, address: 0xa00000n, readable: true, writeable: true, pasid: undefined },
      { iova: 0x40_4000_0000n, pageSize: SZ_1G, address: 0n, readable: true, writeable: true, pasid: undefined },
    ]);
  });

  it("stage-2 page size follows alignment of both iova and user_va: an area whose user_va is only 4 KiB aligned gets 4 KiB pages", async () => {
    // api.md Fine points: the largest size to which both iova and user_va are aligned.
    const { vm, devId, s1 } = await createNestedVm(t, vmName("align"), {
      hugePages: true,
      areas: [
        { iova: 0n, userVa: 0n, length: 4n * MIB },
        { iova: 0x4000_0000n, userVa: 0x1001000n, length: 4n * MIB },
      ],
    });
    await s1.map(0x1000n, 0x4000_0000n, SZ_4K);
    const r = await vm.translate({ devId, iovas: [0x1000n] });
    expect(r.addresses).toEqual([0x1001000n]);
    // Tables sit in the 2 MiB-mapped area (3 entries per stage-2 walk), the data page in a 4 KiB one (4).
    expect(r.memoryReferences).toEqual([4 * (3 + 1) + 4]);
  });
});

describe("IOTLB and invalidation (vtd.md §4, api.md Invalidate/DumpIotlb)", () => {
  it("a stage-1 PTE change is invisible until a covering Invalidate; a non-covering one leaves the entry cached", async () => {
    const { vm, devId, nestedId, s1 } = await createNestedVm(t, vmName("inv"));
    const x = 0x5000n;
    await s1.map(x, 0x800000n, SZ_4K);
    expect((await vm.translate({ devId, iovas: [x] })).addresses).toEqual([0x800000n]);
    await s1.map(x, 0x900000n, SZ_4K); // the guest retargets the leaf
    const cached = { iova: x, pageSize: SZ_4K, address: 0x800000n, readable: true, writeable: true, pasid: undefined };

    let r = await vm.translate({ devId, iovas: [x + 0x10n] });
    expect(r.addresses).toEqual([0x800010n]);
    expect(r.memoryReferences).toEqual([0]);
    expect(await dump(vm, nestedId)).toEqual([cached]);

    // Neighbouring page, and a range below: neither covers x.
    const { entriesHandled } = await vm.invalidate({
      hwptId: nestedId,
      requests: { case: "vtdS1", value: { entries: [Stage1PageTable.invalidation(x + SZ_4K, SZ_4K), Stage1PageTable.invalidation(0x10000n, 16n * SZ_4K, false)] } },
    });
    expect(entriesHandled).toBe(2);
    r = await vm.translate({ devId, iovas: [x + 0x10n] });
    expect(r.addresses).toEqual([0x800010n]);
    expect(r.iotlbHits).toBe(1);
    expect(await dump(vm, nestedId)).toEqual([cached]);

    await vm.invalidate({ hwptId: nestedId, requests: { case: "vtdS1", value: { entries: [Stage1PageTable.invalidation(x, SZ_4K)] } } });
    expect(await dump(vm, nestedId)).toEqual([]);
    r = await vm.translate({ devId, iovas: [x + 0x10n] });
    expect(r.addresses).toEqual([0x900010n]);
    expect(r.memoryReferences).toEqual([24]);
  });

  it("Invalidate of the whole domain (addr 0, npages U64_MAX) drops every entry; a multi-page range drops what it covers", async () => {
    const { vm, devId, nestedId, s1 } = await createNestedVm(t, vmName("invall"));
    for (let i = 0n; i < 8n; i++) await s1.map(0x10000n + i * SZ_4K, 0x800000n + i * SZ_4K, SZ_4K);
    await s1.map(0xffff_8000_0000_0000n, 0xa00000n, SZ_4K); // canonical upper half
    const iovas = [...Array(8).keys()].map((i) => 0x10000n + BigInt(i) * SZ_4K).concat([0xffff_8000_0000_0000n]);
    await vm.translate({ devId, iovas });
    expect((await dump(vm, nestedId)).length).toBe(9);
    await vm.invalidate({ hwptId: nestedId, requests: { case: "vtdS1", value: { entries: [{ addr: 0x10000n, npages: 4n, leaf: true }] } } });
    const left = (await dump(vm, nestedId)).map((e) => e.iova);
    for (let i = 0n; i < 4n; i++) expect(left).not.toContain(0x10000n + i * SZ_4K);
    expect(left).toContain(0xffff_8000_0000_0000n);
    await vm.invalidate({ hwptId: nestedId, requests: { case: "vtdS1", value: { entries: [Stage1PageTable.invalidateAll()] } } });
    expect(await dump(vm, nestedId)).toEqual([]);
    const r = await vm.translate({ devId, iovas });
    expect(r.iotlbHits).toBe(0);
    expect(r.addresses[8]).toBe(0xa00000n);
  });

  it("turning a not-present stage-1 entry present needs no invalidation: faults are never cached (vtd.md §1.3)", async () => {
    const { vm, devId, s1 } = await createNestedVm(t, vmName("neg"), { options: { pagingStructureCaches: true } });
    await s1.map(0x1000n, 0x800000n, SZ_4K);
    await vm.translate({ devId, iovas: [0x1000n] });
    await expectFault(vm, devId, 0x2000n, 0x71); // PTE not present
    await expectFault(vm, devId, 0x4000_0000n, 0x71); // PDPE not present
    await s1.map(0x2000n, 0x900000n, SZ_4K);
    await s1.map(0x4000_0000n, 0xa00000n, SZ_4K);
    const r = await vm.translate({ devId, iovas: [0x2000n, 0x4000_0000n] });
    expect(r.faults).toEqual([]);
    expect(r.addresses).toEqual([0x900000n, 0xa00000n]);
  });

  it("a write that hits a read-only cached entry re-walks (a miss) and sees relaxed rights without invalidation", async () => {
    const { vm, devId, nestedId, s1 } = await createNestedVm(t, vmName("rw"));
    await s1.map(0x1000n, 0x800000n, SZ_4K, { writeable: false });
    expect((await vm.translate({ devId, iovas: [0x1000n] })).addresses).toEqual([0x800000n]);
    expect((await dump(vm, nestedId))[0]).toMatchObject({ readable: true, writeable: false });
    const denied = await expectFault(vm, devId, 0x1000n, 0x85, { write: true });
    expect(denied.memoryReferences[0]).toBeGreaterThan(0); // walked, not answered from the entry
    await s1.map(0x1000n, 0x800000n, SZ_4K, { writeable: true }); // relax, no invalidation
    const r = await vm.translate({ devId, iovas: [0x1000n], write: true });
    expect(r.faults).toEqual([]);
    expect(r.memoryReferences).toEqual([24]);
    expect((await dump(vm, nestedId))[0]).toMatchObject({ readable: true, writeable: true });
  });

  it("UnmapIoas of a stage-2 range: translations through it fault 0x79, the other nested entries are dropped and re-walk; a remap is seen", async () => {
    const areas: Area[] = [
      { iova: TABLE_BASE, userVa: TABLE_BASE, length: MIB },
      { iova: 0x800000n, userVa: 0x800000n, length: 0x10000n },
      { iova: 0x1000000n, userVa: 0x1000000n, length: 0x10000n },
    ];
    const { vm, ioasId, devId, nestedId, s1 } = await createNestedVm(t, vmName("unmap"), { areas });
    await s1.map(0x1000n, 0x800000n, SZ_4K);
    await s1.map(0x2000n, 0x1000000n, SZ_4K);
    let r = await vm.translate({ devId, iovas: [0x1000n, 0x2000n, 0x1000n, 0x2000n] });
    expect(r.memoryReferences).toEqual([24, 24, 0, 0]);
    expect((await dump(vm, nestedId)).length).toBe(2);

    const { length } = await vm.unmapIoas({ ioasId, iova: 0x800000n, length: 0x10000n });
    expect(length).toBe(0x10000n);
    // vtd.md §9 last rule / §4.2: combined entries cannot be found by GPA, so a
    // stage-2 change drops every nested entry of the parent.
    expect(await dump(vm, nestedId)).toEqual([]);
    r = await vm.translate({ devId, iovas: [0x1000n, 0x2000n] });
    expectFaults(r, [0x1000n, 0x2000n], { 0: 0x79 });
    // 20 entries up to the leaf, then a stage-2 walk that stops at a non-present entry.
    expect(r.memoryReferences[0]).toBeGreaterThanOrEqual(21);
    expect(r.memoryReferences[0]).toBeLessThanOrEqual(24);
    expect(r.addresses[1]).toBe(0x1000000n);
    expect(r.memoryReferences[1]).toBe(24);

    await mapArea(vm, ioasId, { iova: 0x800000n, userVa: 0x2000000n, length: 0x10000n });
    r = await vm.translate({ devId, iovas: [0x1040n] });
    expect(r.faults).toEqual([]);
    expect(r.addresses).toEqual([0x2000040n]);
  });

  it("UnmapIoas of the area holding the stage-1 root makes every access fault 0x73 until it is mapped back", async () => {
    const areas: Area[] = [
      { iova: TABLE_BASE, userVa: TABLE_BASE, length: MIB },
      { iova: 0x800000n, userVa: 0x800000n, length: 0x10000n },
    ];
    const { vm, ioasId, devId, s1 } = await createNestedVm(t, vmName("unmaproot"), { areas });
    await s1.map(0x1000n, 0x800000n, SZ_4K);
    await vm.translate({ devId, iovas: [0x1000n] });
    await vm.unmapIoas({ ioasId, iova: TABLE_BASE, length: MIB });
    await expectFault(vm, devId, 0x1000n, 0x73);
    await mapArea(vm, ioasId, areas[0]);
    expect((await vm.translate({ devId, iovas: [0x1000n] })).addresses).toEqual([0x800000n]);
  });

  it("iotlb_entries = 0 disables the IOTLB: every access walks, nothing is cached", async () => {
    const { vm, devId, nestedId, s1 } = await createNestedVm(t, vmName("noiotlb"), { options: { iotlbEntries: 0 } });
    await s1.map(0x1000n, 0x800000n, SZ_4K);
    const r = await vm.translate({ devId, iovas: [0x1000n, 0x1000n, 0x1008n] });
    expect(r.addresses).toEqual([0x800000n, 0x800000n, 0x800008n]);
    expect(r.memoryReferences).toEqual([24, 24, 24]);
    expect(r.iotlbHits).toBe(0);
    expect(await dump(vm, nestedId)).toEqual([]);
    expect(await stats(vm)).toMatchObject({ translations: 3, iotlbHits: 0, iotlbMisses: 3, memoryReferences: 72, iotlbEntries: 0 });
  });

  it("a bounded IOTLB (8 entries) replaces entries rather than flushing: occupancy stays 8 and a recently used entry keeps hitting", async () => {
    const { vm, devId, nestedId, s1 } = await createNestedVm(t, vmName("clock"), { options: { iotlbEntries: 8 } });
    const page = (i: number) => 0x10000n + BigInt(i) * SZ_4K;
    for (let i = 0; i < 32; i++) await s1.map(page(i), 0x800000n + BigInt(i) * SZ_4K, SZ_4K);
    const hot = page(0);
    expect((await vm.translate({ devId, iovas: [hot] })).memoryReferences).toEqual([24]);
    for (let i = 1; i < 32; i++) {
      const r = await vm.translate({ devId, iovas: [page(i), hot] });
      expect(r.addresses).toEqual([0x800000n + BigInt(i) * SZ_4K, 0x800000n]);
      expect(r.memoryReferences, `round ${i}`).toEqual([24, 0]);
      expect((await stats(vm)).iotlbEntries).toBe(Math.min(i + 1, 8));
    }
    const entries = await dump(vm, nestedId);
    expect(entries.length).toBe(8);
    expect(entries.map((e) => e.iova)).toContain(hot);
    expect(entries.map((e) => e.iova)).toContain(page(31));
  });

  it("a bounded IOTLB reuses the slots an Invalidate freed before replacing live entries: occupancy returns to capacity", async () => {
    // Two nested HWPTs share the unit's 8-entry IOTLB: the RID's and PASID 6's.
    const { vm, devId, parentId, nestedId, s1 } = await createNestedVm(t, vmName("reuse"), { pasid: true, options: { iotlbEntries: 8 } });
    const s1b = new Stage1PageTable(vm, { tableBase: 0x200000n, tableBytes: 0x100000n });
    const { hwptId: other } = await vm.allocHwpt({ devId, ptId: parentId, pasid: true, data: { case: "vtdS1", value: { pgtblAddr: s1b.root, addrWidth: 48 } } });
    await vm.attachDevice({ devId, ptId: other, pasid: 6 });
    const page = (i: number) => 0x10000n + BigInt(i) * SZ_4K;
    for (let i = 0; i < 8; i++) {
      await s1.map(page(i), 0x800000n + BigInt(i) * SZ_4K, SZ_4K);
      await s1b.map(page(i), 0x900000n + BigInt(i) * SZ_4K, SZ_4K);
    }
    await vm.translate({ devId, iovas: [0, 1, 2, 3].map(page) });
    await vm.translate({ devId, pasid: 6, iovas: [0, 1, 2, 3].map(page) });
    expect((await stats(vm)).iotlbEntries).toBe(8);
    await vm.invalidate({ hwptId: other, requests: { case: "vtdS1", value: { entries: [Stage1PageTable.invalidateAll()] } } });
    expect((await stats(vm)).iotlbEntries).toBe(4);
    // Four free slots: the RID's next four pages fit without displacing its first four.
    await vm.translate({ devId, iovas: [4, 5, 6, 7].map(page) });
    expect((await stats(vm)).iotlbEntries).toBe(8);
    const again = await vm.translate({ devId, iovas: [0, 1, 2, 3, 4, 5, 6, 7].map(page) });
    expect(again.memoryReferences).toEqual([0, 0, 0, 0, 0, 0, 0, 0]);
    expect((await dump(vm, nestedId)).length).toBe(8);
  });

  it("paging_structure_caches: a sequential 4 KiB stride over 4 MiB averages ≤ 5 entries per miss (24 without)", async () => {
    // Default HUGE_PAGES (1): the identity map uses 2 MiB stage-2 pages.
    const n = 1024;
    const run = async (psc: boolean) => {
      const { vm, devId, s1 } = await createNestedVm(t, vmName(`psc${psc}`), { hugePages: true, options: { pagingStructureCaches: psc } });
      for (let i = 0; i < n; i++) await s1.map(0x4000_0000n + BigInt(i) * SZ_4K, 0x1000000n + BigInt(i) * SZ_4K, SZ_4K);
      const iovas = [...Array(n).keys()].map((i) => 0x4000_0000n + BigInt(i) * SZ_4K + 0x80n);
      const r = await vm.translate({ devId, iovas });
      expect(r.faults).toEqual([]);
      expect(r.addresses[n - 1]).toBe(0x1000000n + BigInt(n - 1) * SZ_4K + 0x80n);
      expect(r.iotlbHits).toBe(0);
      return r.memoryReferences.reduce((a, b) => a + b, 0) / n;
    };
    expect(await run(false)).toBe(19); // 4 KiB stage 1 over 2 MiB stage 2, every walk cold
    expect(await run(true)).toBeLessThanOrEqual(5);
  });

  it("paging_structure_caches over 4 KiB stage-2 pages: the same stride stays well under 24 per miss", async () => {
    const n = 1024;
    const { vm, devId, s1 } = await createNestedVm(t, vmName("psc4k"), { options: { pagingStructureCaches: true } });
    for (let i = 0; i < n; i++) await s1.map(0x4000_0000n + BigInt(i) * SZ_4K, 0x1000000n + BigInt(i) * SZ_4K, SZ_4K);
    const iovas = [...Array(n).keys()].map((i) => 0x4000_0000n + BigInt(i) * SZ_4K);
    const r = await vm.translate({ devId, iovas });
    expect(r.faults).toEqual([]);
    const mean = r.memoryReferences.reduce((a, b) => a + b, 0) / n;
    // Each new data page still needs one PTE read and a cold 4-entry stage-2
    // walk of its GPA (no stage-2 non-leaf cache), so the floor here is 5.
    expect(mean).toBeLessThanOrEqual(6);
  });

  it("with paging_structure_caches a leaf-only Invalidate keeps the upper levels cached; a non-leaf one drops them", async () => {
    const { vm, devId, nestedId, s1 } = await createNestedVm(t, vmName("ih"), { options: { pagingStructureCaches: true } });
    await s1.map(0x1000n, 0x800000n, SZ_4K);
    await vm.translate({ devId, iovas: [0x1000n] });
    await s1.map(0x1000n, 0x900000n, SZ_4K);
    await vm.invalidate({ hwptId: nestedId, requests: { case: "vtdS1", value: { entries: [Stage1PageTable.invalidation(0x1000n, SZ_4K, true)] } } });
    const leafOnly = await vm.translate({ devId, iovas: [0x1000n] });
    expect(leafOnly.addresses).toEqual([0x900000n]);
    await s1.map(0x1000n, 0xa00000n, SZ_4K);
    await vm.invalidate({ hwptId: nestedId, requests: { case: "vtdS1", value: { entries: [Stage1PageTable.invalidation(0x1000n, SZ_4K, false)] } } });
    const full = await vm.translate({ devId, iovas: [0x1000n] });
    expect(full.addresses).toEqual([0xa00000n]);
    // Leaf-only: one PTE read plus the data page's stage-2 walk.
    expect(leafOnly.memoryReferences[0]).toBeLessThan(full.memoryReferences[0]);
  });
});

describe("accessed/dirty bits in guest RAM (vtd.md §1.1, §1.3)", () => {
  it("a read sets A on every stage-1 entry it uses and no D; a write then re-walks and sets D on the leaf only", async () => {
    const { vm, devId, s1 } = await createNestedVm(t, vmName("ad"));
    const x = 0x1234_5000n;
    await s1.map(x, 0x800000n, SZ_4K);
    const before = await Promise.all([4, 3, 2, 1].map((l) => s1.readEntry(x, l)));
    for (const e of before) expect(e & AD).toBe(0n);

    expect((await vm.translate({ devId, iovas: [x] })).memoryReferences).toEqual([24]);
    const afterRead = await Promise.all([4, 3, 2, 1].map((l) => s1.readEntry(x, l)));
    expect(afterRead).toEqual(before.map((e) => e | FS_A));

    // A write hitting a clean (D = 0) entry must walk again to set D (a miss).
    const w = await vm.translate({ devId, iovas: [x], write: true });
    expect(w.memoryReferences).toEqual([24]);
    expect(w.iotlbHits).toBe(0);
    const afterWrite = await Promise.all([4, 3, 2, 1].map((l) => s1.readEntry(x, l)));
    expect(afterWrite).toEqual([...before.slice(0, 3).map((e) => e | FS_A), before[3] | FS_A | FS_D]);

    // Now dirty: further writes hit.
    expect((await vm.translate({ devId, iovas: [x + 8n], write: true })).memoryReferences).toEqual([0]);
  });

  it("with EAFE, EA (bit 10) is set together with A; D lands on a 2 MiB leaf for a write", async () => {
    const { vm, devId, s1 } = await createNestedVm(t, vmName("ea"), { eafe: true });
    await s1.map(0x600000n, 0x400000n, SZ_2M);
    const before = await Promise.all([4, 3, 2].map((l) => s1.readEntry(0x600000n, l)));
    await vm.translate({ devId, iovas: [0x600000n], write: true });
    const after = await Promise.all([4, 3, 2].map((l) => s1.readEntry(0x600000n, l)));
    expect(after).toEqual([before[0] | FS_A | FS_EA, before[1] | FS_A | FS_EA, before[2] | FS_A | FS_EA | FS_D]);
  });

  it("a faulting permission check leaves the leaf's A/D untouched", async () => {
    const { vm, devId, s1 } = await createNestedVm(t, vmName("adfault"));
    await s1.map(0x1000n, 0x800000n, SZ_4K, { writeable: false });
    await expectFault(vm, devId, 0x1000n, 0x85, { write: true });
    expect((await s1.readEntry(0x1000n, 1)) & (FS_D | FS_A)).toBe(0n);
  });
});

describe("fault reasons (vtd.md §1, §2.3, §3; api.md TranslationFault)", () => {
  it("0x71 S1_NOT_PRESENT: empty root table (root's stage-2 walk + 1 entry), and a missing PTE", async () => {
    const { vm, devId, s1 } = await createNestedVm(t, vmName("f71"));
    const r = await expectFault(vm, devId, 0x1000n, 0x71);
    expect(r.memoryReferences).toEqual([5]);
    await s1.map(0x1000n, 0x800000n, SZ_4K);
    const r2 = await expectFault(vm, devId, 0x2000n, 0x71);
    expect(r2.memoryReferences).toEqual([20]);
  });

  it("0x72 S1_RESERVED: PS in a PML4E, bits 20:13 of a 2 MiB leaf, bits 29:13 of a 1 GiB leaf, address bit 48 with a 48-bit stage 2", async () => {
    const { vm, devId, s1 } = await createNestedVm(t, vmName("f72"));
    await s1.setEntry(0x80_0000_0000n, 4, (TABLE_BASE + 0x80000n) | FS_P | FS_RW | FS_US | FS_PS);
    await expectFault(vm, devId, 0x80_0000_0000n, 0x72);
    await s1.map(0x200000n, 0x400000n, SZ_2M, { extraBits: 1n << 13n });
    await expectFault(vm, devId, 0x200000n, 0x72);
    await s1.map(0x4000_0000n, 0n, SZ_1G, { extraBits: 1n << 29n });
    await expectFault(vm, devId, 0x4000_0000n, 0x72);
    await s1.setEntry(0x1000n, 1, (1n << 48n) | 0x800000n | FS_P | FS_RW | FS_US);
    await expectFault(vm, devId, 0x1000n, 0x72);
  });

  it("not reserved: PAT (bit 12) of a 2 MiB leaf, ignored bits 62:52 and XD (63) of a leaf, G (8)", async () => {
    const { vm, devId, s1 } = await createNestedVm(t, vmName("f72ok"));
    await s1.map(0x200000n, 0x400000n, SZ_2M, { extraBits: 1n << 12n });
    await s1.map(0x1000n, 0x800000n, SZ_4K, { extraBits: (0x7ffn << 52n) | (1n << 63n) | (1n << 8n) });
    const r = await vm.translate({ devId, iovas: [0x200123n, 0x1123n] });
    expect(r.faults).toEqual([]);
    expect(r.addresses).toEqual([0x400123n, 0x800123n]);
  });

  it("address bits 51:48 are not reserved over a 57-bit stage 2: the GPA is looked up and is not mapped (0x79)", async () => {
    const { vm, devId, s1 } = await createNestedVm(t, vmName("f72-5l"), { options: { fiveLevel: true } });
    await s1.setEntry(0x1000n, 1, (1n << 48n) | 0x800000n | FS_P | FS_RW | FS_US);
    await expectFault(vm, devId, 0x1000n, 0x79);
  });

  it("0x73 S2_ACCESS_S1_ROOT: pgtbl_addr not mapped in stage 2", async () => {
    const { vm, devId } = await createNestedVm(t, vmName("f73"), { pgtblAddr: 0x3000_0000n });
    await expectFault(vm, devId, 0x1000n, 0x73);
  });

  it("0x74 S1_TABLE_BEYOND_S2: pgtbl_addr at or above 2^48 with a 48-bit stage 2, before any memory reference", async () => {
    const { vm, devId } = await createNestedVm(t, vmName("f74"), { pgtblAddr: 1n << 48n });
    const r = await expectFault(vm, devId, 0x1000n, 0x74);
    expect(r.memoryReferences).toEqual([0]);
  });

  it("0x75 S2_NO_READ_S1_ROOT: the root table lies in a write-only stage-2 area", async () => {
    const { vm, devId, s1 } = await createNestedVm(t, vmName("f75"), {
      areas: [
        { iova: TABLE_BASE, userVa: TABLE_BASE, length: MIB, readable: false, writeable: true },
        { iova: 0x800000n, userVa: 0x800000n, length: MIB },
      ],
    });
    await s1.map(0x1000n, 0x800000n, SZ_4K);
    const r = await expectFault(vm, devId, 0x1000n, 0x75);
    expect(r.memoryReferences).toEqual([4]);
  });

  it("0x76 S2_NO_READ_S1_TABLE: a lower stage-1 table lies in a write-only stage-2 area", async () => {
    const { vm, devId, s1 } = await createNestedVm(t, vmName("f76"), {
      areas: [
        { iova: TABLE_BASE, userVa: TABLE_BASE, length: SZ_4K }, // the root
        { iova: TABLE_BASE + SZ_4K, userVa: TABLE_BASE + SZ_4K, length: MIB - SZ_4K, readable: false, writeable: true },
        { iova: 0x800000n, userVa: 0x800000n, length: MIB },
      ],
    });
    await s1.map(0x1000n, 0x800000n, SZ_4K);
    const r = await expectFault(vm, devId, 0x1000n, 0x76);
    expect(r.memoryReferences).toEqual([4 + 1 + 4]);
  });

  it("0x79 S2_NOT_PRESENT: a stage-1 table GPA or the output GPA not mapped in stage 2", async () => {
    const { vm, devId, s1 } = await createNestedVm(t, vmName("f79"));
    await s1.map(0x1000n, 0x3000_0000n, SZ_4K); // output GPA unmapped
    await expectFault(vm, devId, 0x1000n, 0x79);
    await s1.setEntry(0x80_0000_0000n, 4, 0x3000_0000n | FS_P | FS_RW | FS_US); // PDPT GPA unmapped
    await expectFault(vm, devId, 0x80_0000_0000n, 0x79);
  });

  it("0x80 NON_CANONICAL before any memory reference (48-bit: bits 63:48 copy bit 47; 57-bit: bits 63:57 copy bit 56)", async () => {
    const { vm, devId } = await createNestedVm(t, vmName("f80"));
    const iovas = [0x0000_8000_0000_0000n, 0xffff_7fff_ffff_f000n, 0x0001_0000_0000_0000n];
    const r = await vm.translate({ devId, iovas });
    expectFaults(r, iovas, { 0: 0x80, 1: 0x80, 2: 0x80 });
    expect(r.memoryReferences).toEqual([0, 0, 0]);

    const five = await createNestedVm(t, vmName("f80-5l"), { options: { fiveLevel: true }, levels: 5 });
    await five.s1.map(0x0000_8000_0000_0000n, 0x800000n, SZ_4K);
    const r5 = await five.vm.translate({ devId: five.devId, iovas: [0x0100_0000_0000_0000n, 0x0000_8000_0000_0000n] });
    expectFaults(r5, [0x0100_0000_0000_0000n, 0x0000_8000_0000_0000n], { 0: 0x80 });
    expect(r5.addresses[1]).toBe(0x800000n);
  });

  it("0x81 USER_TO_SUPERVISOR: U/S = 0 in the leaf or in any upper entry (requests without PASID are user requests)", async () => {
    const { vm, devId, nestedId, s1 } = await createNestedVm(t, vmName("f81"));
    await s1.map(0x1000n, 0x800000n, SZ_4K, { user: false });
    await expectFault(vm, devId, 0x1000n, 0x81);
    await s1.map(0x80_0000_1000n, 0x800000n, SZ_4K);
    expect((await vm.translate({ devId, iovas: [0x80_0000_1000n] })).faults).toEqual([]);
    const pml4e = await s1.readEntry(0x80_0000_1000n, 4);
    await s1.setEntry(0x80_0000_1000n, 4, pml4e & ~FS_US);
    await vm.invalidate({ hwptId: nestedId, requests: { case: "vtdS1", value: { entries: [Stage1PageTable.invalidateAll()] } } });
    await expectFault(vm, devId, 0x80_0000_1000n, 0x81);
  });

  it("0x85 NO_WRITE: R/W = 0 in the leaf or in an upper entry; reads still translate", async () => {
    const { vm, devId, nestedId, s1 } = await createNestedVm(t, vmName("f85"));
    await s1.map(0x1000n, 0x800000n, SZ_4K, { writeable: false });
    await expectFault(vm, devId, 0x1000n, 0x85, { write: true });
    await s1.map(0x40_0000_0000n, 0x900000n, SZ_4K);
    const pdpe = await s1.readEntry(0x40_0000_0000n, 3);
    await s1.setEntry(0x40_0000_0000n, 3, pdpe & ~FS_RW);
    await vm.invalidate({ hwptId: nestedId, requests: { case: "vtdS1", value: { entries: [Stage1PageTable.invalidateAll()] } } });
    await expectFault(vm, devId, 0x40_0000_0000n, 0x85, { write: true });
    const r = await vm.translate({ devId, iovas: [0x1000n, 0x40_0000_0000n] });
    expect(r.faults).toEqual([]);
  });

  it("0x86 NO_READ: a read of a page in a write-only stage-2 area; a write there translates", async () => {
    const { vm, devId, s1 } = await createNestedVm(t, vmName("f86"), {
      areas: [
        { iova: TABLE_BASE, userVa: TABLE_BASE, length: MIB },
        { iova: 0x800000n, userVa: 0x800000n, length: MIB, readable: false, writeable: true },
      ],
    });
    await s1.map(0x1000n, 0x800000n, SZ_4K);
    await expectFault(vm, devId, 0x1000n, 0x86);
    const w = await vm.translate({ devId, iovas: [0x1000n], write: true });
    expect(w.faults).toEqual([]);
    expect(w.addresses).toEqual([0x800000n]);
    // The cached entry is write-only: a read re-walks and still faults.
    await expectFault(vm, devId, 0x1000n, 0x86);
  });

  it("0x59 BLOCKED: a device never attached, a detached device, an unattached PASID", async () => {
    const nv = await createNestedVm(t, vmName("f59"), { attach: false, pasid: true });
    const { vm, devId, nestedId, s1 } = nv;
    await s1.map(0x1000n, 0x800000n, SZ_4K);
    let r = await expectFault(vm, devId, 0x1000n, 0x59);
    expect(r.memoryReferences).toEqual([0]);
    await vm.attachDevice({ devId, ptId: nestedId });
    expect((await vm.translate({ devId, iovas: [0x1000n] })).addresses).toEqual([0x800000n]);
    await expectFault(vm, devId, 0x1000n, 0x59, { pasid: 3 });
    await vm.detachDevice({ devId });
    r = await expectFault(vm, devId, 0x1000n, 0x59);
    expect(r.iotlbHits).toBe(0);
  });
});

describe("stage-2-only translation through a paging HWPT (api.md Fine points)", () => {
  async function pagingVm(hugePages: boolean, areas: Area[]) {
    const vmId = vmName("s2");
    await t.client.createVm({ vmId, model: IommuModel.INTEL_VTD, guestMemoryBytes: GIB });
    const vm = t.client.vm(vmId);
    const { ioasId } = await vm.allocIoas();
    if (!hugePages) await vm.setOption({ option: IommuOption.HUGE_PAGES, objectId: ioasId, value: 0n });
    for (const a of areas) await mapArea(vm, ioasId, a);
    const { devId } = await vm.bindDevice({ name: "dev0" });
    const { hwptId } = await vm.allocHwpt({ devId, ptId: ioasId });
    await vm.attachDevice({ devId, ptId: hwptId });
    return { vm, devId, hwptId, ioasId };
  }

  it("reads m = 4 entries per 4 KiB page, hits after; unmapped → 0x79, write to read-only → 0x85, read of write-only → 0x86, ≥ 2^48 → 0x83", async () => {
    const { vm, devId, hwptId } = await pagingVm(false, [
      { iova: 0n, userVa: 0x100000n, length: 0x10000n },
      { iova: 0x10000n, userVa: 0x200000n, length: 0x10000n, readable: true, writeable: false },
      { iova: 0x20000n, userVa: 0x300000n, length: 0x10000n, readable: false, writeable: true },
    ]);
    const reads = [0x1234n, 0x1238n, 0x10008n, 0x20000n, 0x30000n, 1n << 48n];
    const r = await vm.translate({ devId, iovas: reads });
    expectFaults(r, reads, { 3: 0x86, 4: 0x79, 5: 0x83 });
    expect(r.addresses.slice(0, 3)).toEqual([0x101234n, 0x101238n, 0x200008n]);
    expect(r.memoryReferences.slice(0, 4)).toEqual([4, 0, 4, 4]);
    expect(r.memoryReferences[5]).toBe(0);
    const writes = [0x1000n, 0x10000n, 0x20010n];
    const w = await vm.translate({ devId, iovas: writes, write: true });
    expectFaults(w, writes, { 1: 0x85 });
    expect(w.addresses[2]).toBe(0x300010n);
    expect(await dump(vm, hwptId)).toEqual([
      { iova: 0x1000n, pageSize: SZ_4K, address: 0x101000n, readable: true, writeable: true, pasid: undefined },
      { iova: 0x10000n, pageSize: SZ_4K, address: 0x200000n, readable: true, writeable: false, pasid: undefined },
      { iova: 0x20000n, pageSize: SZ_4K, address: 0x300000n, readable: false, writeable: true, pasid: undefined },
    ]);
  });

  it("2 MiB and 1 GiB stage-2 leaves read 3 and 2 entries and are cached at their size; UnmapIoas drops them", async () => {
    const { vm, devId, hwptId, ioasId } = await pagingVm(true, [
      { iova: 0x20_0000n, userVa: 0x40_0000n, length: SZ_2M },
      { iova: 0x4000_0000n, userVa: 0n, length: SZ_1G },
    ]);
    const r = await vm.translate({ devId, iovas: [0x20_1234n, 0x3f_f000n, 0x4123_4567n, 0x7fff_ffffn] });
    expect(r.faults).toEqual([]);
    expect(r.addresses).toEqual([0x40_1234n, 0x5f_f000n, 0x0123_4567n, 0x3fff_ffffn]);
    expect(r.memoryReferences).toEqual([3, 0, 2, 0]);
    expect((await dump(vm, hwptId)).map((e) => [e.iova, e.pageSize])).toEqual([
      [0x20_0000n, SZ_2M],
      [0x4000_0000n, SZ_1G],
    ]);
    await vm.unmapIoas({ ioasId, iova: 0x20_0000n, length: SZ_2M });
    expect((await dump(vm, hwptId)).map((e) => e.iova)).toEqual([0x4000_0000n]);
    await expectFault(vm, devId, 0x20_1234n, 0x79);
  });
});

describe("PASID-tagged IOTLB entries (vtd.md §4.1, api.md DumpIotlb)", () => {
  it("requests with a PASID fill entries tagged with it; requests without leave pasid unset; an Invalidate drops both", async () => {
    const { vm, devId, nestedId, s1 } = await createNestedVm(t, vmName("pasid"), { pasid: true });
    await vm.attachDevice({ devId, ptId: nestedId, pasid: 5 });
    await s1.map(0x1000n, 0x800000n, SZ_4K);
    const withPasid = await vm.translate({ devId, pasid: 5, iovas: [0x1010n, 0x1020n] });
    expect(withPasid.addresses).toEqual([0x800010n, 0x800020n]);
    expect(withPasid.memoryReferences).toEqual([24, 0]);
    // The RID's entry is tagged differently: its first access misses.
    const without = await vm.translate({ devId, iovas: [0x1010n] });
    expect(without.memoryReferences).toEqual([24]);
    expect(await dump(vm, nestedId)).toEqual([
      { iova: 0x1000n, pageSize: SZ_4K, address: 0x800000n, readable: true, writeable: true, pasid: undefined },
      { iova: 0x1000n, pageSize: SZ_4K, address: 0x800000n, readable: true, writeable: true, pasid: 5 },
    ]);
    await vm.invalidate({ hwptId: nestedId, requests: { case: "vtdS1", value: { entries: [Stage1PageTable.invalidation(0x1000n, SZ_4K)] } } });
    expect(await dump(vm, nestedId)).toEqual([]);
  });

  it("two PASIDs on two nested HWPTs over one parent translate through their own stage-1 tables", async () => {
    const { vm, devId, parentId, nestedId, s1 } = await createNestedVm(t, vmName("pasid2"), { pasid: true });
    const s1b = new Stage1PageTable(vm, { tableBase: 0x200000n, tableBytes: 0x100000n });
    const { hwptId: nested2 } = await vm.allocHwpt({ devId, ptId: parentId, pasid: true, data: { case: "vtdS1", value: { pgtblAddr: s1b.root, addrWidth: 48 } } });
    await vm.attachDevice({ devId, ptId: nested2, pasid: 6 });
    await s1.map(0x1000n, 0x800000n, SZ_4K);
    await s1b.map(0x1000n, 0x900000n, SZ_4K);
    expect((await vm.translate({ devId, iovas: [0x1004n] })).addresses).toEqual([0x800004n]);
    expect((await vm.translate({ devId, pasid: 6, iovas: [0x1004n] })).addresses).toEqual([0x900004n]);
    await expectFault(vm, devId, 0x1004n, 0x59, { pasid: 7 });
    expect(await dump(vm, nestedId)).toEqual([{ iova: 0x1000n, pageSize: SZ_4K, address: 0x800000n, readable: true, writeable: true, pasid: undefined }]);
    expect(await dump(vm, nested2)).toEqual([{ iova: 0x1000n, pageSize: SZ_4K, address: 0x900000n, readable: true, writeable: true, pasid: 6 }]);
  });
});

describe("PASID tagging of stage-2-only entries (vtd.md §4.1 IOTLB tag: PASID for FS/nested only; §7 key)", () => {
  it("a paging HWPT reached through a PASID and through the RID shares one untagged stage-2-only entry", async () => {
    const vmId = vmName("s2pasid");
    await t.client.createVm({ vmId, model: IommuModel.INTEL_VTD, guestMemoryBytes: GIB });
    const vm = t.client.vm(vmId);
    const { ioasId } = await vm.allocIoas();
    await mapArea(vm, ioasId, { iova: 0n, userVa: 0x100000n, length: 0x10000n });
    const { devId } = await vm.bindDevice({ name: "dev0", pasidCapable: true });
    const { hwptId } = await vm.allocHwpt({ devId, ptId: ioasId, pasid: true });
    await vm.attachDevice({ devId, ptId: hwptId });
    await vm.attachDevice({ devId, ptId: hwptId, pasid: 5 });
    expect((await vm.translate({ devId, pasid: 5, iovas: [0x1000n] })).memoryReferences).toEqual([4]);
    // Same domain (DID), second-stage only: the PASID is not part of the tag, so the RID's access hits.
    expect((await vm.translate({ devId, iovas: [0x1008n] })).memoryReferences).toEqual([0]);
    expect(await dump(vm, hwptId)).toEqual([{ iova: 0x1000n, pageSize: SZ_4K, address: 0x101000n, readable: true, writeable: true, pasid: undefined }]);
  });
});

describe("GetStats counting rules (api.md VmStats and Fine points)", () => {
  it("translations, hits, misses, memory_references, faults, iotlb_entries and invalidation_entries move as specified", async () => {
    const { vm, devId, nestedId, s1 } = await createNestedVm(t, vmName("stats"));
    const { devId: idle } = await vm.bindDevice({ name: "dev1" });
    const x = 0x1000n;
    const hole = 0x2000n;
    await s1.map(x, 0x800000n, SZ_4K);
    expect(await stats(vm)).toEqual({ translations: 0, iotlbHits: 0, iotlbMisses: 0, memoryReferences: 0, faults: 0, invalidationEntries: 0, iotlbEntries: 0 });

    let refs = 0;
    const run = async (req: Parameters<typeof vm.translate>[0]) => {
      const r = await vm.translate(req);
      refs += r.memoryReferences.reduce((a, b) => a + b, 0);
      return r;
    };

    // One hit, two misses (the faulting walk is a miss too), one fault.
    const r1 = await run({ devId, iovas: [x, x, hole] });
    expect(r1.memoryReferences).toEqual([24, 0, 20]);
    expect(await stats(vm)).toEqual({ translations: 3, iotlbHits: 1, iotlbMisses: 2, memoryReferences: 44, faults: 1, invalidationEntries: 0, iotlbEntries: 1 });

    // Blocked: a translation and a fault, neither hit nor miss.
    await run({ devId: idle, iovas: [x, x] });
    expect(await stats(vm)).toMatchObject({ translations: 5, iotlbHits: 1, iotlbMisses: 2, faults: 3 });

    // A write to the clean entry re-walks (a miss); the next write hits.
    await run({ devId, iovas: [x], write: true });
    await run({ devId, iovas: [x], write: true });
    expect(await stats(vm)).toMatchObject({ translations: 7, iotlbHits: 2, iotlbMisses: 3, memoryReferences: 68, faults: 3, iotlbEntries: 1 });

    // A non-canonical access finds nothing in the IOTLB: a miss, a fault, 0 references.
    await run({ devId, iovas: [0x0000_8000_0000_0000n] });
    expect(await stats(vm)).toMatchObject({ translations: 8, iotlbHits: 2, iotlbMisses: 4, memoryReferences: 68, faults: 4 });
    expect((await stats(vm)).memoryReferences).toBe(refs);

    // invalidation_entries counts entries handled, also by a request that then fails.
    const ok = await vm.invalidate({ hwptId: nestedId, requests: { case: "vtdS1", value: { entries: [Stage1PageTable.invalidation(hole, SZ_4K), Stage1PageTable.invalidation(x, SZ_4K)] } } });
    expect(ok.entriesHandled).toBe(2);
    expect(await stats(vm)).toMatchObject({ invalidationEntries: 2, iotlbEntries: 0 });
    await expectErrno(
      vm.invalidate({ hwptId: nestedId, requests: { case: "vtdS1", value: { entries: [{ addr: x, npages: 1n }, { addr: x + 1n, npages: 1n }, { addr: x, npages: 1n }] } } }),
      "EINVAL",
      1,
    );
    expect(await stats(vm)).toMatchObject({ invalidationEntries: 3 });
  });
});
