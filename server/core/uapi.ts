import type { UserData } from "./drivers/driver.js";
import { fail } from "./errno.js";

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

/** enum iommu_hwpt_invalidate_data_type (+ the selftest's) */
export const IOMMU_HWPT_INVALIDATE_DATA_VTD_S1 = 0;
export const IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3 = 1;
export const IOMMU_HWPT_INVALIDATE_DATA_SELFTEST = 0xdeadbeef;

/** struct iommu_hwpt_vtd_s1_invalidate flags */
export const IOMMU_VTD_INV_FLAGS_LEAF = 1 << 0;
/** struct iommu_hwpt_invalidate_selftest flags */
export const IOMMU_TEST_INVALIDATE_FLAG_ALL = 1 << 0;

/** struct iommu_user_data_array: IOMMU_HWPT_INVALIDATE's entry array. */
export interface UserDataArray {
  readonly type: number;
  readonly entryLen: number;
  readonly entryNum: number;
  /** The user buffer; empty = data_uptr NULL. */
  readonly data: Uint8Array;
}

export type Invalidations =
  | { kind: "vtd_s1"; entries: readonly { addr: bigint; npages: bigint; leaf: boolean }[] }
  | { kind: "arm_smmuv3"; commands: readonly { cmd0: bigint; cmd1: bigint }[] }
  | { kind: "selftest"; entries: readonly { iotlbId: number; all: boolean }[] }
  | { kind: "raw"; dataType: number; entryLen: number; entryNum: number; data: Uint8Array };

function array(type: number, entryLen: number, entries: readonly unknown[], write: (view: DataView, offset: number, i: number) => void): UserDataArray {
  const view = new DataView(new ArrayBuffer(entryLen * entries.length));
  entries.forEach((_, i) => write(view, i * entryLen, i));
  return { type, entryLen, entryNum: entries.length, data: new Uint8Array(view.buffer) };
}

/** The iommu_hwpt_invalidate array a VMM would pass for `requests`. */
export function encodeInvalidations(requests: Invalidations): UserDataArray {
  switch (requests.kind) {
    case "raw":
      return { type: requests.dataType, entryLen: requests.entryLen, entryNum: requests.entryNum, data: requests.data };
    case "vtd_s1":
      // struct iommu_hwpt_vtd_s1_invalidate (24): addr u64, npages u64, flags u32, __reserved u32
      return array(IOMMU_HWPT_INVALIDATE_DATA_VTD_S1, 24, requests.entries, (v, o, i) => {
        const e = requests.entries[i];
        v.setBigUint64(o, e.addr, true);
        v.setBigUint64(o + 8, e.npages, true);
        v.setUint32(o + 16, e.leaf ? IOMMU_VTD_INV_FLAGS_LEAF : 0, true);
      });
    case "arm_smmuv3":
      // struct iommu_viommu_arm_smmuv3_invalidate (16): __le64 cmd[2]
      return array(IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3, 16, requests.commands, (v, o, i) => {
        v.setBigUint64(o, requests.commands[i].cmd0, true);
        v.setBigUint64(o + 8, requests.commands[i].cmd1, true);
      });
    case "selftest":
      // struct iommu_hwpt_invalidate_selftest (8): flags u32, iotlb_id u32
      return array(IOMMU_HWPT_INVALIDATE_DATA_SELFTEST, 8, requests.entries, (v, o, i) => {
        v.setUint32(o, requests.entries[i].all ? IOMMU_TEST_INVALIDATE_FLAG_ALL : 0, true);
        v.setUint32(o + 4, requests.entries[i].iotlbId, true);
      });
  }
}

/**
 * iommu_copy_struct_from_user_array(): entry `index` of the array, as the
 * kernel copies it one entry at a time. The type must match and entry_len lie
 * in [minLen, size] (else EINVAL); an entry past the end of the user buffer
 * faults (EFAULT); a shorter entry is zero-extended to `size`.
 */
export function copyStructFromUserArray(array: UserDataArray, type: number, index: number, minLen: number, size: number): DataView {
  if (array.entryNum === 0 || array.type !== type) fail("EINVAL", `invalidation data_type ${array.type} is not ${type}`);
  if (array.entryLen < minLen || array.entryLen > size) fail("EINVAL", `entry_len ${array.entryLen} is not in [${minLen}, ${size}]`);
  const offset = index * array.entryLen;
  if (offset + array.entryLen > array.data.length) fail("EFAULT", `entry ${index} lies beyond the end of the data (${array.data.length} bytes)`);
  if (array.entryLen === size) return new DataView(array.data.buffer, array.data.byteOffset + offset, size);
  const entry = new Uint8Array(size);
  entry.set(array.data.subarray(offset, offset + array.entryLen));
  return new DataView(entry.buffer);
}

/** enum iommu_hw_info_type (+ the selftest's) */
export const IOMMU_HW_INFO_TYPE_DEFAULT = 0;
export const IOMMU_HW_INFO_TYPE_INTEL_VTD = 1;
export const IOMMU_HW_INFO_TYPE_ARM_SMMUV3 = 2;
export const IOMMU_HW_INFO_TYPE_SELFTEST = 0xfeedbeef;

/** enum iommufd_hw_capabilities */
export const IOMMU_HW_CAP_DIRTY_TRACKING = 1n << 0n;

/** struct iommu_hw_info_vtd flags */
export const IOMMU_HW_INFO_VTD_ERRATA_772415_SPR17 = 1 << 0;

export type HwInfoData =
  | { kind: "vtd"; flags: number; capReg: bigint; ecapReg: bigint }
  | { kind: "selftest"; flags: number; testReg: number }
  | { kind: "none" };

/** Decodes the driver struct IOMMU_GET_HW_INFO copied out, by its type. */
export function decodeHwInfo(type: number, data: Uint8Array): HwInfoData {
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  switch (type) {
    case IOMMU_HW_INFO_TYPE_INTEL_VTD:
      // struct iommu_hw_info_vtd (24): flags u32, __reserved u32, cap_reg u64, ecap_reg u64
      return { kind: "vtd", flags: view.getUint32(0, true), capReg: view.getBigUint64(8, true), ecapReg: view.getBigUint64(16, true) };
    case IOMMU_HW_INFO_TYPE_SELFTEST:
      // struct iommu_test_hw_info (8): flags u32, test_reg u32
      return { kind: "selftest", flags: view.getUint32(0, true), testReg: view.getUint32(4, true) };
    default:
      return { kind: "none" };
  }
}
