import { IommuError } from "./errno.js";

/**
 * Quotas and limits: what one tenant or one request may consume. Exceeding
 * one is EDQUOT (RESOURCE_EXHAUSTED) with a google.rpc.QuotaFailure naming
 * the limit, checked before anything changes.
 */
export interface Limits {
  /** VMs one tenant may have. */
  readonly vmsPerTenant: number;
  /** guest_memory_bytes of one VM. */
  readonly guestMemoryBytesPerVm: number;
  /** guest_memory_bytes summed over a tenant's VMs. */
  readonly guestMemoryBytesPerTenant: number;
  /** Guest RAM one VM has actually touched (written pages). */
  readonly touchedBytesPerVm: number;
  /** Touched guest RAM summed over a tenant's VMs. */
  readonly touchedBytesPerTenant: number;
  /** Live objects (IOAS, HWPTs, devices) of one VM. */
  readonly objectsPerVm: number;
  /** Bytes mapped in one IOAS. */
  readonly mappedBytesPerIoas: number;
  /** VmOptions.iotlb_entries. */
  readonly iotlbEntriesPerVm: number;
  /** IOVAs in one Translate request. */
  readonly translateBatch: number;
  /** Entries in one Invalidate request. */
  readonly invalidateEntries: number;
  /** Bytes of one WriteGuestMemory / ReadGuestMemory. */
  readonly guestIoBytes: number;
}

const GIB = 2 ** 30;

export const DEFAULT_LIMITS: Limits = {
  vmsPerTenant: 4096,
  guestMemoryBytesPerVm: 2 ** 40,
  guestMemoryBytesPerTenant: 2 ** 46,
  touchedBytesPerVm: 4 * GIB,
  touchedBytesPerTenant: 64 * GIB,
  objectsPerVm: 65536,
  mappedBytesPerIoas: 256 * GIB,
  iotlbEntriesPerVm: 1 << 20,
  translateBatch: 65536,
  invalidateEntries: 65536,
  guestIoBytes: 8 * 2 ** 20,
};

/** Which quota failed, for google.rpc.QuotaFailure.Violation. */
export interface QuotaViolation {
  /** What the quota applies to: "tenant:<id>", "vm:<id>", "ioas:<id>", "request". */
  readonly subject: string;
  /** The limit's name (a Limits key) and value, in words. */
  readonly description: string;
}

export class QuotaError extends IommuError {
  constructor(
    readonly violation: QuotaViolation,
    message: string,
    entriesHandled?: number,
  ) {
    super("EDQUOT", message, entriesHandled);
  }

  override withEntriesHandled(entriesHandled: number): QuotaError {
    return new QuotaError(this.violation, this.message, entriesHandled);
  }
}

/** Throws EDQUOT unless `used + adding <= limit`. */
export function checkQuota(limit: keyof Limits, limits: Limits, used: number, adding: number, subject: string, what: string): void {
  const max = limits[limit];
  if (used + adding > max) {
    throw new QuotaError({ subject, description: `${limit} = ${max}` }, `${what}: ${used + adding} exceeds the ${limit} limit of ${max} for ${subject}`);
  }
}
