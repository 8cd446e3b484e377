/**
 * Translation fault reasons: VT-d fault reason codes (vtd.md §3,
 * dma_remap_sm_fault_reasons[] in drivers/iommu/intel/dmar.c) with the stable
 * names api.md fixes for TranslationFault.reason_name and the metrics label.
 * The MOCK model reports its faults with the same codes.
 */
export const FAULT = {
  /** 0x59: PASID-table entry not present — the device (PASID) is not attached. */
  BLOCKED: 0x59,
  S1_NOT_PRESENT: 0x71,
  S1_RESERVED: 0x72,
  S2_ACCESS_S1_ROOT: 0x73,
  S1_TABLE_BEYOND_S2: 0x74,
  S2_NO_READ_S1_ROOT: 0x75,
  S2_NO_READ_S1_TABLE: 0x76,
  S2_NO_WRITE_S1_AD: 0x77,
  S2_NOT_PRESENT: 0x79,
  S2_RESERVED: 0x7a,
  NON_CANONICAL: 0x80,
  USER_TO_SUPERVISOR: 0x81,
  BEYOND_MAX_ADDRESS: 0x83,
  NO_WRITE: 0x85,
  NO_READ: 0x86,
} as const;

export type FaultName = keyof typeof FAULT;

const NAMES = new Map<number, FaultName>(Object.entries(FAULT).map(([name, code]) => [code, name as FaultName]));

export function faultName(code: number): FaultName {
  const name = NAMES.get(code);
  if (name === undefined) throw new Error(`unknown fault code 0x${code.toString(16)}`);
  return name;
}

export const FAULT_NAMES = Object.keys(FAULT) as FaultName[];
