/**
 * Object ids (iommufd-semantics.md §1.1; api.md Conventions): u32 >= 1, the
 * lowest free id is used, ids are reused after destroy (xa_alloc with
 * XA_FLAGS_ALLOC1).
 */
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { IdAllocator } from "../../server/core/id-allocator.js";

describe("IdAllocator", () => {
  it("starts at 1 and counts up", () => {
    const ids = new IdAllocator();
    expect([ids.alloc(), ids.alloc(), ids.alloc()]).toEqual([1, 2, 3]);
  });

  it("reuses freed ids, lowest first, before new ones", () => {
    const ids = new IdAllocator();
    for (let i = 0; i < 6; i++) ids.alloc();
    ids.free(5);
    ids.free(2);
    ids.free(4);
    expect([ids.alloc(), ids.alloc(), ids.alloc(), ids.alloc()]).toEqual([2, 4, 5, 7]);
  });

  it("hands out the lowest free id >= 1 for any sequence of allocs and frees (property, against a set model)", () => {
    fc.assert(
      fc.property(fc.array(fc.oneof(fc.constant("alloc" as const), fc.nat({ max: 40 })), { maxLength: 200 }), (ops) => {
        const ids = new IdAllocator();
        const live = new Set<number>();
        for (const op of ops) {
          if (op === "alloc") {
            let expected = 1;
            while (live.has(expected)) expected++;
            expect(ids.alloc()).toBe(expected);
            live.add(expected);
          } else {
            // Free the op-th live id (in ascending order), if any.
            const sorted = [...live].sort((a, b) => a - b);
            if (sorted.length === 0) continue;
            const id = sorted[op % sorted.length];
            live.delete(id);
            ids.free(id);
          }
        }
      }),
      { numRuns: 300, seed: 0x1d5 },
    );
  });
});
