/**
 * Errors of the emulated iommufd: every failure carries the errno the kernel
 * would return for the same input (include/uapi/asm-generic/errno*.h numbers).
 * The gRPC edge maps them once (rpc/status.ts); nothing else inspects them.
 */
export const ERRNO = {
  EPERM: 1,
  ENOENT: 2,
  EIO: 5,
  E2BIG: 7,
  ENOMEM: 12,
  EFAULT: 14,
  EBUSY: 16,
  EEXIST: 17,
  ENODEV: 19,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  EMSGSIZE: 90,
  EOPNOTSUPP: 95,
  EADDRINUSE: 98,
  EDQUOT: 122,
} as const;

export type Errno = keyof typeof ERRNO;

export class IommuError extends Error {
  override readonly name = "IommuError";

  constructor(
    readonly errno: Errno,
    message: string,
    /** IOMMU_HWPT_INVALIDATE's entry_num out, reported with the failure. */
    readonly entriesHandled?: number,
  ) {
    super(message);
  }

  get errnoValue(): number {
    return ERRNO[this.errno];
  }

  /** The same failure, reporting how many invalidation entries were handled. */
  withEntriesHandled(entriesHandled: number): IommuError {
    return new IommuError(this.errno, this.message, entriesHandled);
  }
}

/** Throws an IommuError; a statement-position helper for check sequences. */
export function fail(errno: Errno, message: string): never {
  throw new IommuError(errno, message);
}
