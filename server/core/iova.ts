/**
 * u64 arithmetic of the IOVA space, done in bigint: the control plane needs
 * exact 64-bit values (apertures end at 2^64 - 1), the translation hot path
 * never comes here.
 */
export const U64_MAX = (1n << 64n) - 1n;
/** ULONG_MAX on a 64-bit kernel: every IOAS bound is expressed against it. */
export const ULONG_MAX = U64_MAX;

/** An inclusive IOVA range (struct iommu_iova_range, interval tree node). */
export interface IovaRange {
  start: bigint;
  last: bigint;
}

export function intersects(a: IovaRange, start: bigint, last: bigint): boolean {
  return a.start <= last && start <= a.last;
}

/** check_add_overflow(a, b) on u64: the sum, or undefined on overflow. */
export function addU64(a: bigint, b: bigint): bigint | undefined {
  const sum = a + b;
  return sum > U64_MAX ? undefined : sum;
}

/** roundup_pow_of_two() */
export function roundupPowOfTwo(x: bigint): bigint {
  let p = 1n;
  while (p < x) p <<= 1n;
  return p;
}

/** 1 << __ffs64(x): the lowest set bit of a non-zero x. */
export function lowestSetBit(x: bigint): bigint {
  return x & -x;
}

/** True when x is a multiple of the power of two `align`. */
export function isAligned(x: bigint, align: bigint): boolean {
  return (x & (align - 1n)) === 0n;
}

/**
 * The used spans of a set of (possibly overlapping) ranges within [lo, hi]:
 * overlapping and adjacent ranges merged, clipped to [lo, hi]. This is
 * interval_tree_for_each_span() keeping the !is_hole spans.
 */
export function usedSpans(ranges: readonly IovaRange[], lo: bigint, hi: bigint): IovaRange[] {
  const sorted = ranges.filter((r) => intersects(r, lo, hi)).sort((a, b) => (a.start < b.start ? -1 : a.start > b.start ? 1 : 0));
  const out: IovaRange[] = [];
  for (const r of sorted) {
    const start = r.start > lo ? r.start : lo;
    const last = r.last < hi ? r.last : hi;
    const prev = out.at(-1);
    if (prev !== undefined && start <= prev.last + 1n) {
      if (last > prev.last) prev.last = last;
    } else {
      out.push({ start, last });
    }
  }
  return out;
}

/** The holes of a set of ranges within [lo, hi]: the is_hole spans. */
export function holes(ranges: readonly IovaRange[], lo: bigint, hi: bigint): IovaRange[] {
  const out: IovaRange[] = [];
  let cursor = lo;
  for (const used of usedSpans(ranges, lo, hi)) {
    if (used.start > cursor) out.push({ start: cursor, last: used.start - 1n });
    cursor = used.last + 1n;
  }
  if (cursor <= hi) out.push({ start: cursor, last: hi });
  return out;
}

export const hex = (x: bigint | number): string => `0x${x.toString(16)}`;
