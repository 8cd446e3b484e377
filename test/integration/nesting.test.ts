/**
 * Nesting: the mock's nested HWPTs and their invalidation
 * (iommufd-semantics.md §8.4), VT-d nested allocation, attach-time stage-1
 * validation, the nest-parent read-only errata and VT-d invalidation entries
 * (§7.1; vtd.md §4.4; api.md Hardware page tables, Fine points).
 */
import { describe, expect, it } from "vitest";
import {
  bind,
  dumpIotlb,
  expectFail,
  expectFailUnchanged,
  expectInvalidateFail,
  IOMMU_HWPT_DATA_SELFTEST,
  IOMMU_HWPT_DATA_VTD_S1,
  IOMMU_HWPT_INVALIDATE_DATA_SELFTEST,
  IOMMU_HWPT_INVALIDATE_DATA_SELFTEST_INVALID,
  IOMMU_HWPT_INVALIDATE_DATA_VTD_S1,
  IOMMU_TEST_INVALIDATE_FLAG_ALL,
  IOMMU_VTD_INV_FLAGS_LEAF,
  IOMMU_VTD_S1_EAFE,
  IOMMU_VTD_S1_SRE,
  IOMMU_VTD_S1_WPE,
  ioas,
  map,
  nestedHwpt,
  nestingSetup,
  nextId,
  PAGE,
  pagingHwpt,
  rawSelftest,
  rawVtd,
  selftestHwptBytes,
  selftestInv,
  selftestInvBytes,
  serverEnv,
  U64_MAX,
  unmapAllBytes,
  type Vm,
  vtdInv,
  vtdInvBytes,
  vtdS1Bytes,
} from "./helpers.js";

const env = serverEnv("nest");

const rawHwpt = (dataType: number, data: Uint8Array) => ({ case: "raw" as const, value: { dataType, data } });

async function invalidationEntries(vm: Vm): Promise<bigint> {
  return (await vm.v.getStats()).stats!.invalidationEntries;
}

describe("mock nested HWPT allocation (iommufd-semantics.md §8.4)", () => {
  it("sets all four iotlb values from iommu_hwpt_selftest.iotlb; typed and raw data are the same", async () => {
    const vm = await env.mockVm();
    const { dev, parent, nested } = await nestingSetup(vm, { iotlb: 0xabc });
    expect((await dumpIotlb(vm, nested)).selftestIotlb).toEqual([0xabc, 0xabc, 0xabc, 0xabc]);
    const raw = (await vm.v.allocHwpt({ devId: dev, ptId: parent, data: rawHwpt(IOMMU_HWPT_DATA_SELFTEST, selftestHwptBytes(0xffffffff)) })).hwptId;
    expect((await dumpIotlb(vm, raw)).selftestIotlb).toEqual([0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff]);
  });

  it("a data_type other than 0xdead (e.g. VT-d data) is UNIMPLEMENTED/EOPNOTSUPP and changes nothing", async () => {
    const vm = await env.mockVm();
    const dev = await bind(vm);
    const ioasId = await ioas(vm);
    const parent = await pagingHwpt(vm, dev, ioasId, { nestParent: true });
    await expectFailUnchanged(vm, { ioas: [ioasId] }, () => vm.v.allocHwpt({ devId: dev, ptId: parent, data: { case: "vtdS1", value: { addrWidth: 48, pgtblAddr: 0n, sre: false, eafe: false, wpe: false } } }), "EOPNOTSUPP");
    await expectFail(vm.v.allocHwpt({ devId: dev, ptId: parent, data: rawHwpt(IOMMU_HWPT_DATA_VTD_S1, selftestHwptBytes(1)) }), "EOPNOTSUPP");
  });

  it("data_len must be exactly 4: 3 or 5 bytes are EINVAL and change nothing", async () => {
    const vm = await env.mockVm();
    const dev = await bind(vm);
    const ioasId = await ioas(vm);
    const parent = await pagingHwpt(vm, dev, ioasId, { nestParent: true });
    for (const len of [1, 3, 5, 8]) {
      await expectFailUnchanged(vm, { ioas: [ioasId] }, () => vm.v.allocHwpt({ devId: dev, ptId: parent, data: rawHwpt(IOMMU_HWPT_DATA_SELFTEST, new Uint8Array(len)) }), "EINVAL");
    }
  });
});

describe("mock nested invalidation (iommufd-semantics.md §8.4)", () => {
  const IOTLB = 0x5a5a;

  it("an entry clears iotlb[iotlb_id]; FLAG_ALL clears all four; the response counts the entries", async () => {
    const vm = await env.mockVm();
    const { nested } = await nestingSetup(vm, { iotlb: IOTLB });
    expect((await vm.v.invalidate({ hwptId: nested, requests: selftestInv([{ iotlbId: 1 }, { iotlbId: 3 }]) })).entriesHandled).toBe(2);
    expect((await dumpIotlb(vm, nested)).selftestIotlb).toEqual([IOTLB, 0, IOTLB, 0]);
    expect((await vm.v.invalidate({ hwptId: nested, requests: selftestInv([{ iotlbId: 2, all: true }]) })).entriesHandled).toBe(1);
    expect((await dumpIotlb(vm, nested)).selftestIotlb).toEqual([0, 0, 0, 0]);
  });

  it("zero entries of the right type succeed with 0 handled and change nothing", async () => {
    const vm = await env.mockVm();
    const { nested } = await nestingSetup(vm, { iotlb: IOTLB });
    expect((await vm.v.invalidate({ hwptId: nested, requests: selftestInv([]) })).entriesHandled).toBe(0);
    expect((await vm.v.invalidate({ hwptId: nested, requests: rawSelftest([], { entryLen: 0, data: new Uint8Array() }) })).entriesHandled).toBe(0);
    expect((await dumpIotlb(vm, nested)).selftestIotlb).toEqual([IOTLB, IOTLB, IOTLB, IOTLB]);
  });

  it("a data_type other than 0xdeadbeef is EINVAL with 0 handled, even with 0 entries (VT-d entries included)", async () => {
    const vm = await env.mockVm();
    const { nested } = await nestingSetup(vm, { iotlb: IOTLB });
    await expectInvalidateFail(vm.v.invalidate({ hwptId: nested, requests: rawSelftest([{ flags: 0, iotlbId: 0 }], { dataType: IOMMU_HWPT_INVALIDATE_DATA_SELFTEST_INVALID }) }), "EINVAL", 0);
    await expectInvalidateFail(vm.v.invalidate({ hwptId: nested, requests: rawSelftest([], { dataType: IOMMU_HWPT_INVALIDATE_DATA_SELFTEST_INVALID }) }), "EINVAL", 0);
    await expectInvalidateFail(vm.v.invalidate({ hwptId: nested, requests: vtdInv([{ addr: 0n, npages: 1n }]) }), "EINVAL", 0);
    await expectInvalidateFail(vm.v.invalidate({ hwptId: nested, requests: vtdInv([]) }), "EINVAL", 0);
    expect((await dumpIotlb(vm, nested)).selftestIotlb).toEqual([IOTLB, IOTLB, IOTLB, IOTLB]);
  });

  it("entry_len other than 8 is EINVAL with 0 handled", async () => {
    const vm = await env.mockVm();
    const { nested } = await nestingSetup(vm, { iotlb: IOTLB });
    for (const entryLen of [4, 7, 9, 16]) {
      await expectInvalidateFail(vm.v.invalidate({ hwptId: nested, requests: rawSelftest([], { entryLen, entryNum: 1, data: new Uint8Array(16) }) }), "EINVAL", 0);
    }
    expect((await dumpIotlb(vm, nested)).selftestIotlb).toEqual([IOTLB, IOTLB, IOTLB, IOTLB]);
  });

  it("unknown flags are UNIMPLEMENTED/EOPNOTSUPP; iotlb_id > 3 is EINVAL, even with FLAG_ALL", async () => {
    const vm = await env.mockVm();
    const { nested } = await nestingSetup(vm, { iotlb: IOTLB });
    await expectInvalidateFail(vm.v.invalidate({ hwptId: nested, requests: rawSelftest([{ flags: 2, iotlbId: 0 }]) }), "EOPNOTSUPP", 0);
    await expectInvalidateFail(vm.v.invalidate({ hwptId: nested, requests: rawSelftest([{ flags: 0x80000000, iotlbId: 9 }]) }), "EOPNOTSUPP", 0);
    await expectInvalidateFail(vm.v.invalidate({ hwptId: nested, requests: selftestInv([{ iotlbId: 4 }]) }), "EINVAL", 0);
    await expectInvalidateFail(vm.v.invalidate({ hwptId: nested, requests: selftestInv([{ iotlbId: 4, all: true }]) }), "EINVAL", 0);
    expect((await dumpIotlb(vm, nested)).selftestIotlb).toEqual([IOTLB, IOTLB, IOTLB, IOTLB]);
  });

  it("entries are handled in order up to the first failure: the ones before it take effect and are counted, the rest do not", async () => {
    const vm = await env.mockVm();
    const { nested } = await nestingSetup(vm, { iotlb: IOTLB });
    await expectInvalidateFail(vm.v.invalidate({ hwptId: nested, requests: selftestInv([{ iotlbId: 0 }, { iotlbId: 1 }, { iotlbId: 9 }, { iotlbId: 2 }]) }), "EINVAL", 2);
    expect((await dumpIotlb(vm, nested)).selftestIotlb).toEqual([0, 0, IOTLB, IOTLB]);
    await expectInvalidateFail(vm.v.invalidate({ hwptId: nested, requests: rawSelftest([{ flags: 0, iotlbId: 2 }, { flags: 4, iotlbId: 3 }]) }), "EOPNOTSUPP", 1);
    expect((await dumpIotlb(vm, nested)).selftestIotlb).toEqual([0, 0, 0, IOTLB]);
  });

  it("an entry lying (wholly or partly) beyond the end of the raw data is OUT_OF_RANGE/EFAULT after the entries before it were handled", async () => {
    const vm = await env.mockVm();
    const { nested } = await nestingSetup(vm, { iotlb: IOTLB });
    const two = selftestInvBytes([{ flags: 0, iotlbId: 0 }, { flags: 0, iotlbId: 1 }]);
    await expectInvalidateFail(vm.v.invalidate({ hwptId: nested, requests: rawSelftest([], { entryNum: 3, data: two }) }), "EFAULT", 2);
    expect((await dumpIotlb(vm, nested)).selftestIotlb).toEqual([0, 0, IOTLB, IOTLB]);
    await expectInvalidateFail(vm.v.invalidate({ hwptId: nested, requests: rawSelftest([], { entryNum: 1, data: selftestInvBytes([{ flags: 0, iotlbId: 2 }]).subarray(0, 7) }) }), "EFAULT", 0);
    expect((await dumpIotlb(vm, nested)).selftestIotlb).toEqual([0, 0, IOTLB, IOTLB]);
  });

  it("bytes past entry_len x entry_num are ignored", async () => {
    const vm = await env.mockVm();
    const { nested } = await nestingSetup(vm, { iotlb: IOTLB });
    const data = selftestInvBytes([{ flags: 0, iotlbId: 3 }, { flags: 0xff, iotlbId: 99 }]);
    expect((await vm.v.invalidate({ hwptId: nested, requests: rawSelftest([], { entryNum: 1, data }) })).entriesHandled).toBe(1);
    expect((await dumpIotlb(vm, nested)).selftestIotlb).toEqual([IOTLB, IOTLB, IOTLB, 0]);
  });

  it("GetStats.invalidation_entries counts the entries handled, by failed requests too (api.md Fine points)", async () => {
    const vm = await env.mockVm();
    const { nested } = await nestingSetup(vm);
    expect(await invalidationEntries(vm)).toBe(0n);
    await vm.v.invalidate({ hwptId: nested, requests: selftestInv([{ iotlbId: 0 }, { iotlbId: 1 }]) });
    expect(await invalidationEntries(vm)).toBe(2n);
    await expectInvalidateFail(vm.v.invalidate({ hwptId: nested, requests: selftestInv([{ iotlbId: 0 }, { iotlbId: 1 }, { iotlbId: 2 }, { iotlbId: 7 }]) }), "EINVAL", 3);
    expect(await invalidationEntries(vm)).toBe(5n);
    await expectInvalidateFail(vm.v.invalidate({ hwptId: nested }), "EINVAL", 0);
    expect(await invalidationEntries(vm)).toBe(5n);
  });
});

describe("VT-d nested allocation (iommufd-semantics.md §7.1)", () => {
  it("the parent must be a nest parent: a plain VT-d paging HWPT is EINVAL", async () => {
    const vm = await env.vtdVm();
    const dev = await bind(vm);
    const ioasId = await ioas(vm);
    const plain = await pagingHwpt(vm, dev, ioasId);
    await expectFailUnchanged(vm, { ioas: [ioasId] }, () => nestedHwpt(vm, dev, plain), "EINVAL");
  });

  it("the data type must be IOMMU_HWPT_DATA_VTD_S1 (1): selftest data is EOPNOTSUPP", async () => {
    const vm = await env.vtdVm();
    const dev = await bind(vm);
    const ioasId = await ioas(vm);
    const parent = await pagingHwpt(vm, dev, ioasId, { nestParent: true });
    await expectFailUnchanged(vm, { ioas: [ioasId] }, () => vm.v.allocHwpt({ devId: dev, ptId: parent, data: { case: "selftest", value: { iotlb: 1 } } }), "EOPNOTSUPP");
    await expectFail(vm.v.allocHwpt({ devId: dev, ptId: parent, data: rawHwpt(IOMMU_HWPT_DATA_SELFTEST, vtdS1Bytes({ flags: 0n, pgtblAddr: 0n, addrWidth: 48 })) }), "EOPNOTSUPP");
  });

  it("data_len must be exactly 24 (struct iommu_hwpt_vtd_s1): 16, 23, 25 and 32 bytes are EINVAL and change nothing", async () => {
    const vm = await env.vtdVm();
    const dev = await bind(vm);
    const ioasId = await ioas(vm);
    const parent = await pagingHwpt(vm, dev, ioasId, { nestParent: true });
    const full = new Uint8Array(32);
    full.set(vtdS1Bytes({ flags: 0n, pgtblAddr: 0x1000n, addrWidth: 48 }));
    for (const len of [16, 23, 25, 32]) {
      await expectFailUnchanged(vm, { ioas: [ioasId] }, () => vm.v.allocHwpt({ devId: dev, ptId: parent, data: rawHwpt(IOMMU_HWPT_DATA_VTD_S1, full.subarray(0, len)) }), "EINVAL");
    }
    expect((await vm.v.allocHwpt({ devId: dev, ptId: parent, data: rawHwpt(IOMMU_HWPT_DATA_VTD_S1, full.subarray(0, 24)) })).hwptId).toBeGreaterThan(0);
  });

  it("nothing in the data is validated at allocation: odd addr_width, SRE, unknown flag bits and __reserved all allocate", async () => {
    const vm = await env.vtdVm();
    const dev = await bind(vm);
    const ioasId = await ioas(vm);
    const parent = await pagingHwpt(vm, dev, ioasId, { nestParent: true });
    for (const s of [
      { flags: 0n, pgtblAddr: 0n, addrWidth: 0 },
      { flags: 0n, pgtblAddr: 0x123n, addrWidth: 39 },
      { flags: 0n, pgtblAddr: 0n, addrWidth: 57 },
      { flags: IOMMU_VTD_S1_SRE | IOMMU_VTD_S1_WPE, pgtblAddr: 0n, addrWidth: 48 },
      { flags: 1n << 40n, pgtblAddr: U64_MAX, addrWidth: 0xffffffff, reserved: 0xffffffff },
    ]) {
      await vm.v.allocHwpt({ devId: dev, ptId: parent, data: rawHwpt(IOMMU_HWPT_DATA_VTD_S1, vtdS1Bytes(s)) });
    }
  });
});

describe("VT-d stage-1 validation at attach (iommufd-semantics.md §7.1; vtd.md §4.4; api.md VmOptions)", () => {
  /** Allocates a nested HWPT with `s1` and attaches a device to it (RID). */
  async function attachNested(vm: Vm, s1: { sre?: boolean; eafe?: boolean; wpe?: boolean; addrWidth?: number }) {
    const { dev, ioasId, nested } = await nestingSetup(vm, { vtd: s1 });
    return { dev, ioasId, nested, attach: () => vm.v.attachDevice({ devId: dev, ptId: nested }) };
  }

  it("addr_width 48 attaches", async () => {
    const vm = await env.vtdVm();
    const { nested, attach } = await attachNested(vm, { addrWidth: 48 });
    expect((await attach()).hwptId).toBe(nested);
  });

  it("addr_width 57 is EINVAL at attach without five_level, and the device stays detached", async () => {
    const vm = await env.vtdVm({ fiveLevel: false });
    const { dev, ioasId, attach } = await attachNested(vm, { addrWidth: 57 });
    await expectFailUnchanged(vm, { ioas: [ioasId] }, attach, "EINVAL");
    await vm.v.attachDevice({ devId: dev, ptId: ioasId });
  });

  it("addr_width 57 attaches with five_level", async () => {
    const vm = await env.vtdVm({ fiveLevel: true });
    const { nested, attach } = await attachNested(vm, { addrWidth: 57 });
    expect((await attach()).hwptId).toBe(nested);
  });

  it.each([[0], [39], [47], [49], [56], [64]])("addr_width %d is EINVAL at attach, with or without five_level", async (addrWidth) => {
    for (const fiveLevel of [false, true]) {
      const vm = await env.vtdVm({ fiveLevel });
      const { attach } = await attachNested(vm, { addrWidth });
      await expectFail(attach(), "EINVAL");
    }
  });

  it("SRE is EINVAL at attach (the unit does not advertise ECAP.SRS); WPE alone is accepted; EAFE is accepted (ECAP.EAFS)", async () => {
    const vm = await env.vtdVm();
    await expectFail((await attachNested(vm, { sre: true })).attach(), "EINVAL");
    await expectFail((await attachNested(vm, { sre: true, wpe: true })).attach(), "EINVAL");
    await (await attachNested(vm, { wpe: true })).attach();
    await (await attachNested(vm, { eafe: true })).attach();
  });

  it("the same checks apply to a replace onto the nested HWPT, which keeps the old attachment on failure", async () => {
    const vm = await env.vtdVm();
    const { dev, ioasId, parent } = await nestingSetup(vm);
    const bad = await nestedHwpt(vm, dev, parent, { vtd: { addrWidth: 57 } });
    const auto = (await vm.v.attachDevice({ devId: dev, ptId: ioasId })).hwptId;
    await expectFailUnchanged(vm, { ioas: [ioasId] }, () => vm.v.attachDevice({ devId: dev, ptId: bad, replace: true }), "EINVAL");
    await expectFail(vm.v.destroy({ id: auto }), "EBUSY");
    await vm.v.destroy({ id: bad });
  });

  it("a PASID attach of a PASID-capable nested HWPT runs the same checks", async () => {
    const vm = await env.vtdVm();
    const dev = await bind(vm, { pasid: true });
    const ioasId = await ioas(vm);
    const parent = await pagingHwpt(vm, dev, ioasId, { nestParent: true });
    const good = await nestedHwpt(vm, dev, parent, { pasid: true });
    const bad = await nestedHwpt(vm, dev, parent, { pasid: true, vtd: { sre: true } });
    await vm.v.attachDevice({ devId: dev, ptId: good, pasid: 10 });
    await expectFail(vm.v.attachDevice({ devId: dev, ptId: bad, pasid: 11 }), "EINVAL");
  });
});

describe("VT-d nest parents refuse read-only areas (api.md Fine points; §7.1 ERRATA_772415_SPR17)", () => {
  async function withNestParent(vm: Vm) {
    const dev = await bind(vm);
    const ioasId = await ioas(vm);
    const parent = await pagingHwpt(vm, dev, ioasId, { nestParent: true });
    return { dev, ioasId, parent };
  }

  it("a read-only MapIoas into an IOAS with a nest-parent domain is EINVAL and maps nothing; read-write and write-only are fine", async () => {
    const vm = await env.vtdVm();
    const { ioasId } = await withNestParent(vm);
    await expectFailUnchanged(vm, { ioas: [ioasId] }, () => vm.v.mapIoas({ ioasId, userVa: 0n, length: PAGE, iova: 0x10000n, readable: true }), "EINVAL");
    await expectFail(vm.v.mapIoas({ ioasId, userVa: 0n, length: PAGE, readable: true }), "EINVAL");
    await map(vm, ioasId, { iova: 0x10000n });
    await map(vm, ioasId, { iova: 0x20000n, readable: false, writeable: true });
    expect(await unmapAllBytes(vm, ioasId)).toBe(2n * PAGE);
  });

  it("a read-only CopyIoas into an IOAS with a nest-parent domain is EINVAL and maps nothing", async () => {
    const vm = await env.vtdVm();
    const { ioasId } = await withNestParent(vm);
    const src = await ioas(vm);
    await map(vm, src, { iova: 0x10000n });
    await expectFailUnchanged(vm, { ioas: [ioasId, src] }, () => vm.v.copyIoas({ dstIoasId: ioasId, srcIoasId: src, srcIova: 0x10000n, length: PAGE, dstIova: 0x10000n, readable: true }), "EINVAL");
    await vm.v.copyIoas({ dstIoasId: ioasId, srcIoasId: src, srcIova: 0x10000n, length: PAGE, dstIova: 0x10000n, readable: true, writeable: true });
    expect(await unmapAllBytes(vm, ioasId)).toBe(PAGE);
  });

  it("AllocHwpt(nest_parent) on an IOAS already holding a read-only area is EINVAL and changes nothing; a plain paging HWPT is fine", async () => {
    const vm = await env.vtdVm();
    const dev = await bind(vm);
    const ioasId = await ioas(vm);
    await map(vm, ioasId, { iova: 0x10000n, readable: true, writeable: false });
    await expectFailUnchanged(vm, { ioas: [ioasId] }, () => vm.v.allocHwpt({ devId: dev, ptId: ioasId, nestParent: true }), "EINVAL");
    await pagingHwpt(vm, dev, ioasId);
    // With a plain domain present the read-only area stays refused for a nest parent.
    await expectFail(vm.v.allocHwpt({ devId: dev, ptId: ioasId, nestParent: true }), "EINVAL");
    expect(await unmapAllBytes(vm, ioasId)).toBe(PAGE);
  });

  it("a read-only area is fine while the IOAS has only non-nest-parent domains", async () => {
    const vm = await env.vtdVm();
    const dev = await bind(vm);
    const ioasId = await ioas(vm);
    await pagingHwpt(vm, dev, ioasId);
    await vm.v.attachDevice({ devId: dev, ptId: ioasId });
    await map(vm, ioasId, { iova: 0x10000n, readable: true, writeable: false });
  });

  it("the mock has no such errata: read-only areas and nest parents mix", async () => {
    const vm = await env.mockVm();
    const dev = await bind(vm);
    const ioasId = await ioas(vm);
    await pagingHwpt(vm, dev, ioasId, { nestParent: true });
    await map(vm, ioasId, { readable: true, writeable: false });
  });
});

describe("VT-d invalidation entries (iommufd-semantics.md §7.1; vtd.md §4.4)", () => {
  async function vtdNested(options = {}) {
    const vm = await env.vtdVm(options);
    const s = await nestingSetup(vm);
    return { vm, ...s };
  }

  it("valid entries are all handled: aligned ranges, LEAF, and addr 0 with npages U64_MAX (everything)", async () => {
    const { vm, nested } = await vtdNested();
    const r = await vm.v.invalidate({
      hwptId: nested,
      requests: vtdInv([
        { addr: 0x5000n, npages: 3n },
        { addr: 0x200000n, npages: 512n, leaf: true },
        { addr: 0n, npages: U64_MAX },
        { addr: 0n, npages: 0n },
      ]),
    });
    expect(r.entriesHandled).toBe(4);
  });

  it("zero entries of type VTD_S1 succeed with 0 handled", async () => {
    const { vm, nested } = await vtdNested();
    expect((await vm.v.invalidate({ hwptId: nested, requests: vtdInv([]) })).entriesHandled).toBe(0);
    expect((await vm.v.invalidate({ hwptId: nested, requests: rawVtd([], { entryLen: 0, data: new Uint8Array() }) })).entriesHandled).toBe(0);
  });

  it("flags other than LEAF are UNIMPLEMENTED/EOPNOTSUPP; a non-zero __reserved too", async () => {
    const { vm, nested } = await vtdNested();
    for (const flags of [2, 4, 0x80000000, IOMMU_VTD_INV_FLAGS_LEAF | 2]) {
      await expectInvalidateFail(vm.v.invalidate({ hwptId: nested, requests: rawVtd([{ addr: 0n, npages: 1n, flags }]) }), "EOPNOTSUPP", 0);
    }
    await expectInvalidateFail(vm.v.invalidate({ hwptId: nested, requests: rawVtd([{ addr: 0n, npages: 1n, reserved: 1 }]) }), "EOPNOTSUPP", 0);
  });

  it("EOPNOTSUPP (flags) is checked before EINVAL (address) within an entry", async () => {
    const { vm, nested } = await vtdNested();
    await expectInvalidateFail(vm.v.invalidate({ hwptId: nested, requests: rawVtd([{ addr: 0x1001n, npages: 1n, flags: 2 }]) }), "EOPNOTSUPP", 0);
    await expectInvalidateFail(vm.v.invalidate({ hwptId: nested, requests: rawVtd([{ addr: 0x1000n, npages: U64_MAX, reserved: 5 }]) }), "EOPNOTSUPP", 0);
  });

  it("an addr not 4 KiB aligned is EINVAL; npages U64_MAX with addr != 0 is EINVAL", async () => {
    const { vm, nested } = await vtdNested();
    for (const addr of [1n, 0x800n, 0x1fffn, U64_MAX]) {
      await expectInvalidateFail(vm.v.invalidate({ hwptId: nested, requests: vtdInv([{ addr, npages: 1n }]) }), "EINVAL", 0);
    }
    await expectInvalidateFail(vm.v.invalidate({ hwptId: nested, requests: vtdInv([{ addr: PAGE, npages: U64_MAX }]) }), "EINVAL", 0);
  });

  it("entry_len other than 24 is EINVAL with 0 handled", async () => {
    const { vm, nested } = await vtdNested();
    const data = new Uint8Array(64);
    for (const entryLen of [8, 16, 23, 25, 32]) {
      await expectInvalidateFail(vm.v.invalidate({ hwptId: nested, requests: rawVtd([], { entryLen, entryNum: 1, data }) }), "EINVAL", 0);
    }
  });

  it("a data_type other than VTD_S1 (0) is EINVAL with 0 handled, even with 0 entries (selftest entries included)", async () => {
    const { vm, nested } = await vtdNested();
    await expectInvalidateFail(vm.v.invalidate({ hwptId: nested, requests: rawVtd([{ addr: 0n, npages: 1n }], { dataType: 1 }) }), "EINVAL", 0);
    await expectInvalidateFail(vm.v.invalidate({ hwptId: nested, requests: rawVtd([], { dataType: IOMMU_HWPT_INVALIDATE_DATA_SELFTEST }) }), "EINVAL", 0);
    await expectInvalidateFail(vm.v.invalidate({ hwptId: nested, requests: selftestInv([{ iotlbId: 0 }]) }), "EINVAL", 0);
    await expectInvalidateFail(vm.v.invalidate({ hwptId: nested, requests: selftestInv([]) }), "EINVAL", 0);
  });

  it("processing stops at the first failing entry; entries_handled counts the ones before it", async () => {
    const { vm, nested } = await vtdNested();
    await expectInvalidateFail(
      vm.v.invalidate({ hwptId: nested, requests: vtdInv([{ addr: 0n, npages: 1n }, { addr: PAGE, npages: 2n, leaf: true }, { addr: 0x3001n, npages: 1n }, { addr: 0n, npages: 1n }]) }),
      "EINVAL",
      2,
    );
    await expectInvalidateFail(vm.v.invalidate({ hwptId: nested, requests: rawVtd([{ addr: 0n, npages: 1n }, { addr: 0n, npages: 1n, flags: 8 }]) }), "EOPNOTSUPP", 1);
  });

  it("an entry beyond the end of the raw data is OUT_OF_RANGE/EFAULT with the earlier entries counted; bytes past entry_len x entry_num are ignored", async () => {
    const { vm, nested } = await vtdNested();
    const two = vtdInvBytes([{ addr: 0n, npages: 1n }, { addr: PAGE, npages: 1n }]);
    await expectInvalidateFail(vm.v.invalidate({ hwptId: nested, requests: rawVtd([], { entryNum: 3, data: two }) }), "EFAULT", 2);
    await expectInvalidateFail(vm.v.invalidate({ hwptId: nested, requests: rawVtd([], { entryNum: 2, data: two.subarray(0, 40) }) }), "EFAULT", 1);
    await expectInvalidateFail(vm.v.invalidate({ hwptId: nested, requests: rawVtd([], { entryNum: 1, data: two.subarray(0, 23) }) }), "EFAULT", 0);
    const withJunk = new Uint8Array(48);
    withJunk.set(vtdInvBytes([{ addr: 0n, npages: 1n }]));
    withJunk.fill(0xff, 24);
    expect((await vm.v.invalidate({ hwptId: nested, requests: rawVtd([], { entryNum: 1, data: withJunk }) })).entriesHandled).toBe(1);
  });

  it("the nest parent is not a valid target: EINVAL with 0 handled", async () => {
    const { vm, parent } = await vtdNested();
    await expectInvalidateFail(vm.v.invalidate({ hwptId: parent, requests: vtdInv([{ addr: 0n, npages: 1n }]) }), "EINVAL", 0);
  });

  it("entries handled are counted in GetStats, by failed requests too", async () => {
    const { vm, nested } = await vtdNested();
    await vm.v.invalidate({ hwptId: nested, requests: vtdInv([{ addr: 0n, npages: 1n }]) });
    await expectInvalidateFail(vm.v.invalidate({ hwptId: nested, requests: vtdInv([{ addr: 0n, npages: 1n }, { addr: 1n, npages: 1n }]) }), "EINVAL", 1);
    expect(await invalidationEntries(vm)).toBe(2n);
  });
});

describe("nested HWPT lifetime and uAPI constants (iommufd-semantics.md §1.2, §2.3, §5)", () => {
  it("a failed nested allocation takes no reference on the parent and no id", async () => {
    const vm = await env.vtdVm();
    const dev = await bind(vm);
    const ioasId = await ioas(vm);
    const parent = await pagingHwpt(vm, dev, ioasId, { nestParent: true });
    const next = await nextId(vm);
    await expectFail(vm.v.allocHwpt({ devId: dev, ptId: parent, data: rawHwpt(IOMMU_HWPT_DATA_VTD_S1, new Uint8Array(8)) }), "EINVAL");
    expect(await nextId(vm)).toBe(next);
    await vm.v.destroy({ id: parent });
    await vm.v.destroy({ id: ioasId });
  });

  it("invalidation entry constants agree with the typed form (LEAF = 1, FLAG_ALL = 1, VTD_S1 = 0, selftest = 0xdeadbeef)", async () => {
    const vm = await env.mockVm();
    const { nested } = await nestingSetup(vm, { iotlb: 1 });
    expect(
      (await vm.v.invalidate({ hwptId: nested, requests: rawSelftest([{ flags: IOMMU_TEST_INVALIDATE_FLAG_ALL, iotlbId: 0 }], { dataType: IOMMU_HWPT_INVALIDATE_DATA_SELFTEST }) })).entriesHandled,
    ).toBe(1);
    expect((await dumpIotlb(vm, nested)).selftestIotlb).toEqual([0, 0, 0, 0]);
    const vtd = await env.vtdVm();
    const s = await nestingSetup(vtd);
    expect((await vtd.v.invalidate({ hwptId: s.nested, requests: rawVtd([{ addr: 0n, npages: 1n, flags: IOMMU_VTD_INV_FLAGS_LEAF }], { dataType: IOMMU_HWPT_INVALIDATE_DATA_VTD_S1 }) })).entriesHandled).toBe(1);
  });
});

describe("VT-d raw stage-1 flags reach the attach checks (iommufd-semantics.md §2.2, §7.1)", () => {
  it("raw flags SRE → EINVAL at attach; raw EAFE → attaches", async () => {
    const vm = await env.vtdVm();
    const dev = await bind(vm);
    const ioasId = await ioas(vm);
    const parent = await pagingHwpt(vm, dev, ioasId, { nestParent: true });
    const sre = (await vm.v.allocHwpt({ devId: dev, ptId: parent, data: rawHwpt(IOMMU_HWPT_DATA_VTD_S1, vtdS1Bytes({ flags: IOMMU_VTD_S1_SRE, pgtblAddr: 0n, addrWidth: 48 })) })).hwptId;
    const eafe = (await vm.v.allocHwpt({ devId: dev, ptId: parent, data: rawHwpt(IOMMU_HWPT_DATA_VTD_S1, vtdS1Bytes({ flags: IOMMU_VTD_S1_EAFE, pgtblAddr: 0n, addrWidth: 48 })) })).hwptId;
    await expectFail(vm.v.attachDevice({ devId: dev, ptId: sre }), "EINVAL");
    await vm.v.attachDevice({ devId: dev, ptId: eafe });
  });
});
