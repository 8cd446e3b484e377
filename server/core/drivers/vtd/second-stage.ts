/**
 * A VT-d second-stage page table (vtd.md §2.1) kept by the host side of the
 * emulator: 512-entry tables of 64-bit entries in one Uint32Array pool
 * (entry x of table t at words (t << 10) + 2x, low half first), never in
 * guest RAM. Table 0 is the root. Entries are real second-stage entries:
 * bit 0 R, bit 1 W, bit 7 PS, bits 51:12 the address. A non-leaf entry's
 * address field holds the next table's pool index (a stand-in for its HPA);
 * a leaf's holds the host address (guest RAM offset) it maps.
 */
import { faultPoint } from "../../fail-nth.js";

export const SS_R = 1 << 0;
export const SS_W = 1 << 1;
export const SS_PS = 1 << 7;

const TABLE_WORDS = 1024;
const ENTRIES = 512;
/** Pages (4 KiB) a leaf at level L maps: 1, 512, 512^2. */
const PAGES_AT = [0, 1, 512, 512 * 512];

/** What a map() changed besides leaves, so that it can be undone exactly. */
interface MapJournal {
  /** The allocator as it was. */
  readonly tables: number;
  readonly freeTables: readonly number[];
  /** Entries linked to a new table. */
  readonly linked: number[];
  /** Entries whose empty table a superpage replaced: (index, old low word, old high word). */
  readonly replaced: number[];
}

/** The second-stage table index of `pfn` (a 4 KiB page number < 2^53) at level L. */
function indexAt(pfn: number, level: number): number {
  return Math.floor(pfn / 512 ** (level - 1)) % ENTRIES;
}

export class SecondStageTable {
  /** 4 (48-bit) or 5 (57-bit) levels. */
  readonly levels: number;
  /** The pool; replaced when it grows, so walkers read it per walk. */
  words: Uint32Array;
  private tables = 1;
  private readonly freeTables: number[] = [];

  constructor(levels: number) {
    this.levels = levels;
    this.words = new Uint32Array(TABLE_WORDS * 8);
  }

  /** Tables in use, the root included. */
  get tableCount(): number {
    return this.tables - this.freeTables.length;
  }

  private allocTable(): number {
    // iommu_alloc_pages_node_sz() of a page-table page (pfn_to_dma_pte()).
    faultPoint("iommu_alloc_pages_node");
    const reused = this.freeTables.pop();
    if (reused !== undefined) return reused;
    if ((this.tables + 1) * TABLE_WORDS > this.words.length) {
      const grown = new Uint32Array(this.words.length * 2);
      grown.set(this.words);
      this.words = grown;
    }
    return this.tables++;
  }

  /**
   * Index of the table `level - 1` below entry (t, x), creating it if absent;
   * a created table's entry index goes to `linked`.
   */
  private descend(t: number, x: number, linked: number[]): number {
    const w = (t << 10) + 2 * x;
    const lo = this.words[w];
    if ((lo & (SS_R | SS_W)) !== 0) return lo >>> 12;
    const next = this.allocTable();
    linked.push(w);
    this.words.fill(0, next << 10, (next + 1) << 10);
    this.words[w] = (next << 12) | SS_R | SS_W;
    this.words[w + 1] = 0;
    return next;
  }

  /**
   * Map pages [iovaPfn, iovaPfn + npages) to host pages from hostPfn with the
   * largest leaf (1 GiB, 2 MiB, 4 KiB) to which both addresses are aligned
   * and which the rest of the range covers, as intel_iommu_map() picks its
   * page sizes; 4 KiB only without `largePages`. The range must be unmapped.
   * A failed table allocation leaves the table as it was (iommu_map() unmaps
   * what it mapped on error; here the tables it linked go back too). Returns
   * the exact undo of the map (PagingDomain.map()).
   */
  map(iovaPfn: number, hostPfn: number, npages: number, read: boolean, write: boolean, largePages: boolean): () => void {
    const perm = (read ? SS_R : 0) | (write ? SS_W : 0);
    const journal: MapJournal = { tables: this.tables, freeTables: this.freeTables.slice(), linked: [], replaced: [] };
    let i = 0;
    try {
      while (i < npages) {
        const v = iovaPfn + i;
        const h = hostPfn + i;
        let level = 1;
        if (largePages) {
          for (const l of [3, 2]) {
            if (v % PAGES_AT[l] === 0 && h % PAGES_AT[l] === 0 && npages - i >= PAGES_AT[l]) {
              level = l;
              break;
            }
          }
        }
        let t = 0;
        for (let l = this.levels; l > level; l--) t = this.descend(t, indexAt(v, l), journal.linked);
        const w = (t << 10) + 2 * indexAt(v, level);
        if (level > 1 && (this.words[w] & (SS_R | SS_W)) !== 0 && (this.words[w] & SS_PS) === 0) {
          // An empty table left behind by an earlier unmap: the superpage replaces it.
          this.freeTables.push(this.words[w] >>> 12);
          journal.replaced.push(w, this.words[w], this.words[w + 1]);
        }
        this.words[w] = ((h % 2 ** 20) << 12) | perm | (level > 1 ? SS_PS : 0);
        this.words[w + 1] = Math.floor(h / 2 ** 20);
        i += PAGES_AT[level];
      }
    } catch (e) {
      this.undoMap(iovaPfn, i, journal);
      throw e;
    }
    return () => this.undoMap(iovaPfn, npages, journal);
  }

  /**
   * Put the table back as it was before a map() of [iovaPfn, iovaPfn +
   * pages): the leaves it wrote (the range was empty), the entries it changed
   * on the way down, newest first, and the table allocator.
   */
  private undoMap(iovaPfn: number, pages: number, journal: MapJournal): void {
    this.unmap(iovaPfn, pages);
    const { replaced, linked } = journal;
    for (let k = replaced.length - 3; k >= 0; k -= 3) {
      this.words[replaced[k]] = replaced[k + 1];
      this.words[replaced[k] + 1] = replaced[k + 2];
    }
    for (let k = linked.length - 1; k >= 0; k--) {
      this.words[linked[k]] = 0;
      this.words[linked[k] + 1] = 0;
    }
    this.tables = journal.tables;
    this.freeTables.length = 0;
    for (const free of journal.freeTables) this.freeTables.push(free);
  }

  /** Clear the leaves of [iovaPfn, iovaPfn + npages), which map() mapped as a whole. */
  unmap(iovaPfn: number, npages: number): void {
    for (let i = 0; i < npages; ) {
      const v = iovaPfn + i;
      let t = 0;
      let level = this.levels;
      for (;;) {
        const w = (t << 10) + 2 * indexAt(v, level);
        const lo = this.words[w];
        if ((lo & (SS_R | SS_W)) === 0) {
          // Nothing here: skip to the next entry at this level.
          i += PAGES_AT[Math.min(level, 3)] - (v % PAGES_AT[Math.min(level, 3)]);
          break;
        }
        if (level === 1 || (lo & SS_PS) !== 0) {
          this.words[w] = 0;
          this.words[w + 1] = 0;
          i += PAGES_AT[level];
          break;
        }
        t = lo >>> 12;
        level--;
      }
    }
  }
}
