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
 * - Each tag keeps a doubly linked list of its live entries and a count per
 *   size class, so invalidating a range costs what it drops (or the pages it
 *   names), never a scan of the whole cache.
 * - Dropping every entry of a tag is O(1): the tag's generation moves on and
 *   its old entries become stale, to be reclaimed lazily (first by the
 *   replacement sweep, or when a lookup or insert meets them).
 * - When full, CLOCK (second chance) picks the victim: a hit only sets a
 *   reference byte.
 *
 * Page numbers are split into u32 halves (lo, hi) so inputs up to 2^64 stay
 * exact in 32-bit integer arithmetic. A hit compares three words: the page
 * halves and a stamp packing (generation, tag, class).
 */
const NONE = -1;
const MAX_CLASSES = 8;
/** Stamp layout: generation (12 bits) | tag (17 bits) | class (3 bits). */
export const MAX_TAGS = 1 << 17;
const GEN_MASK = 0xfff;

function stampOf(tag: number, gen: number, c: number): number {
  return ((gen & GEN_MASK) << 20) | (tag << 3) | c;
}

export class TranslationCache {
  readonly capacity: number;
  /** Size classes: log2 of the page size each class caches. */
  readonly shifts: Int32Array;
  private readonly bucketMask: number;
  private readonly buckets: Int32Array;
  private readonly bucketOfEntry: Int32Array;
  private readonly chainNext: Int32Array;
  private readonly chainPrev: Int32Array;
  /** NONE for a free slot. */
  readonly tag: Int32Array;
  /** stampOf(tag, generation when cached, class). */
  private readonly stamp: Int32Array;
  readonly pageLo: Uint32Array;
  readonly pageHi: Uint32Array;
  readonly cls: Uint8Array;
  readonly addr: Float64Array;
  readonly perm: Uint8Array;
  private readonly referenced: Uint8Array;
  private readonly tagPrev: Int32Array;
  private readonly tagNext: Int32Array;
  private tagHead = new Int32Array(64).fill(NONE);
  private tagGen = new Int32Array(64);
  /** Live entries per (tag, class): tagClassCount[tag * MAX_CLASSES + c]. */
  private tagClassCount = new Int32Array(64 * MAX_CLASSES);
  /** Bit c set when the tag has live entries of class c. */
  private tagClassMask = new Uint8Array(64);
  private freeHead = NONE;
  private hand = 0;
  /** Where the search for stale slots resumes. */
  private staleHand = 0;
  private live = 0;
  /** Slots holding entries of a flushed generation, awaiting reuse. */
  private stale = 0;

  constructor(capacity: number, shifts: readonly number[]) {
    if (shifts.length > MAX_CLASSES) throw new Error(`at most ${MAX_CLASSES} size classes`);
    this.capacity = capacity;
    this.shifts = Int32Array.from(shifts);
    let buckets = 1;
    while (buckets < capacity * 2) buckets <<= 1;
    this.bucketMask = buckets - 1;
    this.buckets = new Int32Array(buckets).fill(NONE);
    this.bucketOfEntry = new Int32Array(capacity);
    this.chainNext = new Int32Array(capacity);
    this.chainPrev = new Int32Array(capacity);
    this.tag = new Int32Array(capacity).fill(NONE);
    this.stamp = new Int32Array(capacity);
    this.pageLo = new Uint32Array(capacity);
    this.pageHi = new Uint32Array(capacity);
    this.cls = new Uint8Array(capacity);
    this.addr = new Float64Array(capacity);
    this.perm = new Uint8Array(capacity);
    this.referenced = new Uint8Array(capacity);
    this.tagPrev = new Int32Array(capacity);
    this.tagNext = new Int32Array(capacity);
    for (let i = capacity - 1; i >= 0; i--) {
      this.chainNext[i] = this.freeHead;
      this.freeHead = i;
    }
  }

  /** Live entries cached now. */
  get size(): number {
    return this.live;
  }

  private bucketOf(tag: number, c: number, lo: number, hi: number): number {
    let h = Math.imul(lo ^ Math.imul(tag, 0x9e3779b1) ^ Math.imul(hi ^ (c << 24), 0x85ebca77), 0xc2b2ae3d);
    h ^= h >>> 15;
    return h & this.bucketMask;
  }

  /** The size classes `tag` has live entries in (bit c for class c). */
  classMask(tag: number): number {
    return tag < this.tagClassMask.length ? this.tagClassMask[tag] : 0;
  }

  private isLive(i: number): boolean {
    const tag = this.tag[i];
    return tag !== NONE && this.stamp[i] === stampOf(tag, this.tagGen[tag], this.cls[i]);
  }

  /** The slot holding exactly this key, live or stale, or NONE. */
  private findSlot(b: number, tag: number, c: number, lo: number, hi: number): number {
    for (let i = this.buckets[b]; i !== NONE; i = this.chainNext[i]) {
      if (this.pageLo[i] === lo && this.tag[i] === tag && this.pageHi[i] === hi && this.cls[i] === c) return i;
    }
    return NONE;
  }

  /**
   * The live entry for input address (iovaLo, iovaHi) in class c, or -1. A
   * hit marks the entry referenced for CLOCK.
   */
  lookup(tag: number, c: number, iovaLo: number, iovaHi: number): number {
    const s = this.shifts[c];
    const lo = s < 32 ? ((iovaLo >>> s) | (iovaHi << (32 - s))) >>> 0 : iovaHi >>> (s - 32);
    const hi = s < 32 ? iovaHi >>> s : 0;
    const want = stampOf(tag, this.tagGen[tag], c);
    const { pageLo, pageHi, stamp, chainNext } = this;
    for (let i = this.buckets[this.bucketOf(tag, c, lo, hi)]; i !== NONE; i = chainNext[i]) {
      if (pageLo[i] === lo && stamp[i] === want && pageHi[i] === hi) {
        this.referenced[i] = 1;
        return i;
      }
    }
    return NONE;
  }

  /**
   * The IOTLB hit path for a run of accesses: from index `start` to `end`,
   * while the access (iovaLo[i], iovaHi[i]) hits a live entry of `tag` whose
   * perm bits include `need`, write the cached address plus the page offset
   * to out[i]. Returns the index of the first access that missed (or end).
   * Kept free of calls so the engine holds every array in a register.
   */
  hitRun(tag: number, iovaLo: Uint32Array, iovaHi: Uint32Array, start: number, end: number, need: number, out: Float64Array): number {
    const mask = tag < this.tagClassMask.length ? this.tagClassMask[tag] : 0;
    if (mask === 0) return start;
    const gen = this.tagGen[tag];
    const salt = Math.imul(tag, 0x9e3779b1);
    const { shifts, buckets, chainNext, pageLo, pageHi, stamp, perm, addr, referenced, bucketMask } = this;
    let i = start;
    outer: for (; i < end; i++) {
      const aLo = iovaLo[i];
      const aHi = iovaHi[i];
      for (let c = 0; mask >> c !== 0; c++) {
        if (((mask >> c) & 1) === 0) continue;
        const s = shifts[c];
        const lo = s < 32 ? ((aLo >>> s) | (aHi << (32 - s))) >>> 0 : aHi >>> (s - 32);
        const hi = s < 32 ? aHi >>> s : 0;
        const want = stampOf(tag, gen, c);
        let h = Math.imul(lo ^ salt ^ Math.imul(hi ^ (c << 24), 0x85ebca77), 0xc2b2ae3d);
        h ^= h >>> 15;
        for (let e = buckets[h & bucketMask]; e !== NONE; e = chainNext[e]) {
          if (pageLo[e] === lo && stamp[e] === want && pageHi[e] === hi) {
            if ((perm[e] & need) !== need) break outer;
            referenced[e] = 1;
            out[i] = addr[e] + ((aLo & ((1 << s) - 1)) >>> 0);
            continue outer;
          }
        }
      }
      break;
    }
    return i;
  }

  /**
   * Cache `addr`/`perm` for the class-c page containing (iovaLo, iovaHi),
   * replacing an entry with the same key or evicting by CLOCK when full.
   */
  insert(tag: number, c: number, iovaLo: number, iovaHi: number, addr: number, perm: number): void {
    if (this.capacity === 0) return;
    if (tag >= this.tagHead.length) this.growTags(tag);
    if (tag >= MAX_TAGS) throw new Error(`tag ${tag} beyond ${MAX_TAGS}`);
    const s = this.shifts[c];
    const lo = s < 32 ? ((iovaLo >>> s) | (iovaHi << (32 - s))) >>> 0 : iovaHi >>> (s - 32);
    const hi = s < 32 ? iovaHi >>> s : 0;
    const b = this.bucketOf(tag, c, lo, hi);
    let i = this.findSlot(b, tag, c, lo, hi);
    const stamp = stampOf(tag, this.tagGen[tag], c);
    if (i !== NONE && this.stamp[i] === stamp) {
      this.addr[i] = addr;
      this.perm[i] = perm;
      this.referenced[i] = 1;
      return;
    }
    if (i === NONE) {
      // A free slot, else a stale one (a flushed generation's), and only
      // then a live entry chosen by CLOCK.
      if (this.freeHead === NONE) this.reclaim(this.stale > 0 ? this.staleSlot() : this.victim());
      i = this.freeHead;
      this.freeHead = this.chainNext[i];
      this.tag[i] = tag;
      this.cls[i] = c;
      this.pageLo[i] = lo;
      this.pageHi[i] = hi;
      this.linkBucket(i, b);
    } else {
      // A stale entry with the same key, revived in place.
      this.stale--;
    }
    this.stamp[i] = stamp;
    this.addr[i] = addr;
    this.perm[i] = perm;
    this.referenced[i] = 0;
    this.linkTag(i, tag, c);
    this.live++;
  }

  /** CLOCK (second chance) over live entries: a referenced one is spared once. */
  private victim(): number {
    for (;;) {
      const i = this.hand;
      this.hand = i + 1 === this.capacity ? 0 : i + 1;
      if (this.referenced[i] === 0) return i;
      this.referenced[i] = 0;
    }
  }

  /** The next stale slot; each is found once per sweep, so the search is amortised O(1). */
  private staleSlot(): number {
    for (;;) {
      const i = this.staleHand;
      this.staleHand = i + 1 === this.capacity ? 0 : i + 1;
      if (this.tag[i] !== NONE && !this.isLive(i)) return i;
    }
  }

  private linkBucket(i: number, b: number): void {
    const head = this.buckets[b];
    this.bucketOfEntry[i] = b;
    this.chainPrev[i] = NONE;
    this.chainNext[i] = head;
    if (head !== NONE) this.chainPrev[head] = i;
    this.buckets[b] = i;
  }

  /** Free slot i (live or stale): out of its bucket chain (and tag list if live). */
  private reclaim(i: number): void {
    if (this.isLive(i)) this.unlinkTag(i);
    else this.stale--;
    const prev = this.chainPrev[i];
    const next = this.chainNext[i];
    if (prev === NONE) this.buckets[this.bucketOfEntry[i]] = next;
    else this.chainNext[prev] = next;
    if (next !== NONE) this.chainPrev[next] = prev;
    this.tag[i] = NONE;
    this.chainNext[i] = this.freeHead;
    this.freeHead = i;
  }

  private growTags(tag: number): void {
    let n = this.tagHead.length;
    while (n <= tag) n *= 2;
    const grow = <T extends Int32Array | Uint8Array>(old: T, make: (n: number) => T, fill?: number): T => {
      const next = make(n * (old.length / this.tagHead.length));
      if (fill !== undefined) next.fill(fill);
      next.set(old);
      return next;
    };
    this.tagGen = grow(this.tagGen, (k) => new Int32Array(k));
    this.tagClassCount = grow(this.tagClassCount, (k) => new Int32Array(k));
    this.tagClassMask = grow(this.tagClassMask, (k) => new Uint8Array(k));
    this.tagHead = grow(this.tagHead, (k) => new Int32Array(k), NONE);
  }

  private linkTag(i: number, tag: number, c: number): void {
    const head = this.tagHead[tag];
    this.tagPrev[i] = NONE;
    this.tagNext[i] = head;
    if (head !== NONE) this.tagPrev[head] = i;
    this.tagHead[tag] = i;
    if (this.tagClassCount[tag * MAX_CLASSES + c]++ === 0) this.tagClassMask[tag] |= 1 << c;
  }

  private unlinkTag(i: number): void {
    const tag = this.tag[i];
    const prev = this.tagPrev[i];
    const next = this.tagNext[i];
    if (prev === NONE) this.tagHead[tag] = next;
    else this.tagNext[prev] = next;
    if (next !== NONE) this.tagPrev[next] = prev;
    const c = this.cls[i];
    if (--this.tagClassCount[tag * MAX_CLASSES + c] === 0) this.tagClassMask[tag] &= ~(1 << c);
    this.live--;
  }

  /** Drop live entry i. */
  remove(i: number): void {
    this.reclaim(i);
  }

  /** Live entries of `tag`, newest first. */
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
    for (let c = 0; c < this.shifts.length; c++) n += this.tagClassCount[tag * MAX_CLASSES + c];
    return n;
  }

  /** Drop every entry of `tag` in O(1); returns how many were live. */
  flushTag(tag: number): number {
    if (tag >= this.tagHead.length) return 0;
    const n = this.countOf(tag);
    if ((this.tagGen[tag] & GEN_MASK) === GEN_MASK) {
      // The stamp keeps 12 generation bits: before they wrap, reclaim every
      // slot of the tag so that no stale entry can look live again.
      for (let i = 0; i < this.capacity; i++) if (this.tag[i] === tag) this.reclaim(i);
      this.tagGen[tag]++;
      return n;
    }
    this.tagGen[tag]++;
    this.tagHead[tag] = NONE;
    this.tagClassCount.fill(0, tag * MAX_CLASSES, (tag + 1) * MAX_CLASSES);
    this.tagClassMask[tag] = 0;
    this.live -= n;
    this.stale += n;
    return n;
  }

  /**
   * Drop the live entries of `tag` that overlap the input range of 4 KiB
   * pages [firstPage, firstPage + pages): by probing the keys the range names
   * when that is fewer than the tag's entries, else by walking the tag's list.
   * Page numbers are < 2^53 (exact as numbers). Returns how many.
   */
  flushTagRange(tag: number, firstPage: number, pages: number): number {
    const mask = this.classMask(tag);
    if (mask === 0) return 0;
    const lastPage = firstPage + pages - 1;
    let probes = 0;
    for (let c = 0; c < this.shifts.length; c++) {
      const scale = 2 ** (this.shifts[c] - 12);
      if (mask & (1 << c)) probes += Math.floor(lastPage / scale) - Math.floor(firstPage / scale) + 1;
    }
    let n = 0;
    if (probes <= this.countOf(tag)) {
      for (let c = 0; c < this.shifts.length; c++) {
        if (!(mask & (1 << c))) continue;
        const scale = 2 ** (this.shifts[c] - 12);
        for (let p = Math.floor(firstPage / scale); p <= Math.floor(lastPage / scale); p++) {
          const lo = p % 2 ** 32;
          const hi = Math.floor(p / 2 ** 32);
          const i = this.findSlot(this.bucketOf(tag, c, lo, hi), tag, c, lo, hi);
          if (i !== NONE && this.isLive(i)) {
            this.reclaim(i);
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
          this.reclaim(i);
          n++;
        }
        i = next;
      }
    }
    return n;
  }

  /** First input address of entry i. */
  inputAddress(i: number): bigint {
    return ((BigInt(this.pageHi[i]) << 32n) | BigInt(this.pageLo[i])) << BigInt(this.shifts[this.cls[i]]);
  }
}
