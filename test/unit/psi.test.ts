/**
 * How an invalidation range becomes a VT-d page-selective invalidation
 * (ADDR, AM): vtd.md §4.3 (calculate_psi_aligned_address() of
 * drivers/iommu/intel/cache.c) and §4.4 (the user invalidation entry range).
 */
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { FLUSH_ALL, flushRange, MAX_AGAW_PFN_WIDTH, psiAlignedAddress, userInvalidationBlock, userInvalidationRange } from "../../server/core/drivers/vtd/psi.js";

const U64_MAX = (1n << 64n) - 1n;
const PAGE = 4096n;

/** The byte range [first, last] a (addr, mask) flush covers. */
const covered = (r: { addr: bigint; mask: number }) => ({ first: r.addr, last: r.addr + (PAGE << BigInt(r.mask)) - 1n });

describe("psiAlignedAddress: the vtd.md §4.3 examples table", () => {
  it.each([
    { what: "3 pages @0x5000", start: 0x5000n, pages: 3n, am: 2, first: 0x4000n, last: 0x7fffn },
    { what: "2 pages @0x7000", start: 0x7000n, pages: 2n, am: 4, first: 0x0n, last: 0xffffn },
    { what: "2 pages @0x1ff000", start: 0x1ff000n, pages: 2n, am: 10, first: 0x0n, last: 0x3fffffn },
    { what: "512 pages @0x200000", start: 0x200000n, pages: 512n, am: 9, first: 0x200000n, last: 0x3fffffn },
  ])("$what → AM $am, range $first–$last", ({ start, pages, am, first, last }) => {
    const r = psiAlignedAddress(start, start + pages * PAGE - 1n);
    expect(r.mask).toBe(am);
    expect(covered(r)).toEqual({ first, last });
  });
});

describe("psiAlignedAddress: other rules of vtd.md §4.3", () => {
  it("a single aligned page is AM 0 at that page", () => {
    expect(psiAlignedAddress(0x5000n, 0x5fffn)).toEqual({ addr: 0x5000n, mask: 0 });
  });

  it("an aligned power-of-two range is flushed exactly", () => {
    expect(psiAlignedAddress(0x40000n, 0x7ffffn)).toEqual({ addr: 0x40000n, mask: 6 });
  });

  it("a byte range is widened to the pages it touches", () => {
    // [0x5800, 0x6800] touches pages 5 and 6: two pages, unaligned at 5 → AM 2 @0x4000.
    expect(psiAlignedAddress(0x5800n, 0x6800n)).toEqual({ addr: 0x4000n, mask: 2 });
  });

  it("a range straddling the top of the 52-bit page-frame space is everything (mask 52)", () => {
    // pfn 0x7ffff...ff and the next one straddle bit 51.
    const start = ((1n << 51n) - 1n) * PAGE;
    expect(psiAlignedAddress(start, start + 2n * PAGE - 1n)).toEqual(FLUSH_ALL);
  });

  it("the result always covers the requested pages and is naturally aligned (property)", () => {
    fc.assert(
      fc.property(fc.bigInt({ min: 0n, max: (1n << 40n) - 1n }), fc.bigInt({ min: 1n, max: 1n << 20n }), (pfn, pages) => {
        const start = pfn * PAGE;
        const end = start + pages * PAGE - 1n;
        const r = psiAlignedAddress(start, end);
        if (r.mask >= MAX_AGAW_PFN_WIDTH) return;
        const { first, last } = covered(r);
        expect(first).toBeLessThanOrEqual(start);
        expect(last).toBeGreaterThanOrEqual(end);
        expect(r.addr % (PAGE << BigInt(r.mask))).toBe(0n);
        // Never smaller than the power of two that holds the page count.
        expect(1n << BigInt(r.mask)).toBeGreaterThanOrEqual(pages);
      }),
      { numRuns: 500, seed: 0x9515 },
    );
  });
});

describe("flushRange / userInvalidationRange (vtd.md §4.3–§4.4)", () => {
  it("start 0 and end ULONG_MAX is everything: addr 0, mask 52 (MAX_AGAW_PFN_WIDTH)", () => {
    expect(MAX_AGAW_PFN_WIDTH).toBe(52);
    expect(flushRange(0n, U64_MAX)).toEqual({ addr: 0n, mask: 52 });
  });

  it("addr 0 with npages U64_MAX means everything", () => {
    expect(userInvalidationRange(0n, U64_MAX)).toEqual(FLUSH_ALL);
  });

  it("an entry covers [addr, addr + npages * 4 KiB - 1]", () => {
    expect(userInvalidationRange(0x5000n, 3n)).toEqual({ addr: 0x4000n, mask: 2 });
    expect(userInvalidationRange(0x200000n, 512n)).toEqual({ addr: 0x200000n, mask: 9 });
    expect(userInvalidationRange(0x1000n, 1n)).toEqual({ addr: 0x1000n, mask: 0 });
  });

  it("2^52 pages from 0 (the largest AM) is everything", () => {
    expect(userInvalidationRange(0n, 1n << 52n)).toEqual(FLUSH_ALL);
  });
});

describe("userInvalidationBlock: the invalidation path's number arithmetic", () => {
  it("flushes exactly the block userInvalidationRange (the kernel's u64 arithmetic) names, for aligned entries", () => {
    fc.assert(
      fc.property(fc.bigInt({ min: 0n, max: (1n << 40n) - 1n }), fc.bigInt({ min: 1n, max: 1n << 41n }), (pfn, npages) => {
        const exact = userInvalidationRange(pfn << 12n, npages);
        const block = userInvalidationBlock(Number(pfn), Number(npages));
        if (exact.mask >= MAX_AGAW_PFN_WIDTH) expect(block.mask).toBeGreaterThanOrEqual(MAX_AGAW_PFN_WIDTH);
        else expect(block).toEqual({ pfn: Number(exact.addr >> 12n), mask: exact.mask });
      }),
      { numRuns: 2000, seed: 42 },
    );
  });

  it("treats npages beyond the address space (and npages 0, which wraps) as everything", () => {
    expect(userInvalidationBlock(0, Infinity).mask).toBe(MAX_AGAW_PFN_WIDTH);
    expect(userInvalidationBlock(5, 0).mask).toBe(MAX_AGAW_PFN_WIDTH);
    expect(userInvalidationBlock(0, 2 ** 52).mask).toBe(MAX_AGAW_PFN_WIDTH);
    expect(userInvalidationBlock(2 ** 51, 2 ** 51)).toEqual({ pfn: 2 ** 51, mask: 51 });
  });
});
