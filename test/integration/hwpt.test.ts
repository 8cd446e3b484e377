/**
 * HWPT allocation, destroy rules, DumpIotlb and Invalidate's target checks
 * (iommufd-semantics.md §1.2, §3.1, §3.9, §3.10; api.md Hardware page tables).
 * Nested allocation data and invalidation entries are in nesting.test.ts.
 */
import { describe, expect, it } from "vitest";
import {
  bind,
  dumpIotlb,
  expectFail,
  expectFailUnchanged,
  expectInvalidateFail,
  IOMMU_HWPT_DATA_NONE,
  IOMMU_HWPT_DATA_SELFTEST,
  ioas,
  map,
  MOCK_APERTURE_START,
  nestedHwpt,
  nestingSetup,
  nextId,
  objectCount,
  PAGE,
  pagingHwpt,
  ranges,
  rawSelftest,
  selftestHwptBytes,
  selftestInv,
  serverEnv,
  type Vm,
} from "./helpers.js";

const env = serverEnv("hwpt");

async function devAndIoas(vm: Vm, dirty = true) {
  return { dev: await bind(vm, { dirty }), ioasId: await ioas(vm) };
}

describe("AllocHwpt check order (iommufd-semantics.md §3.9)", () => {
  it("checks data_type against data_len (EINVAL) before the device lookup", async () => {
    const vm = await env.mockVm();
    // data_type NONE with data, and a data_type with no data: both EINVAL even with unknown ids.
    await expectFail(vm.v.allocHwpt({ devId: 50, ptId: 51, data: { case: "raw", value: { dataType: IOMMU_HWPT_DATA_NONE, data: new Uint8Array(4) } } }), "EINVAL");
    await expectFail(vm.v.allocHwpt({ devId: 50, ptId: 51, data: { case: "raw", value: { dataType: IOMMU_HWPT_DATA_SELFTEST, data: new Uint8Array() } } }), "EINVAL");
  });

  it("looks the device up (ENOENT) before pt_id (EINVAL)", async () => {
    const vm = await env.mockVm();
    await expectFail(vm.v.allocHwpt({ devId: 50, ptId: 51 }), "ENOENT");
    await expectFail(vm.v.allocHwpt({ devId: 0, ptId: 0 }), "ENOENT");
  });

  it("dev_id must be a device: an IOAS id there is ENOENT", async () => {
    const vm = await env.mockVm();
    const { ioasId } = await devAndIoas(vm);
    await expectFail(vm.v.allocHwpt({ devId: ioasId, ptId: ioasId }), "ENOENT");
  });

  it("a missing pt_id is INVALID_ARGUMENT/EINVAL, not ENOENT (pt_id is looked up with ANY type)", async () => {
    const vm = await env.mockVm();
    const { dev } = await devAndIoas(vm);
    await expectFail(vm.v.allocHwpt({ devId: dev, ptId: 0 }), "EINVAL");
    await expectFail(vm.v.allocHwpt({ devId: dev, ptId: 99 }), "EINVAL");
  });

  it("pt_id of a device or a nested HWPT is EINVAL (nested-on-nested included)", async () => {
    const vm = await env.mockVm();
    const { dev, nested } = await nestingSetup(vm);
    await expectFail(vm.v.allocHwpt({ devId: dev, ptId: dev }), "EINVAL");
    await expectFail(vm.v.allocHwpt({ devId: dev, ptId: nested, data: { case: "selftest", value: { iotlb: 1 } } }), "EINVAL");
    await expectFail(vm.v.allocHwpt({ devId: dev, ptId: nested }), "EINVAL");
  });
});

describe("AllocHwpt on an IOAS: a paging HWPT (iommufd-semantics.md §3.9)", () => {
  it("returns the next id and does not attach the device", async () => {
    const vm = await env.mockVm();
    const { dev, ioasId } = await devAndIoas(vm);
    const hwpt = await pagingHwpt(vm, dev, ioasId);
    expect(hwpt).toBe(3);
    // Not attached: a detach is a no-op and an attach (not replace) succeeds.
    await vm.v.detachDevice({ devId: dev });
    expect((await vm.v.attachDevice({ devId: dev, ptId: hwpt })).hwptId).toBe(hwpt);
  });

  it("DIRTY_TRACKING for a device without dirty tracking is UNIMPLEMENTED/EOPNOTSUPP and changes nothing; with it the HWPT is allocated", async () => {
    const vm = await env.mockVm();
    const { dev: clean, ioasId } = await devAndIoas(vm, false);
    const dirty = await bind(vm, { dirty: true });
    await expectFailUnchanged(vm, { ioas: [ioasId] }, () => vm.v.allocHwpt({ devId: clean, ptId: ioasId, dirtyTracking: true }), "EOPNOTSUPP");
    await pagingHwpt(vm, dirty, ioasId, { dirtyTracking: true });
  });

  it("driver data on an IOAS target is EOPNOTSUPP (mock 6.17, §8.3) and changes nothing", async () => {
    const vm = await env.mockVm();
    const { dev, ioasId } = await devAndIoas(vm);
    await expectFailUnchanged(vm, { ioas: [ioasId] }, () => vm.v.allocHwpt({ devId: dev, ptId: ioasId, data: { case: "selftest", value: { iotlb: 0 } } }), "EOPNOTSUPP");
  });

  it("VT-d takes no driver data for a paging HWPT either (EOPNOTSUPP)", async () => {
    const vm = await env.vtdVm();
    const { dev, ioasId } = await devAndIoas(vm);
    await expectFailUnchanged(
      vm,
      { ioas: [ioasId] },
      () => vm.v.allocHwpt({ devId: dev, ptId: ioasId, data: { case: "vtdS1", value: { addrWidth: 48, pgtblAddr: 0n, sre: false, eafe: false, wpe: false } } }),
      "EOPNOTSUPP",
    );
  });

  it("an existing area outside the new domain's aperture is FAILED_PRECONDITION/EADDRINUSE and nothing changes", async () => {
    const vm = await env.mockVm();
    const { dev, ioasId } = await devAndIoas(vm);
    await map(vm, ioasId, { iova: 0x1000n });
    await expectFailUnchanged(vm, { ioas: [ioasId] }, () => vm.v.allocHwpt({ devId: dev, ptId: ioasId }), "EADDRINUSE");
    // The IOAS is not held by a half-made HWPT.
    await vm.v.destroy({ id: ioasId });
  });

  it("an existing area not aligned to the new domain's page size is EADDRINUSE and nothing changes", async () => {
    const vm = await env.mockVm();
    const { dev, ioasId } = await devAndIoas(vm);
    await map(vm, ioasId, { iova: MOCK_APERTURE_START, length: 0x400n });
    await expectFailUnchanged(vm, { ioas: [ioasId] }, () => vm.v.allocHwpt({ devId: dev, ptId: ioasId }), "EADDRINUSE");
  });

  it("areas inside the aperture are kept and the paging HWPT takes them", async () => {
    const vm = await env.mockVm();
    const { dev, ioasId } = await devAndIoas(vm);
    await map(vm, ioasId, { iova: MOCK_APERTURE_START, length: 4n * PAGE });
    await pagingHwpt(vm, dev, ioasId);
    expect((await vm.v.unmapIoas({ ioasId, iova: MOCK_APERTURE_START, length: 4n * PAGE })).length).toBe(4n * PAGE);
  });
});

describe("Destroy (iommufd-semantics.md §1.2, §3.1)", () => {
  it("an IOAS held by a paging HWPT is FAILED_PRECONDITION/EBUSY until the HWPT is destroyed", async () => {
    const vm = await env.mockVm();
    const { dev, ioasId } = await devAndIoas(vm);
    const hwpt = await pagingHwpt(vm, dev, ioasId);
    await expectFailUnchanged(vm, { ioas: [ioasId] }, () => vm.v.destroy({ id: ioasId }), "EBUSY");
    await vm.v.destroy({ id: hwpt });
    await vm.v.destroy({ id: ioasId });
    expect(await objectCount(vm)).toBe(1);
  });

  it("an attached HWPT is EBUSY until the device detaches", async () => {
    const vm = await env.vtdVm();
    const { dev, ioasId } = await devAndIoas(vm);
    const hwpt = await pagingHwpt(vm, dev, ioasId);
    await vm.v.attachDevice({ devId: dev, ptId: hwpt });
    await expectFail(vm.v.destroy({ id: hwpt }), "EBUSY");
    await vm.v.detachDevice({ devId: dev });
    await vm.v.destroy({ id: hwpt });
  });

  it("a nest parent is EBUSY while a nested HWPT uses it; a nested HWPT is EBUSY while attached", async () => {
    const vm = await env.mockVm();
    const { dev, parent, nested } = await nestingSetup(vm);
    await vm.v.attachDevice({ devId: dev, ptId: nested });
    await expectFail(vm.v.destroy({ id: parent }), "EBUSY");
    await expectFail(vm.v.destroy({ id: nested }), "EBUSY");
    await vm.v.detachDevice({ devId: dev });
    await expectFail(vm.v.destroy({ id: parent }), "EBUSY");
    await vm.v.destroy({ id: nested });
    await vm.v.destroy({ id: parent });
  });

  it("a device id is always EBUSY (only UnbindDevice removes it)", async () => {
    const vm = await env.mockVm();
    const { dev } = await devAndIoas(vm);
    await expectFail(vm.v.destroy({ id: dev }), "EBUSY");
  });

  it("an automatic HWPT is EBUSY while a device is attached, and goes away by itself with its last device", async () => {
    const vm = await env.mockVm();
    const { dev, ioasId } = await devAndIoas(vm);
    const auto = (await vm.v.attachDevice({ devId: dev, ptId: ioasId })).hwptId;
    await expectFail(vm.v.destroy({ id: auto }), "EBUSY");
    await vm.v.detachDevice({ devId: dev });
    await expectFail(vm.v.destroy({ id: auto }), "ENOENT");
    expect(await nextId(vm)).toBe(auto);
  });

  it("destroying a HWPT frees its id for reuse and its reservations from the IOAS", async () => {
    const vm = await env.mockVm();
    const { dev, ioasId } = await devAndIoas(vm);
    const before = await ranges(vm, ioasId);
    const hwpt = await pagingHwpt(vm, dev, ioasId);
    await vm.v.destroy({ id: hwpt });
    expect(await ranges(vm, ioasId)).toEqual(before);
    expect(await pagingHwpt(vm, dev, ioasId)).toBe(hwpt);
  });
});

describe("DumpIotlb (api.md Hardware page tables, Fine points)", () => {
  it("a missing id is NOT_FOUND/ENOENT; an existing id that is not a HWPT is INVALID_ARGUMENT/EINVAL", async () => {
    const vm = await env.mockVm();
    const { dev, ioasId } = await devAndIoas(vm);
    await expectFail(vm.v.dumpIotlb({ hwptId: 99 }), "ENOENT");
    await expectFail(vm.v.dumpIotlb({ hwptId: 0 }), "ENOENT");
    await expectFail(vm.v.dumpIotlb({ hwptId: ioasId }), "EINVAL");
    await expectFail(vm.v.dumpIotlb({ hwptId: dev }), "EINVAL");
  });

  it("a non-nested MOCK HWPT (manual or automatic) is ENOENT, as MD_CHECK_IOTLB", async () => {
    const vm = await env.mockVm();
    const { dev, ioasId } = await devAndIoas(vm);
    const hwpt = await pagingHwpt(vm, dev, ioasId, { nestParent: true });
    await expectFail(vm.v.dumpIotlb({ hwptId: hwpt }), "ENOENT");
    const auto = (await vm.v.attachDevice({ devId: dev, ptId: ioasId })).hwptId;
    await expectFail(vm.v.dumpIotlb({ hwptId: auto }), "ENOENT");
  });

  it("a MOCK nested HWPT shows its four iotlb values, all set from the allocation data", async () => {
    const vm = await env.mockVm();
    const { nested } = await nestingSetup(vm, { iotlb: 0x12345 });
    expect(await dumpIotlb(vm, nested)).toEqual({ selftestIotlb: [0x12345, 0x12345, 0x12345, 0x12345], entries: [] });
  });

  it("a VT-d paging or nested HWPT answers with IOTLB entries (none before any DMA) and no selftest values", async () => {
    const vm = await env.vtdVm();
    const { dev, parent, nested } = await nestingSetup(vm);
    const plain = await pagingHwpt(vm, dev, await ioas(vm));
    for (const id of [parent, nested, plain]) expect(await dumpIotlb(vm, id)).toEqual({ selftestIotlb: [], entries: [] });
  });
});

describe("Invalidate: request and target checks (iommufd-semantics.md §3.10; api.md)", () => {
  it("no oneof case set is INVALID_ARGUMENT/EINVAL with entries_handled 0, before the HWPT lookup", async () => {
    const vm = await env.mockVm();
    await expectInvalidateFail(vm.v.invalidate({ hwptId: 99 }), "EINVAL", 0);
    const { nested } = await nestingSetup(vm);
    await expectInvalidateFail(vm.v.invalidate({ hwptId: nested }), "EINVAL", 0);
  });

  it("entry_num > 0 with empty data (data_uptr NULL) or entry_len 0 is EINVAL, 0 handled, before the HWPT lookup", async () => {
    const vm = await env.mockVm();
    await expectInvalidateFail(vm.v.invalidate({ hwptId: 99, requests: rawSelftest([], { entryNum: 1, data: new Uint8Array() }) }), "EINVAL", 0);
    await expectInvalidateFail(vm.v.invalidate({ hwptId: 99, requests: rawSelftest([{ flags: 0, iotlbId: 0 }], { entryLen: 0 }) }), "EINVAL", 0);
  });

  it("entry_num 0 ignores entry_len and data: the target is then looked up (ENOENT for a missing one)", async () => {
    const vm = await env.mockVm();
    await expectInvalidateFail(vm.v.invalidate({ hwptId: 99, requests: rawSelftest([], { entryNum: 0, entryLen: 0, data: new Uint8Array() }) }), "ENOENT", 0);
  });

  it("a missing HWPT is NOT_FOUND/ENOENT with 0 handled", async () => {
    const vm = await env.mockVm();
    await expectInvalidateFail(vm.v.invalidate({ hwptId: 99, requests: selftestInv([{ iotlbId: 0 }]) }), "ENOENT", 0);
    await expectInvalidateFail(vm.v.invalidate({ hwptId: 0, requests: selftestInv([]) }), "ENOENT", 0);
  });

  it("a target that is not a nested HWPT (paging parent, IOAS, device) is EINVAL with 0 handled (6.13+)", async () => {
    const vm = await env.mockVm();
    const { dev, ioasId, parent } = await nestingSetup(vm);
    for (const id of [parent, ioasId, dev]) {
      await expectInvalidateFail(vm.v.invalidate({ hwptId: id, requests: selftestInv([{ iotlbId: 0 }]) }), "EINVAL", 0);
    }
  });

  it("early failures leave the nested HWPT's IOTLB alone", async () => {
    const vm = await env.mockVm();
    const { nested } = await nestingSetup(vm, { iotlb: 7 });
    const before = await dumpIotlb(vm, nested);
    await expectInvalidateFail(vm.v.invalidate({ hwptId: nested }), "EINVAL", 0);
    await expectInvalidateFail(vm.v.invalidate({ hwptId: nested, requests: rawSelftest([{ flags: 1, iotlbId: 0 }], { entryLen: 0 }) }), "EINVAL", 0);
    expect(await dumpIotlb(vm, nested)).toEqual(before);
  });
});

describe("nested HWPT allocation core rules (iommufd-semantics.md §3.9)", () => {
  it("NEST_PARENT or DIRTY_TRACKING on a nested HWPT is EOPNOTSUPP, checked before the parent (EINVAL)", async () => {
    const vm = await env.mockVm();
    const { dev, ioasId } = await devAndIoas(vm);
    const plain = await pagingHwpt(vm, dev, ioasId);
    const data = { case: "selftest" as const, value: { iotlb: 1 } };
    await expectFail(vm.v.allocHwpt({ devId: dev, ptId: plain, nestParent: true, data }), "EOPNOTSUPP");
    await expectFail(vm.v.allocHwpt({ devId: dev, ptId: plain, dirtyTracking: true, data }), "EOPNOTSUPP");
    await expectFail(vm.v.allocHwpt({ devId: dev, ptId: plain, data }), "EINVAL");
  });

  it("no data (data_len 0) on a paging parent is EOPNOTSUPP", async () => {
    const vm = await env.mockVm();
    const { dev, ioasId } = await devAndIoas(vm);
    const parent = await pagingHwpt(vm, dev, ioasId, { nestParent: true });
    await expectFailUnchanged(vm, { ioas: [ioasId] }, () => vm.v.allocHwpt({ devId: dev, ptId: parent }), "EOPNOTSUPP");
  });

  it("a parent not allocated with NEST_PARENT, or an automatic domain, is EINVAL and changes nothing", async () => {
    const vm = await env.mockVm();
    const { dev, ioasId } = await devAndIoas(vm);
    const plain = await pagingHwpt(vm, dev, ioasId);
    const auto = (await vm.v.attachDevice({ devId: dev, ptId: ioasId })).hwptId;
    const data = { case: "selftest" as const, value: { iotlb: 1 } };
    await expectFailUnchanged(vm, { ioas: [ioasId] }, () => vm.v.allocHwpt({ devId: dev, ptId: plain, data }), "EINVAL");
    await expectFailUnchanged(vm, { ioas: [ioasId] }, () => vm.v.allocHwpt({ devId: dev, ptId: auto, data }), "EINVAL");
  });

  it("a nested HWPT holds its parent; PASID is an allowed flag", async () => {
    const vm = await env.mockVm();
    const { dev, ioasId } = await devAndIoas(vm);
    const parent = await pagingHwpt(vm, dev, ioasId, { nestParent: true });
    const nested = await nestedHwpt(vm, dev, parent, { pasid: true });
    expect(nested).toBe(parent + 1);
    await expectFail(vm.v.destroy({ id: parent }), "EBUSY");
    await expectFail(vm.v.destroy({ id: ioasId }), "EBUSY");
  });

  it("a data_type the driver does not know is EOPNOTSUPP", async () => {
    const vm = await env.mockVm();
    const { dev, ioasId } = await devAndIoas(vm);
    const parent = await pagingHwpt(vm, dev, ioasId, { nestParent: true });
    await expectFail(vm.v.allocHwpt({ devId: dev, ptId: parent, data: { case: "raw", value: { dataType: 0xbeef, data: selftestHwptBytes(1) } } }), "EOPNOTSUPP");
  });
});

describe("Invalidate always reports entries_handled on failure (api.md Hardware page tables)", () => {
  it("is 0 when the call fails before any entry is looked at: an unknown VM", async () => {
    const e = await env.client.invalidate({ vmId: "no-such-vm", hwptId: 1, requests: { case: "selftest", value: { entries: [] } } }).catch((err: unknown) => err);
    expect(e).toMatchObject({ errno: "ENOENT", entriesHandled: 0 });
  });
});
