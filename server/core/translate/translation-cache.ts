/**
 * A bounded, tagged, multi-size translation cache in typed arrays: the
 * emulated IOTLB and the paging-structure caches are instances of it.
 *
 * An entry is keyed by (tag, size class, page number at that size) and holds
 * an address (a host address, or the host address of a next-level table)
 * and a few permission bits. Tags stand for (domain, PASID) pairs.
 *
 * - Lookup hashes the key into a bucket chain (Int32Array links): no string
 *   or BigInt keys, no allocation.
 * - Each tag keeps a doubly linked list of its entries and a count per size
 *   class, so invalidating a domain or a range costs what it drops (or the
 *   pages it names), never a scan of the whole cache.
 * - When full, CLOCK (second chance) picks the victim: a hit only sets a
 *   reference byte.
 *
 * Page numbers are split into u32 halves (lo, hi) so inputs up to 2^64 stay
 * exact in 32-bit integer arithmetic.
 */
const NONE = -1;

export class TranslationCache {
  readonly capacity: number;
  /** Size classes: log2 of the page size each class caches. */
  readonly shifts: readonly number[];
  private readonly bucketMask: number;
  private readonly buckets: Int32Array;
  private readonly chain: Int32Array;
  readonly tag: Int32Array;
  readonly pageLo: Uint32Array;
  readonly pageHi: Uint32Array;
  readonly cls: Uint8Array;
  readonly addr: Float64Array;
  readonly perm: Uint8Array;
  private readonly referenced: Uint8Array;
  private readonly tagPrev: Int32Array;
  private readonly tagNext: Int32Array;
  private tagHead = new Int32Array(64).fill(NONE);
  /** Entries per (tag, class): tagClassCount[tag * classes + c]. */
  private tagClassCount = new Int32Array(64 * 4);
  /** Bit c set when the tag has entries of class c. */
  private tagClassMask = new Uint8Array(64);
  private freeHead = NONE;
  private hand = 0;
  private used = 0;

  constructor(capacity: number, shifts: readonly number[]) {
    if (shifts.length > 8) throw new Error("at most 8 size classes");
    this.capacity = capacity;
    this.shifts = shifts;
    let buckets = 1;
    while (buckets < capacity * 2) buckets <<= 1;
    this.bucketMask = buckets - 1;
    this.buckets = new Int32Array(buckets).fill(NONE);
    this.chain = new Int32Array(capacity);
    this.tag = new Int32Array(capacity).fill(NONE);
    this.pageLo = new Uint32Array(capacity);
    this.pageHi = new Uint32Array(capacity);
    this.cls = new Uint8Array(capacity);
    this.addr = new Float64Array(capacity);
    this.perm = new Uint8Array(capacity);
    this.referenced = new Uint8Array(capacity);
    this.tagPrev = new Int32Array(capacity);
    this.tagNext = new Int32Array(capacity);
    for (let i = capacity - 1; i >= 0; i--) {
      this.chain[i] = this.freeHead;
      this.freeHead = i;
    }
  }

  /** Entries cached now. */
  get size(): number {
    return this.used;
  }

  private bucketOf(tag: number, c: number, lo: number, hi: number): number {
    let h = Math.imul(lo ^ Math.imul(tag, 0x9e3779b1) ^ Math.imul(hi ^ (c << 24), 0x85ebca77), 0xc2b2ae3d);
    h ^= h >>> 15;
    return h & this.bucketMask;
  }

  /** The size classes `tag` has entries in (bit c for class c). */
  classMask(tag: number): number {
    return tag < this.tagClassMask.length ? this.tagClassMask[tag] : 0;
  }

  /**
   * The entry for input address (iovaLo, iovaHi) in class c, or -1. A hit
   * marks the entry referenced for CLOCK.
   */
  lookup(tag: number, c: number, iovaLo: number, iovaHi: number): number {
    const s = this.shifts[c];
    const lo = s < 32 ? ((iovaLo >>> s) | (iovaHi << (32 - s))) >>> 0 : iovaHi >>> (s - 32);
    const hi = s < 32 ? iovaHi >>> s : 0;
    let i = this.buckets[this.bucketOf(tag, c, lo, hi)];
    while (i !== NONE) {
      if (this.pageLo[i] === lo && this.tag[i] === tag && this.pageHi[i] === hi && this.cls[i] === c) {
        this.referenced[i] = 1;
        return i;
      }
      i = this.chain[i];
    }
    return NONE;
  }

  /**
   * Cache `addr`/`perm` for the class-c page containing (iovaLo, iovaHi),
   * replacing an entry with the same key or evicting by CLOCK when full.
   */
  insert(tag: number, c: number, iovaLo: number, iovaHi: number, addr: number, perm: number): void {
    if (this.capacity === 0) return;
    const s = this.shifts[c];
    const lo = s < 32 ? ((iovaLo >>> s) | (iovaHi << (32 - s))) >>> 0 : iovaHi >>> (s - 32);
    const hi = s < 32 ? iovaHi >>> s : 0;
    const b = this.bucketOf(tag, c, lo, hi);
    for (let i = this.buckets[b]; i !== NONE; i = this.chain[i]) {
      if (this.pageLo[i] === lo && this.tag[i] === tag && this.pageHi[i] === hi && this.cls[i] === c) {
        this.addr[i] = addr;
        this.perm[i] = perm;
        this.referenced[i] = 1;
        return;
      }
    }
    let i = this.freeHead;
    if (i === NONE) {
      i = this.victim();
      this.remove(i);
      i = this.freeHead;
    }
    this.freeHead = this.chain[i];
    this.tag[i] = tag;
    this.cls[i] = c;
    this.pageLo[i] = lo;
    this.pageHi[i] = hi;
    this.addr[i] = addr;
    this.perm[i] = perm;
    this.referenced[i] = 0;
    this.chain[i] = this.buckets[b];
    this.buckets[b] = i;
    this.linkTag(i, tag, c);
    this.used++;
  }

  /** CLOCK: sweep, clearing reference bits, until an unreferenced entry. */
  private victim(): number {
    for (;;) {
      const i = this.hand;
      this.hand = i + 1 === this.capacity ? 0 : i + 1;
      if (this.referenced[i] === 0) return i;
      this.referenced[i] = 0;
    }
  }

  private growTags(tag: number): void {
    let n = this.tagHead.length;
    while (n <= tag) n *= 2;
    const head = new Int32Array(n).fill(NONE);
    head.set(this.tagHead);
    this.tagHead = head;
    const counts = new Int32Array(n * 8);
    counts.set(this.tagClassCount);
    this.tagClassCount = counts;
    const mask = new Uint8Array(n);
    mask.set(this.tagClassMask);
    this.tagClassMask = mask;
  }

  private linkTag(i: number, tag: number, c: number): void {
    if (tag >= this.tagHead.length) this.growTags(tag);
    const head = this.tagHead[tag];
    this.tagPrev[i] = NONE;
    this.tagNext[i] = head;
    if (head !== NONE) this.tagPrev[head] = i;
    this.tagHead[tag] = i;
    if (this.tagClassCount[tag * 8 + c]++ === 0) this.tagClassMask[tag] |= 1 << c;
  }

  /** Drop entry i. */
  remove(i: number): void {
    const tag = this.tag[i];
    const c = this.cls[i];
    const b = this.bucketOf(tag, c, this.pageLo[i], this.pageHi[i]);
    if (this.buckets[b] === i) {
      this.buckets[b] = this.chain[i];
    } else {
      let p = this.buckets[b];
      while (this.chain[p] !== i) p = this.chain[p];
      this.chain[p] = this.chain[i];
    }
    const prev = this.tagPrev[i];
    const next = this.tagNext[i];
    if (prev === NONE) this.tagHead[tag] = next;
    else this.tagNext[prev] = next;
    if (next !== NONE) this.tagPrev[next] = prev;
    if (--this.tagClassCount[tag * 8 + c] === 0) this.tagClassMask[tag] &= ~(1 << c);
    this.tag[i] = NONE;
    this.chain[i] = this.freeHead;
    this.freeHead = i;
    this.used--;
  }

  /** Entries of `tag` in insertion-recency order (newest first). */
  *entriesOf(tag: number): IterableIterator<number> {
    if (tag >= this.tagHead.length) return;
    for (let i = this.tagHead[tag]; i !== NONE; ) {
      const next = this.tagNext[i];
      yield i;
      i = next;
    }
  }

  private countOf(tag: number): number {
    let n = 0;
    for (let c = 0; c < this.shifts.length; c++) n += this.tagClassCount[tag * 8 + c];
    return n;
  }

  /** Drop every entry of `tag`; returns how many. */
  flushTag(tag: number): number {
    if (tag >= this.tagHead.length) return 0;
    let n = 0;
    for (let i = this.tagHead[tag]; i !== NONE; ) {
      const next = this.tagNext[i];
      this.remove(i);
      n++;
      i = next;
    }
    return n;
  }

  /**
   * Drop the entries of `tag` that overlap the input range of 4 KiB pages
   * [firstPage, firstPage + pages): by probing the keys the range names when
   * that is fewer than the tag's entries, else by walking the tag's list.
   * Page numbers are < 2^53 (exact as numbers). Returns how many.
   */
  flushTagRange(tag: number, firstPage: number, pages: number): number {
    const mask = this.classMask(tag);
    if (mask === 0) return 0;
    const lastPage = firstPage + pages - 1;
    let probes = 0;
    for (let c = 0; c < this.shifts.length; c++) {
      if (mask & (1 << c)) probes += Math.floor(lastPage / 2 ** (this.shifts[c] - 12)) - Math.floor(firstPage / 2 ** (this.shifts[c] - 12)) + 1;
    }
    let n = 0;
    if (probes <= this.countOf(tag)) {
      for (let c = 0; c < this.shifts.length; c++) {
        if (!(mask & (1 << c))) continue;
        const scale = 2 ** (this.shifts[c] - 12);
        for (let p = Math.floor(firstPage / scale); p <= Math.floor(lastPage / scale); p++) {
          const i = this.find(tag, c, p % 2 ** 32, Math.floor(p / 2 ** 32));
          if (i !== NONE) {
            this.remove(i);
            n++;
          }
        }
      }
    } else {
      for (let i = this.tagHead[tag]; i !== NONE; ) {
        const next = this.tagNext[i];
        const scale = 2 ** (this.shifts[this.cls[i]] - 12);
        const first = (this.pageHi[i] * 2 ** 32 + this.pageLo[i]) * scale;
        if (first <= lastPage && first + scale - 1 >= firstPage) {
          this.remove(i);
          n++;
        }
        i = next;
      }
    }
    return n;
  }

  /** The entry with exactly this key (page number halves at class c), or -1. */
  private find(tag: number, c: number, lo: number, hi: number): number {
    for (let i = this.buckets[this.bucketOf(tag, c, lo, hi)]; i !== NONE; i = this.chain[i]) {
      if (this.pageLo[i] === lo && this.tag[i] === tag && this.pageHi[i] === hi && this.cls[i] === c) return i;
    }
    return NONE;
  }

  /** First input address of entry i, as a number (< 2^64, exact when < 2^53). */
  inputAddress(i: number): bigint {
    return ((BigInt(this.pageHi[i]) << 32n) | BigInt(this.pageLo[i])) << BigInt(this.shifts[this.cls[i]]);
  }
}
