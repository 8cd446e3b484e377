/**
 * CAP_REG and ECAP_REG of the emulated VT-d (VT-d spec 11.4.2/11.4.3; bit
 * names as Linux's cap_* / ecap_* macros in drivers/iommu/intel/iommu.h).
 * Only what the emulator really implements is advertised; HwInfo reports
 * these values and the driver consults them (FL5LP, SRS, EAFS at attach).
 */

// CAP_REG
export const CAP_ND_SHIFT = 0n; // number of domains = 2^(4 + 2 * ND)
export const CAP_SAGAW_SHIFT = 8n; // bit 9: 3-level, bit 10: 4-level, bit 11: 5-level
export const CAP_SAGAW_4LEVEL = 1n << 10n;
export const CAP_SAGAW_5LEVEL = 1n << 11n;
export const CAP_MGAW_SHIFT = 16n; // width - 1
export const CAP_SLLPS_2M = 1n << 34n;
export const CAP_SLLPS_1G = 1n << 35n;
export const CAP_PSI = 1n << 39n;
export const CAP_MAMV_SHIFT = 48n;
export const CAP_FL1GP = 1n << 56n;
export const CAP_FL5LP = 1n << 60n;

// ECAP_REG
export const ECAP_C = 1n << 0n;
export const ECAP_QI = 1n << 1n;
export const ECAP_NEST = 1n << 26n;
export const ECAP_SRS = 1n << 31n;
export const ECAP_EAFS = 1n << 34n;
export const ECAP_PSS_SHIFT = 35n; // PASID width - 1
export const ECAP_PASID = 1n << 40n;
export const ECAP_SMTS = 1n << 43n;
export const ECAP_SSADS = 1n << 45n;
export const ECAP_SSTS = 1n << 46n;
export const ECAP_FSTS = 1n << 47n;
export const ECAP_SMPWC = 1n << 48n;

/** ND = 6: 2^16 domain ids, like QEMU's emulated unit. */
const ND = 6n;
/**
 * MAX_AGAW_PFN_WIDTH: the largest address mask the invalidation path takes;
 * the emulated IOTLB drops any aligned power-of-two range, so MAMV is the
 * full width.
 */
export const VTD_MAMV = 52;

export interface VtdCaps {
  readonly cap: bigint;
  readonly ecap: bigint;
}

/**
 * The registers of a unit with 4-level (and, with fiveLevel, 5-level)
 * paging: scalable mode with first-stage, second-stage and nested
 * translation, 20-bit PASIDs, page-selective invalidation, 2 MiB/1 GiB pages
 * in both stages, the extended-accessed flag. SSADS (second-stage A/D, what
 * dirty tracking needs) is per device: see VtdDriver.hwInfo(). Not
 * advertised because not honoured: supervisor requests (SRS), ATS (DT),
 * interrupt remapping, pass-through, caching mode.
 */
export function vtdCaps(fiveLevel: boolean): VtdCaps {
  const width = fiveLevel ? 57n : 48n;
  const cap =
    (ND << CAP_ND_SHIFT) |
    CAP_SAGAW_4LEVEL |
    (fiveLevel ? CAP_SAGAW_5LEVEL : 0n) |
    ((width - 1n) << CAP_MGAW_SHIFT) |
    CAP_SLLPS_2M |
    CAP_SLLPS_1G |
    CAP_PSI |
    (BigInt(VTD_MAMV) << CAP_MAMV_SHIFT) |
    CAP_FL1GP |
    (fiveLevel ? CAP_FL5LP : 0n);
  const ecap =
    ECAP_C | ECAP_QI | ECAP_NEST | ECAP_EAFS | (19n << ECAP_PSS_SHIFT) | ECAP_PASID | ECAP_SMTS | ECAP_SSTS | ECAP_FSTS | ECAP_SMPWC;
  return { cap, ecap };
}
