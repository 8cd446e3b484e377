import { fail } from "./errno.js";

/** xa_limit_31b: object ids are u32 in [1, 2^31 - 1]. */
const ID_MAX = 0x7fff_ffff;

/**
 * The object-id policy of iommufd_object_alloc(): xa_alloc() on an
 * XA_FLAGS_ALLOC1 xarray hands out the lowest free index >= 1, so ids freed by
 * IOMMU_DESTROY are reused, lowest first. Freed ids sit in a binary min-heap;
 * ids never handed out start at `next`.
 */
export class IdAllocator {
  private readonly freed: number[] = [];
  private next = 1;

  alloc(): number {
    if (this.freed.length > 0) return this.popMin();
    // xa_alloc() answers -EBUSY when the index range is exhausted.
    if (this.next > ID_MAX) fail("EBUSY", "object id space exhausted");
    return this.next++;
  }

  /**
   * Restoring a snapshot into a fresh allocator: exactly `ids` are in use,
   * every lower id not among them is free, so the lowest-free policy holds
   * afterwards. O(max id): the caller bounds the ids (by the objects quota).
   */
  restore(ids: readonly number[]): void {
    if (this.next !== 1 || this.freed.length > 0) throw new Error("restore() needs a fresh allocator");
    const used = new Set(ids);
    let max = 0;
    for (const id of used) max = Math.max(max, id);
    // Ascending order is a valid min-heap.
    for (let id = 1; id <= max; id++) if (!used.has(id)) this.freed.push(id);
    this.next = max + 1;
  }

  /**
   * The ids handed out and not freed, ascending (what the xarray holds):
   * the allocator's whole observable state, since alloc() always answers
   * the lowest id not in it.
   */
  inUse(): number[] {
    const freed = new Set(this.freed);
    const out: number[] = [];
    for (let id = 1; id < this.next; id++) if (!freed.has(id)) out.push(id);
    return out;
  }

  free(id: number): void {
    const heap = this.freed;
    heap.push(id);
    let i = heap.length - 1;
    while (i > 0) {
      const parent = (i - 1) >> 1;
      if (heap[parent] <= id) break;
      heap[i] = heap[parent];
      i = parent;
    }
    heap[i] = id;
  }

  private popMin(): number {
    const heap = this.freed;
    const min = heap[0];
    const last = heap.pop()!;
    if (heap.length > 0) {
      let i = 0;
      for (;;) {
        const l = 2 * i + 1;
        if (l >= heap.length) break;
        const r = l + 1;
        const child = r < heap.length && heap[r] < heap[l] ? r : l;
        if (heap[child] >= last) break;
        heap[i] = heap[child];
        i = child;
      }
      heap[i] = last;
    }
    return min;
  }
}
