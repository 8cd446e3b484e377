/**
 * How Linux turns an invalidation range into a VT-d page-selective
 * invalidation (drivers/iommu/intel/cache.c): the naturally aligned
 * power-of-two block of 4 KiB pages (ADDR, AM) that covers [start, end].
 */
export const VTD_PAGE_SHIFT = 12n;
/** MAX_AGAW_PFN_WIDTH: an address mask this large means "everything". */
export const MAX_AGAW_PFN_WIDTH = 52;

const u64 = (x: bigint): bigint => BigInt.asUintN(64, x);
const ULONG_MAX = (1n << 64n) - 1n;

/** A flush of 2^mask pages at addr; mask >= MAX_AGAW_PFN_WIDTH = the whole domain. */
export interface PsiRange {
  readonly addr: bigint;
  readonly mask: number;
}

export const FLUSH_ALL: PsiRange = { addr: 0n, mask: MAX_AGAW_PFN_WIDTH };

function ffs64(x: bigint): number {
  let i = 0;
  while (((x >> BigInt(i)) & 1n) === 0n) i++;
  return i;
}

/** calculate_psi_aligned_address() */
export function psiAlignedAddress(start: bigint, end: bigint): PsiRange {
  // aligned_nrpages(start, end - start + 1)
  const size = u64(end - start + 1n);
  const pages = (u64((start & 0xfffn) + size) + 0xfffn) >> VTD_PAGE_SHIFT;
  if (pages === 0n || pages > 1n << BigInt(MAX_AGAW_PFN_WIDTH)) return FLUSH_ALL;
  let aligned = 1n;
  let mask = 0;
  while (aligned < pages) {
    aligned <<= 1n;
    mask++;
  }
  const bitmask = aligned - 1n;
  const pfn = start >> VTD_PAGE_SHIFT;
  if (pfn & bitmask) {
    // The range straddles a block boundary: grow the block until both ends
    // share all the bits above it.
    const endPfn = pfn + pages - 1n;
    const shared = u64(~(pfn ^ endPfn)) & u64(~bitmask);
    mask = shared !== 0n ? ffs64(shared) : MAX_AGAW_PFN_WIDTH;
  }
  if (mask >= MAX_AGAW_PFN_WIDTH) return FLUSH_ALL;
  const block = 1n << (VTD_PAGE_SHIFT + BigInt(mask));
  return { addr: start & ~(block - 1n), mask };
}

/**
 * cache_tag_flush_range(domain, start, end): [0, ULONG_MAX] is everything,
 * anything else goes through the PSI rounding.
 */
export function flushRange(start: bigint, end: bigint): PsiRange {
  if (start === 0n && end === ULONG_MAX) return FLUSH_ALL;
  return psiAlignedAddress(start, end);
}

/**
 * The range intel_nested_cache_invalidate_user() flushes for one
 * iommu_hwpt_vtd_s1_invalidate entry: [addr, addr + npages * 4 KiB - 1],
 * computed in u64 as the kernel does (npages U64_MAX with addr 0 covers all).
 */
export function userInvalidationRange(addr: bigint, npages: bigint): PsiRange {
  return flushRange(addr, u64(addr + u64(npages << VTD_PAGE_SHIFT) - 1n));
}
