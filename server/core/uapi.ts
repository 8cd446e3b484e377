import type { UserData } from "./drivers/driver.js";

/**
 * Driver data structs of include/uapi/linux/iommufd.h (and the selftest's
 * iommufd_test.h) in their kernel byte layout, little-endian. The typed gRPC
 * cases are encoded here so that they reach the drivers exactly as their raw
 * encoding would: one decoding path per driver.
 */

/** enum iommu_hwpt_data_type */
export const IOMMU_HWPT_DATA_NONE = 0;
export const IOMMU_HWPT_DATA_VTD_S1 = 1;
export const IOMMU_HWPT_DATA_ARM_SMMUV3 = 2;
export const IOMMU_HWPT_DATA_SELFTEST = 0xdead;

/** struct iommu_hwpt_vtd_s1 flags */
export const IOMMU_VTD_S1_SRE = 1 << 0;
export const IOMMU_VTD_S1_EAFE = 1 << 1;
export const IOMMU_VTD_S1_WPE = 1 << 2;

export type HwptData =
  | { kind: "vtd_s1"; sre: boolean; eafe: boolean; wpe: boolean; pgtblAddr: bigint; addrWidth: number }
  | { kind: "arm_smmuv3"; ste0: bigint; ste1: bigint }
  | { kind: "selftest"; iotlb: number }
  | { kind: "raw"; dataType: number; data: Uint8Array };

/** The (data_type, data_uptr/data_len) pair IOMMU_HWPT_ALLOC would carry. */
export function encodeHwptData(data: HwptData): UserData {
  switch (data.kind) {
    case "raw":
      return { type: data.dataType, data: data.data };
    case "vtd_s1": {
      // struct iommu_hwpt_vtd_s1 (24 bytes): flags u64, pgtbl_addr u64, addr_width u32, __reserved u32
      const view = new DataView(new ArrayBuffer(24));
      const flags = (data.sre ? IOMMU_VTD_S1_SRE : 0) | (data.eafe ? IOMMU_VTD_S1_EAFE : 0) | (data.wpe ? IOMMU_VTD_S1_WPE : 0);
      view.setBigUint64(0, BigInt(flags), true);
      view.setBigUint64(8, data.pgtblAddr, true);
      view.setUint32(16, data.addrWidth, true);
      return { type: IOMMU_HWPT_DATA_VTD_S1, data: new Uint8Array(view.buffer) };
    }
    case "arm_smmuv3": {
      // struct iommu_hwpt_arm_smmuv3 (16 bytes): __le64 ste[2]
      const view = new DataView(new ArrayBuffer(16));
      view.setBigUint64(0, data.ste0, true);
      view.setBigUint64(8, data.ste1, true);
      return { type: IOMMU_HWPT_DATA_ARM_SMMUV3, data: new Uint8Array(view.buffer) };
    }
    case "selftest": {
      // struct iommu_hwpt_selftest (4 bytes): iotlb u32
      const view = new DataView(new ArrayBuffer(4));
      view.setUint32(0, data.iotlb, true);
      return { type: IOMMU_HWPT_DATA_SELFTEST, data: new Uint8Array(view.buffer) };
    }
  }
}
