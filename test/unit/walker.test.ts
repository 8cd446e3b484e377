import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { VtdNestedDomain, VtdPagingDomain } from "../../server/core/drivers/vtd/domains.js";
import { type SecondStageTable, SS_PS } from "../../server/core/drivers/vtd/second-stage.js";
import { VtdCaches } from "../../server/core/drivers/vtd/vtd-caches.js";
import { VtdWalker } from "../../server/core/drivers/vtd/walker.js";
import { GuestMemory } from "../../server/core/guest-memory.js";
import { DmaBatch } from "../../server/core/translate/dma-batch.js";
import { TranslationCache } from "../../server/core/translate/translation-cache.js";

/**
 * What the API cannot reach, tested against the walker and its caches
 * directly:
 * - 0x77 (stage-2 write needed for a first-stage A/D update, vtd.md §2.1,
 *   §2.3): VT-d nest parents refuse read-only maps (ERRATA_772415_SPR17), so
 *   the table pages are mapped read-only straight into the SecondStageTable;
 * - 0x7A (stage-2 reserved bit, vtd.md §2.1, §3): a corrupted stage-2 entry;
 * - TranslationCache range invalidation (both of its strategies) and its
 *   CLOCK replacement.
 */

const K4 = 0x1000;
const FS_P = 1n;
const FS_RW = 2n;
const FS_US = 4n;
const FS_A = 1n << 5n;
const FS_D = 1n << 6n;
const FS_EA = 1n << 10n;
const ALL = FS_P | FS_RW | FS_US;

/** 64 MiB of guest RAM; first-stage tables at 1 MiB (root, PDPT, PD, PT), data at 8 MiB. */
const TABLES = 0x100000;
const DATA = 0x800000;

interface Rig {
  memory: GuestMemory;
  caches: VtdCaches;
  walker: VtdWalker;
  parent: VtdPagingDomain;
  nested: VtdNestedDomain;
}

/**
 * A nested domain whose 4-level first stage maps IOVA 0x1000 -> DATA through
 * tables at TABLES + {0, 1, 2, 3} pages; `bits(level)` adds bits per entry.
 * Stage 2 is the identity, with `tableWrite` choosing W for the table pages.
 */
function rig(opts: { tableWrite?: (page: number) => boolean; bits?: (level: number) => bigint; eafe?: boolean; iotlb?: number } = {}): Rig {
  const memory = new GuestMemory(64 << 20);
  const caches = new VtdCaches(opts.iotlb ?? 64, false);
  const parent = new VtdPagingDomain(caches, 48, false, true);
  for (let page = 0; page < 4; page++) {
    // Straight into the table: the domain's map() would refuse read-only (errata).
    parent.table.map((TABLES >> 12) + page, (TABLES >> 12) + page, 1, true, opts.tableWrite?.(page) ?? true, false);
  }
  parent.table.map(DATA >> 12, DATA >> 12, 16, true, true, false);
  const bits = opts.bits ?? (() => 0n);
  const iova = 0x1000;
  for (let level = 4; level >= 1; level--) {
    const table = TABLES + (4 - level) * K4;
    const next = level === 1 ? DATA : table + K4;
    writeEntry(memory, table + indexAt(iova, level) * 8, BigInt(next) | ALL | bits(level));
  }
  const nested = new VtdNestedDomain(parent, { flags: opts.eafe ? 2n : 0n, pgtblAddr: BigInt(TABLES), addrWidth: 48 }, caches);
  return { memory, caches, walker: new VtdWalker(memory, caches), parent, nested };
}

function writeEntry(memory: GuestMemory, gpa: number, value: bigint): void {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, value, true);
  memory.write(gpa, b);
}

function readEntry(memory: GuestMemory, gpa: number): bigint {
  return new DataView(memory.read(gpa, 8).buffer).getBigUint64(0, true);
}

/** The first-stage entry for IOVA 0x1000 at `level` (as rig() lays it out). */
const entryAt = (level: number) => TABLES + (4 - level) * K4 + indexAt(0x1000, level) * 8;

/** The 9-bit table index of an address at paging level L (arithmetic, not 32-bit shifts). */
function indexAt(address: number, level: number): number {
  return Math.floor(address / 2 ** (12 + 9 * (level - 1))) % 512;
}

function run(r: Rig, domain: VtdNestedDomain | VtdPagingDomain, iovas: bigint[], write = false) {
  const batch = DmaBatch.fromIovas(iovas, write);
  r.walker.translate(domain, 0, batch, 0, batch.count);
  return { fault: [...batch.fault], addr: [...batch.addr], refs: [...batch.refs], hits: batch.hits, misses: batch.misses };
}

describe("0x77 S2_NO_WRITE_S1_AD: an A/D update needs stage-2 write on the table page (vtd.md §2.1, §2.3)", () => {
  it("a walk that must set A in an entry of a read-only table page faults 0x77 (here the root, after 4 + 1 reads)", () => {
    const r = rig({ tableWrite: () => false });
    const out = run(r, r.nested, [0x1000n]);
    expect(out.fault).toEqual([0x77]);
    expect(out.addr).toEqual([0]);
    expect(out.refs).toEqual([5]);
    expect(readEntry(r.memory, entryAt(4)) & FS_A).toBe(0n);
  });

  it("with A (and D for a write) already set nothing is written, so read-only table pages translate", () => {
    const r = rig({ tableWrite: () => false, bits: () => FS_A | FS_D });
    expect(run(r, r.nested, [0x1234n])).toMatchObject({ fault: [0], addr: [DATA + 0x234], refs: [24] });
    expect(run(r, r.nested, [0x1238n], true)).toMatchObject({ fault: [0], addr: [DATA + 0x238] });
  });

  it("a write needs D on the leaf: with only A preset, reads translate and the first write faults 0x77", () => {
    const r = rig({ tableWrite: () => false, bits: () => FS_A });
    expect(run(r, r.nested, [0x1000n]).fault).toEqual([0]);
    const w = run(r, r.nested, [0x1000n], true);
    expect(w.fault).toEqual([0x77]);
    expect(w.hits).toBe(0); // the clean cached entry does not serve the write
    expect(readEntry(r.memory, entryAt(1)) & FS_D).toBe(0n);
  });

  it("only the leaf's table page read-only: the upper entries get A, the leaf's update faults 0x77", () => {
    const r = rig({ tableWrite: (page) => page !== 3 });
    const out = run(r, r.nested, [0x1000n]);
    expect(out.fault).toEqual([0x77]);
    for (const level of [4, 3, 2]) expect(readEntry(r.memory, entryAt(level)) & FS_A).toBe(FS_A);
    expect(readEntry(r.memory, entryAt(1)) & FS_A).toBe(0n);
  });

  it("with EAFE an entry with A but without EA still needs an update: 0x77 on a read-only table page", () => {
    const r = rig({ tableWrite: () => false, bits: () => FS_A | FS_D, eafe: true });
    expect(run(r, r.nested, [0x1000n]).fault).toEqual([0x77]);
    const ok = rig({ tableWrite: () => false, bits: () => FS_A | FS_D | FS_EA, eafe: true });
    expect(run(ok, ok.nested, [0x1000n]).fault).toEqual([0]);
  });
});

/** Word index (low half) of the stage-2 entry at `level` on gpa's path. */
function ssEntryWord(table: SecondStageTable, gpa: number, level: number): number {
  let t = 0;
  for (let l = table.levels; ; l--) {
    const w = (t << 10) + 2 * indexAt(gpa, l);
    if (l === level) return w;
    t = table.words[w] >>> 12;
  }
}

describe("0x7A S2_RESERVED: a corrupted stage-2 entry (vtd.md §2.1 reserved masks, §3)", () => {
  it("TM (bit 62) in the stage-2 leaf of the data page: nested walk and stage-2-only walk fault 0x7A", () => {
    const r = rig();
    r.parent.table.words[ssEntryWord(r.parent.table, DATA, 1) + 1] |= 0x40000000;
    expect(run(r, r.nested, [0x1000n]).fault).toEqual([0x7a]);
    expect(run(r, r.parent, [BigInt(DATA)]).fault).toEqual([0x7a]);
    // The neighbouring page's leaf is intact.
    expect(run(r, r.parent, [BigInt(DATA + K4)])).toMatchObject({ fault: [0], addr: [DATA + K4], refs: [4] });
  });

  it("PS in a level-4 stage-2 entry (reserved there) faults 0x7A already in the stage-2 walk of the root", () => {
    const r = rig();
    r.parent.table.words[ssEntryWord(r.parent.table, TABLES, 4)] |= SS_PS;
    const out = run(r, r.nested, [0x1000n]);
    expect(out.fault).toEqual([0x7a]);
    expect(out.refs).toEqual([1]);
  });

  it("address bits 20:12 of a 2 MiB stage-2 leaf are reserved", () => {
    const r = rig();
    r.parent.table.map(0x4000_0000 >> 12, 0x20_0000 >> 12, 512, true, true, true); // one 2 MiB leaf
    expect(run(r, r.parent, [0x4000_0123n])).toMatchObject({ fault: [0], addr: [0x20_0123], refs: [3] });
    r.parent.table.words[ssEntryWord(r.parent.table, 0x4000_0000, 2)] |= 1 << 12;
    r.caches.flushStage2(r.parent, 0, 2 ** 36); // the host's flush after changing its table
    expect(run(r, r.parent, [0x4000_0123n]).fault).toEqual([0x7a]);
  });

  it("a not-present stage-2 entry (R = W = 0) is 0x79 whatever else it holds", () => {
    const r = rig();
    const w = ssEntryWord(r.parent.table, DATA, 1);
    r.parent.table.words[w] &= ~3;
    r.parent.table.words[w + 1] |= 0x40000000;
    expect(run(r, r.nested, [0x1000n]).fault).toEqual([0x79]);
  });
});

// ---------------------------------------------------------------------------
// TranslationCache

const SHIFTS = [12, 21, 30];

/** Inserts (tag, class, page) with the page number given at that class's size. */
function put(cache: TranslationCache, tag: number, c: number, page: number, addr = page): void {
  const first = page * 2 ** (SHIFTS[c] - 12); // 4 KiB page number of its first byte
  cache.insert(tag, c, (first % 2 ** 20) * K4, Math.floor(first / 2 ** 20), addr, 1);
}

function has(cache: TranslationCache, tag: number, c: number, page: number): boolean {
  const first = page * 2 ** (SHIFTS[c] - 12);
  return cache.lookup(tag, c, (first % 2 ** 20) * K4, Math.floor(first / 2 ** 20)) >= 0;
}

type Key = { tag: number; c: number; page: number };
const keyStr = (k: Key) => `${k.tag}/${k.c}/${k.page}`;

describe("TranslationCache range invalidation (vtd.md §4.2: drop the entries overlapping the range)", () => {
  it("probing the named pages (few pages, many entries): exactly the overlapping entries of the tag go", () => {
    const cache = new TranslationCache(4096, SHIFTS);
    for (let p = 0; p < 1024; p++) put(cache, 1, 0, p);
    put(cache, 1, 1, 3); // 2 MiB page 3 = 4 KiB pages 1536..2047
    put(cache, 2, 0, 100); // another tag
    expect(cache.flushTagRange(1, 100, 3)).toBe(3);
    expect([99, 100, 101, 102, 103].map((p) => has(cache, 1, 0, p))).toEqual([true, false, false, false, true]);
    expect(has(cache, 2, 0, 100)).toBe(true);
    expect(cache.flushTagRange(1, 1600, 1)).toBe(1); // inside the 2 MiB entry
    expect(has(cache, 1, 1, 3)).toBe(false);
    expect(cache.size).toBe(1024 - 3 + 1);
  });

  it("walking the tag's list (a large range, few entries): a large entry that starts before the range still goes", () => {
    const cache = new TranslationCache(64, SHIFTS);
    put(cache, 0, 2, 1); // 1 GiB page 1 = 4 KiB pages 262144..524287
    put(cache, 0, 1, 600); // 2 MiB page 600 = pages 307200..307711
    put(cache, 0, 0, 262143); // just below the 1 GiB page
    put(cache, 0, 0, 524288); // just above
    expect(cache.flushTagRange(0, 300000, 100000)).toBe(2);
    expect(has(cache, 0, 2, 1)).toBe(false);
    expect(has(cache, 0, 1, 600)).toBe(false);
    expect(has(cache, 0, 0, 262143)).toBe(true);
    expect(has(cache, 0, 0, 524288)).toBe(true);
  });

  it("both strategies agree with a plain model, for page numbers below and above 2^32 (property)", () => {
    const keyArb = fc.record({ tag: fc.nat(2), c: fc.nat(2), page: fc.nat(40) });
    const rangeArb = fc.record({ tag: fc.nat(2), first: fc.nat(512 * 45), pages: fc.constantFrom(1, 2, 3, 17, 511, 512, 513, 4096, 300000) });
    fc.assert(
      fc.property(fc.constantFrom(0, 2 ** 33, 2 ** 52 - 2 ** 30), fc.array(keyArb, { maxLength: 80 }), fc.array(rangeArb, { minLength: 1, maxLength: 6 }), (base, keys, ranges) => {
        const cache = new TranslationCache(1024, SHIFTS);
        const model = new Map<string, Key>();
        // Pages near `base` (a 4 KiB page number), spread over the classes.
        const at = (k: Key) => Math.floor(base / 2 ** (SHIFTS[k.c] - 12)) + k.page;
        for (const k of keys) {
          put(cache, k.tag, k.c, at(k));
          model.set(keyStr({ ...k, page: at(k) }), { ...k, page: at(k) });
        }
        for (const r of ranges) {
          const first = base + r.first;
          const last = first + r.pages - 1;
          let expected = 0;
          for (const [s, k] of model) {
            const scale = 2 ** (SHIFTS[k.c] - 12);
            if (k.tag === r.tag && k.page * scale <= last && (k.page + 1) * scale - 1 >= first) {
              model.delete(s);
              expected++;
            }
          }
          expect(cache.flushTagRange(r.tag, first, r.pages)).toBe(expected);
          expect(cache.size).toBe(model.size);
          for (const k of model.values()) expect(has(cache, k.tag, k.c, k.page), keyStr(k)).toBe(true);
        }
      }),
      { numRuns: 300 },
    );
  });

  it("flushTag drops every entry of one tag and no other; stale entries never come back, even after 4096 flushes", () => {
    const cache = new TranslationCache(16, SHIFTS);
    put(cache, 3, 0, 7);
    put(cache, 4, 0, 7);
    expect(cache.flushTag(3)).toBe(1);
    expect(has(cache, 3, 0, 7)).toBe(false);
    expect(has(cache, 4, 0, 7)).toBe(true);
    for (let i = 0; i < 4096; i++) cache.flushTag(3);
    expect(has(cache, 3, 0, 7)).toBe(false);
    expect(cache.size).toBe(1);
    expect([...cache.entriesOf(3)]).toEqual([]);
  });
});

describe("TranslationCache replacement: CLOCK, not flush-all (vtd.md §6 lesson: bound the caches better than flush-all)", () => {
  it("when full, the first unreferenced entry from the hand is replaced; a referenced one gets a second chance", () => {
    const cache = new TranslationCache(4, SHIFTS);
    for (const p of [10, 11, 12, 13]) put(cache, 0, 0, p); // slots 0..3
    expect(has(cache, 0, 0, 10)).toBe(true); // referenced
    put(cache, 0, 0, 14); // hand at 10: spared (bit cleared); 11 replaced
    expect([10, 11, 12, 13, 14].map((p) => has(cache, 0, 0, p))).toEqual([true, false, true, true, true]);
    expect(cache.size).toBe(4);
  });

  it("an entry referenced between every insertion is never replaced, however many insertions", () => {
    const cache = new TranslationCache(8, SHIFTS);
    put(cache, 0, 0, 0);
    for (let p = 1; p < 200; p++) {
      put(cache, 0, 0, p);
      expect(has(cache, 0, 0, 0), `after inserting ${p}`).toBe(true);
      expect(cache.size).toBe(Math.min(p + 1, 8));
    }
  });

  it("slots of flushed (stale) entries are reused before any live entry is replaced", () => {
    const cache = new TranslationCache(4, SHIFTS);
    put(cache, 0, 0, 1);
    put(cache, 0, 0, 2);
    put(cache, 1, 0, 1);
    put(cache, 1, 0, 2);
    cache.flushTag(1);
    put(cache, 0, 0, 3);
    put(cache, 0, 0, 4);
    expect([1, 2, 3, 4].map((p) => has(cache, 0, 0, p))).toEqual([true, true, true, true]);
    expect(cache.size).toBe(4);
  });

  it("re-inserting a cached key updates it in place; capacity 0 caches nothing", () => {
    const cache = new TranslationCache(2, SHIFTS);
    put(cache, 0, 0, 5, 0x1000);
    put(cache, 0, 0, 5, 0x2000);
    expect(cache.size).toBe(1);
    expect(cache.addr[cache.lookup(0, 0, 5 * K4, 0)]).toBe(0x2000);
    const none = new TranslationCache(0, SHIFTS);
    put(none, 0, 0, 5);
    expect(none.size).toBe(0);
    expect(has(none, 0, 0, 5)).toBe(false);
  });
});
