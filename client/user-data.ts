import type { MessageInitShape } from "@bufbuild/protobuf";
import type { AllocHwptRequestSchema, InvalidateRequestSchema } from "../gen/iommufd/v1/hwpt_pb.js";
import { encodeHwptData, encodeInvalidations, type HwptData, type Invalidations } from "../server/core/uapi.js";

/**
 * Builders for AllocHwpt's `data` and Invalidate's `requests`: the typed
 * cases, and the same requests in the kernel's raw encoding (struct bytes
 * exactly as a VMM passes them to IOMMU_HWPT_ALLOC / IOMMU_HWPT_INVALIDATE).
 */

export type HwptDataCase = MessageInitShape<typeof AllocHwptRequestSchema>["data"];
export type InvalidateCase = MessageInitShape<typeof InvalidateRequestSchema>["requests"];

/** VT-d stage-1 user data (struct iommu_hwpt_vtd_s1). */
export function vtdS1Data(pgtblAddr: bigint, options: { addrWidth?: 48 | 57; sre?: boolean; eafe?: boolean; wpe?: boolean } = {}): HwptDataCase {
  return {
    case: "vtdS1",
    value: { pgtblAddr, addrWidth: options.addrWidth ?? 48, sre: options.sre ?? false, eafe: options.eafe ?? false, wpe: options.wpe ?? false },
  };
}

/** Selftest user data (struct iommu_hwpt_selftest). */
export function selftestData(iotlb: number): HwptDataCase {
  return { case: "selftest", value: { iotlb } };
}

/** Any typed user data as its raw kernel encoding (data_type + little-endian struct bytes). */
export function rawHwptData(data: Exclude<HwptData, { kind: "raw" }>): HwptDataCase {
  const { type, data: bytes } = encodeHwptData(data);
  return { case: "raw", value: { dataType: type, data: bytes } };
}

/** Typed invalidation entries as their raw kernel array (data_type, entry_len, entry_num, bytes). */
export function rawInvalidations(requests: Exclude<Invalidations, { kind: "raw" }>): InvalidateCase {
  const array = encodeInvalidations(requests);
  return { case: "raw", value: { dataType: array.type, entryLen: array.entryLen, entryNum: array.entryNum, data: array.data } };
}
