/**
 * HwInfo (IOMMU_GET_HW_INFO: iommufd-semantics.md §3.11, §7.1, §8.2; api.md
 * Devices). The VT-d registers are decoded bit by bit in hw-info-vtd.test.ts.
 */
import { describe, expect, it } from "vitest";
import {
  bind,
  expectFail,
  IOMMU_HW_CAP_DIRTY_TRACKING,
  IOMMU_HW_CAP_PCI_PASID_EXEC,
  IOMMU_HW_CAP_PCI_PASID_PRIV,
  IOMMU_HW_INFO_SELFTEST_REGVAL,
  IOMMU_HW_INFO_TYPE_ARM_SMMUV3,
  IOMMU_HW_INFO_TYPE_DEFAULT,
  IOMMU_HW_INFO_TYPE_INTEL_VTD,
  IOMMU_HW_INFO_TYPE_SELFTEST,
  IOMMU_HW_INFO_VTD_ERRATA_772415_SPR17,
  ioas,
  serverEnv,
} from "./helpers.js";

const env = serverEnv("hwinfo");

describe("HwInfo: device lookup (§3.11)", () => {
  it("an unknown device, or an id that is not a device, is NOT_FOUND/ENOENT", async () => {
    const vm = await env.mockVm();
    const ioasId = await ioas(vm);
    await expectFail(vm.v.hwInfo({ devId: 5 }), "ENOENT");
    await expectFail(vm.v.hwInfo({ devId: 0 }), "ENOENT");
    await expectFail(vm.v.hwInfo({ devId: ioasId }), "ENOENT");
  });
});

describe("HwInfo on the mock IOMMU (§8.2)", () => {
  it("DEFAULT answers type 0xfeedbeef with struct iommu_test_hw_info {flags 0, test_reg 0xdeadbeef} in kernel layout", async () => {
    const vm = await env.mockVm();
    const dev = await bind(vm);
    const info = await vm.v.hwInfo({ devId: dev });
    expect(info.dataType).toBe(IOMMU_HW_INFO_TYPE_SELFTEST);
    expect([...info.data]).toEqual([0, 0, 0, 0, 0xef, 0xbe, 0xad, 0xde]);
    expect(info.info).toEqual({ case: "selftest", value: expect.objectContaining({ flags: 0, testReg: IOMMU_HW_INFO_SELFTEST_REGVAL }) });
  });

  it("capabilities: DIRTY_TRACKING unless the device has no dirty tracking (MOCK_FLAGS_DEVICE_NO_DIRTY)", async () => {
    const vm = await env.mockVm();
    const dirty = await bind(vm, { dirty: true });
    const clean = await bind(vm, { dirty: false });
    expect((await vm.v.hwInfo({ devId: dirty })).capabilities).toBe(IOMMU_HW_CAP_DIRTY_TRACKING);
    expect((await vm.v.hwInfo({ devId: clean })).capabilities).toBe(0n);
  });

  it("max_pasid_log2: 20 for a PASID-capable device, 0 otherwise", async () => {
    const vm = await env.mockVm();
    const pasid = await bind(vm, { pasid: true });
    const plain = await bind(vm, { pasid: false });
    expect((await vm.v.hwInfo({ devId: pasid })).maxPasidLog2).toBe(20);
    expect((await vm.v.hwInfo({ devId: plain })).maxPasidLog2).toBe(0);
  });

  it("an explicit data_type DEFAULT (0) or 0xfeedbeef answers the same; any other is UNIMPLEMENTED/EOPNOTSUPP", async () => {
    const vm = await env.mockVm();
    const dev = await bind(vm);
    const byDefault = await vm.v.hwInfo({ devId: dev });
    expect(await vm.v.hwInfo({ devId: dev, dataType: IOMMU_HW_INFO_TYPE_DEFAULT })).toEqual(byDefault);
    expect(await vm.v.hwInfo({ devId: dev, dataType: IOMMU_HW_INFO_TYPE_SELFTEST })).toEqual(byDefault);
    for (const dataType of [IOMMU_HW_INFO_TYPE_INTEL_VTD, IOMMU_HW_INFO_TYPE_ARM_SMMUV3, 3, 0xdeadbeef]) {
      await expectFail(vm.v.hwInfo({ devId: dev, dataType }), "EOPNOTSUPP");
    }
  });
});

describe("HwInfo on VT-d (§7.1; api.md Devices)", () => {
  it("DEFAULT answers type 1 with 24 bytes of struct iommu_hw_info_vtd, flags = ERRATA_772415_SPR17", async () => {
    const vm = await env.vtdVm();
    const dev = await bind(vm);
    const info = await vm.v.hwInfo({ devId: dev });
    expect(info.dataType).toBe(IOMMU_HW_INFO_TYPE_INTEL_VTD);
    expect(info.data.length).toBe(24);
    expect(info.info.case).toBe("vtd");
    if (info.info.case === "vtd") expect(info.info.value.flags).toBe(IOMMU_HW_INFO_VTD_ERRATA_772415_SPR17);
  });

  it("an explicit data_type DEFAULT or INTEL_VTD answers the same; any other is UNIMPLEMENTED/EOPNOTSUPP", async () => {
    const vm = await env.vtdVm();
    const dev = await bind(vm);
    const byDefault = await vm.v.hwInfo({ devId: dev });
    expect(await vm.v.hwInfo({ devId: dev, dataType: IOMMU_HW_INFO_TYPE_DEFAULT })).toEqual(byDefault);
    expect(await vm.v.hwInfo({ devId: dev, dataType: IOMMU_HW_INFO_TYPE_INTEL_VTD })).toEqual(byDefault);
    for (const dataType of [IOMMU_HW_INFO_TYPE_SELFTEST, IOMMU_HW_INFO_TYPE_ARM_SMMUV3, 3]) {
      await expectFail(vm.v.hwInfo({ devId: dev, dataType }), "EOPNOTSUPP");
    }
  });

  it("max_pasid_log2 is 20 for a PASID-capable device and 0 otherwise", async () => {
    const vm = await env.vtdVm();
    expect((await vm.v.hwInfo({ devId: await bind(vm, { pasid: true }) })).maxPasidLog2).toBe(20);
    expect((await vm.v.hwInfo({ devId: await bind(vm, { pasid: false }) })).maxPasidLog2).toBe(0);
  });
});

describe("HwInfo capabilities (api.md Devices)", () => {
  it("PCI_PASID_EXEC and PCI_PASID_PRIV are never reported, by either model", async () => {
    for (const vm of [await env.mockVm(), await env.vtdVm()]) {
      for (const pasid of [false, true]) {
        const { capabilities } = await vm.v.hwInfo({ devId: await bind(vm, { pasid }) });
        expect(capabilities & (IOMMU_HW_CAP_PCI_PASID_EXEC | IOMMU_HW_CAP_PCI_PASID_PRIV)).toBe(0n);
      }
    }
  });
});
