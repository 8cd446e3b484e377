/**
 * The interval helpers of the IOVA space (server/core/iova.ts): used spans
 * and holes of a set of inclusive ranges, as interval_tree_for_each_span()
 * yields them (iommufd-semantics.md §3.3: IOVA_RANGES are the holes of the
 * reserved set over [0, ULONG_MAX]).
 */
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { addU64, holes, intersects, isAligned, lowestSetBit, roundupPowOfTwo, U64_MAX, usedSpans } from "../../server/core/iova.js";

const r = (start: bigint, last: bigint) => ({ start, last });

describe("usedSpans", () => {
  it("is empty for no ranges", () => {
    expect(usedSpans([], 0n, U64_MAX)).toEqual([]);
  });

  it("sorts, merges overlapping and adjacent ranges, keeps gaps", () => {
    expect(usedSpans([r(30n, 40n), r(0n, 9n), r(10n, 12n), r(11n, 20n), r(22n, 25n)], 0n, 100n)).toEqual([r(0n, 20n), r(22n, 25n), r(30n, 40n)]);
  });

  it("clips to [lo, hi] and drops ranges outside it", () => {
    expect(usedSpans([r(0n, 15n), r(18n, 30n), r(50n, 60n)], 10n, 20n)).toEqual([r(10n, 15n), r(18n, 20n)]);
  });

  it("handles the ends of the u64 space", () => {
    expect(usedSpans([r(0n, 0xffffffn), r(0x80000000n, U64_MAX)], 0n, U64_MAX)).toEqual([r(0n, 0xffffffn), r(0x80000000n, U64_MAX)]);
  });

  it("does not modify its input", () => {
    const input = [r(5n, 6n), r(1n, 2n)];
    usedSpans(input, 0n, 10n);
    expect(input).toEqual([r(5n, 6n), r(1n, 2n)]);
  });
});

describe("holes", () => {
  it("of nothing is the whole window", () => {
    expect(holes([], 0n, U64_MAX)).toEqual([r(0n, U64_MAX)]);
  });

  it("of the mock aperture's reservations is the aperture (§3.3, §8.3)", () => {
    expect(holes([r(0n, 0xffffffn), r(0x80000000n, U64_MAX)], 0n, U64_MAX)).toEqual([r(0x1000000n, 0x7fffffffn)]);
  });

  it("of a window fully covered is empty", () => {
    expect(holes([r(0n, U64_MAX)], 0n, U64_MAX)).toEqual([]);
    expect(holes([r(0n, 5n), r(6n, 10n)], 2n, 8n)).toEqual([]);
  });

  it("includes holes at both ends", () => {
    expect(holes([r(10n, 20n)], 0n, 30n)).toEqual([r(0n, 9n), r(21n, 30n)]);
  });
});

describe("usedSpans and holes against a brute-force bitmap (property)", () => {
  const small = fc.integer({ min: 0, max: 63 });
  const rangeArb = fc.tuple(small, small).map(([a, b]) => r(BigInt(Math.min(a, b)), BigInt(Math.max(a, b))));

  it("partition [lo, hi] into exactly the used and the free points, maximal, sorted and disjoint", () => {
    fc.assert(
      fc.property(fc.array(rangeArb, { maxLength: 8 }), small, small, (ranges, a, b) => {
        const lo = BigInt(Math.min(a, b));
        const hi = BigInt(Math.max(a, b));
        const used = new Set<bigint>();
        for (const x of ranges) for (let p = x.start; p <= x.last; p++) if (p >= lo && p <= hi) used.add(p);
        const spans = usedSpans(ranges, lo, hi);
        const gaps = holes(ranges, lo, hi);
        const points = (list: { start: bigint; last: bigint }[]) => list.flatMap((s) => Array.from({ length: Number(s.last - s.start + 1n) }, (_, i) => s.start + BigInt(i)));
        expect(new Set(points(spans))).toEqual(used);
        const free = new Set<bigint>();
        for (let p = lo; p <= hi; p++) if (!used.has(p)) free.add(p);
        expect(new Set(points(gaps))).toEqual(free);
        // Sorted, disjoint and maximal: consecutive spans leave a gap of at least one point.
        for (const list of [spans, gaps]) {
          for (let i = 1; i < list.length; i++) expect(list[i].start).toBeGreaterThan(list[i - 1].last + 1n);
        }
      }),
      { numRuns: 500, seed: 0x10a5 },
    );
  });
});

describe("u64 helpers", () => {
  it("addU64 reports overflow past 2^64 - 1", () => {
    expect(addU64(U64_MAX - 1n, 1n)).toBe(U64_MAX);
    expect(addU64(U64_MAX, 1n)).toBeUndefined();
  });

  it("roundupPowOfTwo, lowestSetBit, isAligned, intersects", () => {
    expect([1n, 2n, 3n, 4096n, 4097n].map(roundupPowOfTwo)).toEqual([1n, 2n, 4n, 4096n, 8192n]);
    expect([1n, 6n, 0x3000n, 1n << 63n].map(lowestSetBit)).toEqual([1n, 2n, 0x1000n, 1n << 63n]);
    expect(isAligned(0x2000n, 0x1000n)).toBe(true);
    expect(isAligned(0x2800n, 0x1000n)).toBe(false);
    expect(intersects(r(10n, 20n), 20n, 30n)).toBe(true);
    expect(intersects(r(10n, 20n), 21n, 30n)).toBe(false);
  });
});
