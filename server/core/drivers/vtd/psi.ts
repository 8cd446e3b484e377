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

/** A PSI block in page numbers: pages [pfn, pfn + 2^mask); mask >= MAX_AGAW_PFN_WIDTH = everything. */
export interface PsiBlock {
  readonly pfn: number;
  readonly mask: number;
}

const ALL_PAGES: PsiBlock = { pfn: 0, mask: MAX_AGAW_PFN_WIDTH };

/**
 * userInvalidationRange() for a 4 KiB aligned entry, in numbers rather than
 * BigInt (the invalidation path): the smallest naturally aligned
 * power-of-two block of pages holding [pfn, pfn + npages) — what
 * calculate_psi_aligned_address() arrives at, since within one such block
 * the two ends can only differ below it. Ranges reaching 2^52 pages (the
 * whole address space, or a u64 wrap) flush everything, as the kernel's
 * mask 52 does.
 */
export function userInvalidationBlock(pfn: number, npages: number): PsiBlock {
  const last = pfn + npages - 1;
  if (npages === 0 || last >= 2 ** MAX_AGAW_PFN_WIDTH) return ALL_PAGES;
  let mask = 0;
  while (2 ** mask < npages) mask++;
  while (mask < MAX_AGAW_PFN_WIDTH && Math.floor(pfn / 2 ** mask) !== Math.floor(last / 2 ** mask)) mask++;
  if (mask >= MAX_AGAW_PFN_WIDTH) return ALL_PAGES;
  return { pfn: Math.floor(pfn / 2 ** mask) * 2 ** mask, mask };
}
