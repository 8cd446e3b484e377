import type { GuestMemory } from "../../guest-memory.js";
import { type DmaBatch, depthBucket } from "../../translate/dma-batch.js";
import { FAULT } from "../../translate/fault.js";
import type { VtdNestedDomain, VtdPagingDomain } from "./domains.js";
import { SS_PS, SS_R, SS_W } from "./second-stage.js";
import type { VtdCaches } from "./vtd-caches.js";
import type { TranslationCache } from "../../translate/translation-cache.js";

/**
 * The emulated VT-d's DMA path: IOTLB lookup, then on a miss the
 * second-stage walk (paging domains) or the nested walk (vtd.md §2.2): the
 * first-stage tables live in guest RAM and every address the first stage
 * yields — FSPTPTR, each table, the output — is a GPA translated through the
 * second stage first. With empty caches a walk of n first-stage over m
 * second-stage levels reads exactly (n+1)(m+1)-1 entries.
 *
 * Hot path rules: u32 halves for 64-bit values, typed arrays, results in
 * fields of this object rather than allocated objects.
 */

// First-stage entry bits (vtd.md §1.1).
const FS_P = 1 << 0;
const FS_RW = 1 << 1;
const FS_US = 1 << 2;
const FS_A = 1 << 5;
const FS_D = 1 << 6;
const FS_PS = 1 << 7;
const FS_EA = 1 << 10;

// Permission bits of cached entries.
export const PERM_R = 1;
export const PERM_W = 2;
/** IOTLB: the first-stage leaf is dirty, so a write may use the entry. */
export const PERM_D = 4;
/** PSC: write allowed (R/W = 1) at every level so far. */
const PSC_RW = 1;
/** PSC: user access allowed (U/S = 1) at every level so far. */
const PSC_US = 2;
/** PSC: the next table's page is writable in stage 2 (A/D updates allowed). */
const PSC_SSW = 4;

/** What a GPA is translated for: the fault a second-stage failure becomes. */
const ROLE_ROOT = 0;
const ROLE_TABLE = 1;
const ROLE_DATA = 2;

const TWO_32 = 4294967296;

/** The index bits of a 64-bit address (lo, hi) at paging level L (1 = 4 KiB). */
function ptIndex(lo: number, hi: number, level: number): number {
  switch (level) {
    case 1:
      return (lo >>> 12) & 511;
    case 2:
      return (lo >>> 21) & 511;
    case 3:
      return ((lo >>> 30) | (hi << 2)) & 511;
    case 4:
      return (hi >>> 7) & 511;
    default:
      return (hi >>> 16) & 511;
  }
}

export class VtdWalker {
  /** Result of the last successful walk: host address of the accessed byte. */
  hpa = 0;
  /** log2 of the page size the result may be cached at. */
  shift = 12;
  /** PERM_R | PERM_W | PERM_D of the combined translation. */
  perm = 0;
  /** Entries read by the last walk (faulting or not). */
  refs = 0;

  private ssHpa = 0;
  private ssShift = 12;
  private ssPerm = 0;

  constructor(
    private readonly memory: GuestMemory,
    private readonly caches: VtdCaches,
  ) {}

  /** Translate accesses [start, end) of `batch` through a paging or nested domain. */
  translate(domain: VtdPagingDomain | VtdNestedDomain, pasid: number, batch: DmaBatch, start: number, end: number): void {
    const iotlb = this.caches.iotlb;
    const nested = domain.type === "nested";
    // The IOTLB is tagged by PASID only for first-stage and nested
    // translations (vtd.md §4.1): a second-stage-only domain shares its
    // entries between the RID and every PASID it serves.
    const tag = this.caches.tagOf(domain, nested ? pasid : 0);
    batch.mode = nested ? "nested" : "stage2";
    const { iovaLo, iovaHi, addr, refs, depthCounts } = batch;
    const write = batch.write;
    // A cached entry serves a read if readable, a write if writable and
    // dirty: a write to a clean or read-only entry re-walks (the guest may
    // have relaxed its tables, and a first write must set the dirty bit).
    const need = write ? PERM_W | PERM_D : PERM_R;
    let hits = 0;
    let references = 0;
    for (let i = start; i < end; i++) {
      // hitRun() finds nothing while the tag has no entries (an empty or disabled IOTLB): skip the call.
      const j = iotlb.classMask(tag) === 0 ? i : iotlb.hitRun(tag, iovaLo, iovaHi, i, end, need, addr);
      hits += j - i;
      i = j;
      if (i === end) break;
      const lo = iovaLo[i];
      const hi = iovaHi[i];
      const code = nested ? this.walkNested(domain as VtdNestedDomain, tag, lo, hi, write) : this.walkSecondStage(domain as VtdPagingDomain, lo, hi, write);
      refs[i] = this.refs;
      references += this.refs;
      depthCounts[depthBucket(this.refs)]++;
      if (code !== 0) {
        batch.recordFault(i, code);
        continue;
      }
      addr[i] = this.hpa;
      const s = this.shift;
      if (iotlb.capacity !== 0) iotlb.insert(tag, (s - 12) / 9, lo, hi, this.hpa - ((lo & ((1 << s) - 1)) >>> 0), this.perm);
    }
    batch.hits += hits;
    batch.misses += end - start - hits;
    batch.references += references;
  }

  /**
   * Translate GPA (lo, hi) through a second-stage table into ssHpa/ssShift/
   * ssPerm, using and filling the second-stage cache when `ssTag` >= 0.
   * Returns 0 or the fault code for `role`.
   */
  private ssTranslate(words: Uint32Array, levels: number, ssTag: number, lo: number, hi: number, role: number): number {
    // The input must fit the stage-2 width: 57 - 32 or 48 - 32 bits above bit 31.
    if (hi >>> (levels === 5 ? 25 : 16) !== 0) return role === ROLE_DATA ? FAULT.BEYOND_MAX_ADDRESS : FAULT.S1_TABLE_BEYOND_S2;
    const cache = ssTag >= 0 ? this.caches.ssCache : null;
    if (cache !== null) {
      const mask = cache.classMask(ssTag);
      for (let c = 0; mask >> c !== 0; c++) {
        if (((mask >> c) & 1) === 0) continue;
        const e = cache.lookup(ssTag, c, lo, hi);
        if (e >= 0) return this.ssResult(12 + 9 * c, cache.addr[e], cache.perm[e], lo, role);
      }
    }
    return this.ssWalk(words, levels, cache, ssTag, lo, hi, role);
  }

  /**
   * The stage-2 walk proper (vtd.md §2.1), unrolled per level: stage-2 walks
   * are most of a nested walk's work. Each level reads the entry's low word,
   * faults if it is not present (R = W = 0), accumulates R/W, and checks the
   * reserved bits of the high word (TM, bit 62) and, for a leaf, of the low
   * word (QEMU's masks). Every entry read counts one reference, faulting or
   * not. (Unrolled rather than a loop over levels: +14% cold nested walks.)
   */
  private ssWalk(words: Uint32Array, levels: number, cache: TranslationCache | null, ssTag: number, lo: number, hi: number, role: number): number {
    const notPresent = role === ROLE_ROOT ? FAULT.S2_ACCESS_S1_ROOT : FAULT.S2_NOT_PRESENT;
    let perm = SS_R | SS_W;
    let reads = 0;
    let t = 0; // the root table
    let w: number;
    let eLo: number;
    let eHi: number;
    if (levels === 5) {
      // SS-PML5E [GPA 56:48]: never a leaf; PS here is reserved, as is TM.
      w = ((hi >>> 16) & 511) << 1;
      eLo = words[w];
      reads++;
      if ((eLo & (SS_R | SS_W)) === 0) return this.ssFault(reads, notPresent);
      if (((words[w + 1] & SS_HI_RESERVED) | (eLo & SS_PS)) !== 0) return this.ssFault(reads, FAULT.S2_RESERVED);
      perm &= eLo;
      t = eLo >>> 12;
    }
    // SS-PML4E [GPA 47:39]: the same rules as the PML5E.
    w = (t << 10) | (((hi >>> 7) & 511) << 1);
    eLo = words[w];
    reads++;
    if ((eLo & (SS_R | SS_W)) === 0) return this.ssFault(reads, notPresent);
    if (((words[w + 1] & SS_HI_RESERVED) | (eLo & SS_PS)) !== 0) return this.ssFault(reads, FAULT.S2_RESERVED);
    perm &= eLo;
    t = eLo >>> 12;
    // SS-PDPE [GPA 38:30]: a 1 GiB leaf when PS, with address bits 29:12 reserved.
    w = (t << 10) | ((((lo >>> 30) | (hi << 2)) & 511) << 1);
    eLo = words[w];
    reads++;
    if ((eLo & (SS_R | SS_W)) === 0) return this.ssFault(reads, notPresent);
    perm &= eLo;
    eHi = words[w + 1];
    if ((eLo & SS_PS) !== 0) {
      if (((eHi & SS_HI_RESERVED) | (eLo & SS_L3_LEAF_RESERVED)) !== 0) return this.ssFault(reads, FAULT.S2_RESERVED);
      return this.ssLeaf(cache, ssTag, 3, eLo, eHi, perm, reads, lo, hi, role);
    }
    if ((eHi & SS_HI_RESERVED) !== 0) return this.ssFault(reads, FAULT.S2_RESERVED);
    t = eLo >>> 12;
    // SS-PDE [GPA 29:21]: a 2 MiB leaf when PS, with address bits 20:12 reserved.
    w = (t << 10) | (((lo >>> 21) & 511) << 1);
    eLo = words[w];
    reads++;
    if ((eLo & (SS_R | SS_W)) === 0) return this.ssFault(reads, notPresent);
    perm &= eLo;
    eHi = words[w + 1];
    if ((eLo & SS_PS) !== 0) {
      if (((eHi & SS_HI_RESERVED) | (eLo & SS_L2_LEAF_RESERVED)) !== 0) return this.ssFault(reads, FAULT.S2_RESERVED);
      return this.ssLeaf(cache, ssTag, 2, eLo, eHi, perm, reads, lo, hi, role);
    }
    if ((eHi & SS_HI_RESERVED) !== 0) return this.ssFault(reads, FAULT.S2_RESERVED);
    t = eLo >>> 12;
    // SS-PTE [GPA 20:12]: always a leaf; only TM is reserved.
    w = (t << 10) | (((lo >>> 12) & 511) << 1);
    eLo = words[w];
    reads++;
    if ((eLo & (SS_R | SS_W)) === 0) return this.ssFault(reads, notPresent);
    perm &= eLo;
    eHi = words[w + 1];
    if ((eHi & SS_HI_RESERVED) !== 0) return this.ssFault(reads, FAULT.S2_RESERVED);
    return this.ssLeaf(cache, ssTag, 1, eLo, eHi, perm, reads, lo, hi, role);
  }

  /** A stage-2 walk faulted after `reads` entries. */
  private ssFault(reads: number, code: number): number {
    this.refs += reads;
    return code;
  }

  /** A stage-2 walk reached its leaf at `level`: cache it, then the result. */
  private ssLeaf(cache: TranslationCache | null, ssTag: number, level: number, eLo: number, eHi: number, perm: number, reads: number, lo: number, hi: number, role: number): number {
    this.refs += reads;
    const base = (eHi & 0xfffff) * TWO_32 + ((eLo & 0xfffff000) >>> 0);
    if (cache !== null) cache.insert(ssTag, level - 1, lo, hi, base, perm & (SS_R | SS_W));
    return this.ssResult(3 + 9 * level, base, perm, lo, role);
  }

  /**
   * The stage-2 result (leaf of 2^s bytes at `base`, cumulative R/W `perm`);
   * reading a first-stage structure needs R (vtd.md §2.3: 0x75 at the root,
   * 0x76 below).
   */
  private ssResult(s: number, base: number, perm: number, lo: number, role: number): number {
    this.ssShift = s;
    this.ssHpa = base + ((lo & ((1 << s) - 1)) >>> 0);
    this.ssPerm = perm;
    if (role !== ROLE_DATA && (perm & SS_R) === 0) return role === ROLE_ROOT ? FAULT.S2_NO_READ_S1_ROOT : FAULT.S2_NO_READ_S1_TABLE;
    return 0;
  }

  /** A paging domain: the IOVA goes through its second stage only. */
  walkSecondStage(domain: VtdPagingDomain, lo: number, hi: number, write: boolean): number {
    this.refs = 0;
    const table = domain.table;
    const code = this.ssTranslate(table.words, table.levels, -1, lo, hi, ROLE_DATA);
    if (code !== 0) return code;
    const perm = this.ssPerm;
    if (write ? (perm & SS_W) === 0 : (perm & SS_R) === 0) return write ? FAULT.NO_WRITE : FAULT.NO_READ;
    this.hpa = this.ssHpa;
    this.shift = this.ssShift;
    this.perm = (perm & SS_R ? PERM_R : 0) | (perm & SS_W ? PERM_W | PERM_D : 0);
    return 0;
  }

  /** The nested walk; every request is a user-privilege request without execute. */
  walkNested(domain: VtdNestedDomain, tag: number, lo: number, hi: number, write: boolean): number {
    this.refs = 0;
    const fsLevels = domain.fsLevels;
    // Canonical input (vtd.md §1.2), checked before any memory reference.
    const top = fsLevels === 4 ? hi >>> 15 : hi >>> 24;
    if (top !== 0 && top !== (fsLevels === 4 ? 0x1ffff : 0xff)) return FAULT.NON_CANONICAL;

    const parent = domain.parent;
    const table = parent.table;
    // Loaded once per walk: the pool is only replaced when map() grows it.
    const words = table.words;
    const ssLevels = table.levels;
    const caches = this.caches;
    const memory = this.memory;
    const psc = caches.fsPsc;
    let ssTag = -1;
    if (caches.ssCache !== null) {
      if (parent.ssTag < 0) parent.ssTag = caches.allocTag();
      ssTag = parent.ssTag;
    }
    const hawHi = ssLevels === 5 ? 0 : 0x000f0000; // GPA bits 51:48 are reserved with a 48-bit stage 2
    const adBits = FS_A | (domain.eafe ? FS_EA : 0);

    let level = fsLevels;
    let tLo = domain.rootLo;
    let tHi = domain.rootHi;
    let rw = FS_RW;
    let us = FS_US;
    let tableHpa = -1;
    let ssWritable = false;
    if (psc !== null) {
      // The deepest cached level first: a PDE hit leaves one read.
      const mask = psc.classMask(tag);
      for (let c = 0; c < fsLevels - 1 && mask >> c !== 0; c++) {
        if (((mask >> c) & 1) === 0) continue;
        const e = psc.lookup(tag, c, lo, hi);
        if (e >= 0) {
          level = c + 1;
          tableHpa = psc.addr[e];
          const p = psc.perm[e];
          rw = p & PSC_RW ? FS_RW : 0;
          us = p & PSC_US ? FS_US : 0;
          ssWritable = (p & PSC_SSW) !== 0;
          break;
        }
      }
    }

    let page: Uint32Array;
    let w: number;
    let eLo: number;
    let eHi: number;
    for (;;) {
      if (tableHpa < 0) {
        const code = this.ssTranslate(words, ssLevels, ssTag, tLo, tHi, level === fsLevels ? ROLE_ROOT : ROLE_TABLE);
        if (code !== 0) return code;
        tableHpa = this.ssHpa;
        ssWritable = (this.ssPerm & SS_W) !== 0;
        if (psc !== null && level < fsLevels) {
          psc.insert(tag, level - 1, lo, hi, tableHpa, (rw ? PSC_RW : 0) | (us ? PSC_US : 0) | (ssWritable ? PSC_SSW : 0));
        }
      }
      page = memory.page(tableHpa / 4096);
      w = ptIndex(lo, hi, level) << 1;
      eLo = page[w];
      eHi = page[w + 1];
      this.refs++;
      if ((eLo & FS_P) === 0) return FAULT.S1_NOT_PRESENT;
      const leaf = level === 1 || ((eLo & FS_PS) !== 0 && level <= 3);
      if (fsReserved(eLo, eHi, level, leaf, hawHi)) return FAULT.S1_RESERVED;
      rw &= eLo;
      us &= eLo;
      if (leaf) break;
      // Accessed (and extended-accessed) on every entry the walk uses; the
      // update is a write to the table page, which needs stage-2 write.
      if ((eLo & adBits) !== adBits) {
        if (!ssWritable) return FAULT.S2_NO_WRITE_S1_AD;
        page[w] = eLo | adBits;
      }
      tLo = (eLo & 0xfffff000) >>> 0;
      tHi = eHi & 0xfffff;
      tableHpa = -1;
      level--;
    }

    if (us === 0) return FAULT.USER_TO_SUPERVISOR;
    if (write && rw === 0) return FAULT.NO_WRITE;
    const leafBits = adBits | (write ? FS_D : 0);
    if ((eLo & leafBits) !== leafBits) {
      if (!ssWritable) return FAULT.S2_NO_WRITE_S1_AD;
      eLo |= leafBits;
      page[w] = eLo;
    }

    // The output GPA: the leaf's frame plus the input bits below the leaf size.
    const s = 3 + 9 * level;
    const low = (1 << s) - 1;
    const oLo = ((eLo & ~low & 0xfffff000) | (lo & low)) >>> 0;
    const oHi = eHi & 0xfffff;
    const code = this.ssTranslate(words, ssLevels, ssTag, oLo, oHi, ROLE_DATA);
    if (code !== 0) return code;
    const ssPerm = this.ssPerm;
    if (write ? (ssPerm & SS_W) === 0 : (ssPerm & SS_R) === 0) return write ? FAULT.NO_WRITE : FAULT.NO_READ;
    this.hpa = this.ssHpa;
    this.shift = s < this.ssShift ? s : this.ssShift;
    this.perm = (ssPerm & SS_R ? PERM_R : 0) | (rw !== 0 && ssPerm & SS_W ? PERM_W : 0) | (eLo & FS_D ? PERM_D : 0);
    return 0;
  }
}

/**
 * First-stage reserved bits (QEMU's VTD_FS_* masks, vtd.md §1.1), checked only
 * on present entries: GPA bits above the stage-2 width, PS in a PML4E/PML5E,
 * and the address bits a 2 MiB or 1 GiB leaf does not use.
 */
function fsReserved(lo: number, hi: number, level: number, leaf: boolean, hawHi: number): boolean {
  if ((hi & hawHi) !== 0) return true;
  if (level >= 4) return (lo & FS_PS) !== 0;
  if (!leaf || level === 1) return false;
  return (lo & (level === 2 ? 0x1fe000 : 0x3fffe000)) !== 0;
}

/** Second-stage reserved bits above the address (QEMU's masks): TM (bit 62). */
const SS_HI_RESERVED = 0x40000000;

/**
 * Second-stage reserved bits in a leaf's low word (QEMU's masks): the address
 * bits a 2 MiB or 1 GiB leaf does not use. (PS itself is reserved above level
 * 3; a 4 KiB leaf has none in the low word.)
 */
const SS_L2_LEAF_RESERVED = 0x1ff000;
const SS_L3_LEAF_RESERVED = 0x3ffff000;
