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
   * Take a specific id (restoring a snapshot): lower ids never handed out
   * become free ones, so the lowest-free policy holds afterwards.
   */
  claim(id: number): void {
    if (id >= this.next) {
      for (let free = this.next; free < id; free++) this.free(free);
      this.next = id + 1;
      return;
    }
    const i = this.freed.indexOf(id);
    if (i < 0) throw new Error(`id ${id} is already in use`);
    const rest = this.freed.filter((f) => f !== id);
    this.freed.length = 0;
    for (const f of rest) this.free(f);
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
