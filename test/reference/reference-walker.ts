/**
 * A slow, deliberately plain reference model of the emulated VT-d's DMA
 * translation, written from the spec (vtd.md §1–§3, api.md "Guest memory and
 * DMA" and "Fine points"), not from server/core/drivers/vtd/walker.ts.
 *
 * Everything is BigInt. Guest RAM is a Map of 4 KiB pages of bytes; the
 * stage-2 map is the list of IOAS areas (iova -> user_va), and the stage-2
 * page size at an address is derived from the area alone (api.md Fine
 * points), not from a page-table structure. The model has no caches: it
 * answers what a walk of the current tables yields.
 *
 * Choices the spec leaves open, taken as the server documents them:
 * - Order of checks per first-stage level: P (0x71), then reserved bits
 *   (0x72) — "a reserved-bit fault before a permission fault" (vtd.md §1.1).
 *   U/S (0x81) and R/W (0x85) are cumulative over the levels (§1.1) and are
 *   judged once the leaf is reached; a not-present or reserved entry lower in
 *   the walk wins over a U/S or R/W = 0 higher up.
 * - A stage-2 miss while fetching the stage-1 root is 0x73 ("error accessing
 *   the FL-PML4", §2.3); below the root it is 0x79.
 * - Accessed (A, and EA with EAFE) is set on every entry the walk uses, the
 *   leaf's A/D only once its permission checks passed; an update is needed
 *   only when a bit is missing, and then needs stage-2 write on the table
 *   page (0x77, §2.1/§2.3).
 */

/** VT-d fault reason codes (vtd.md §3) and their api.md reason_name. */
export const FAULT = {
  BLOCKED: 0x59,
  S1_NOT_PRESENT: 0x71,
  S1_RESERVED: 0x72,
  S2_ACCESS_S1_ROOT: 0x73,
  S1_TABLE_BEYOND_S2: 0x74,
  S2_NO_READ_S1_ROOT: 0x75,
  S2_NO_READ_S1_TABLE: 0x76,
  S2_NO_WRITE_S1_AD: 0x77,
  S2_NOT_PRESENT: 0x79,
  S2_RESERVED: 0x7a,
  NON_CANONICAL: 0x80,
  USER_TO_SUPERVISOR: 0x81,
  BEYOND_MAX_ADDRESS: 0x83,
  NO_WRITE: 0x85,
  NO_READ: 0x86,
} as const;

export const FAULT_NAME: ReadonlyMap<number, string> = new Map(Object.entries(FAULT).map(([name, code]) => [code, name]));

// First-stage entry bits (vtd.md §1.1).
export const P = 1n << 0n;
export const RW = 1n << 1n;
export const US = 1n << 2n;
export const A = 1n << 5n;
export const D = 1n << 6n;
export const PS = 1n << 7n;
export const EA = 1n << 10n;
/** Bits 51:12: the address field of any entry. */
export const ADDR_51_12 = ((1n << 52n) - 1n) & ~0xfffn;

const SIZE_4K = 1n << 12n;
const SIZE_2M = 1n << 21n;
const SIZE_1G = 1n << 30n;

// ---------------------------------------------------------------------------
// Guest RAM

/** Byte-addressable RAM that reads as zero until written (api.md: "sparse"). */
export class RefRam {
  private readonly pages = new Map<bigint, Uint8Array>();

  constructor(readonly size: bigint) {}

  private page(pfn: bigint, create: boolean): Uint8Array | undefined {
    let p = this.pages.get(pfn);
    if (p === undefined && create) {
      p = new Uint8Array(4096);
      this.pages.set(pfn, p);
    }
    return p;
  }

  write(addr: bigint, data: Uint8Array): void {
    if (addr < 0n || addr + BigInt(data.length) > this.size) throw new RangeError("write outside RAM");
    for (let i = 0; i < data.length; i++) {
      const a = addr + BigInt(i);
      this.page(a >> 12n, true)![Number(a & 0xfffn)] = data[i];
    }
  }

  read(addr: bigint, length: number): Uint8Array {
    if (addr < 0n || addr + BigInt(length) > this.size) throw new RangeError("read outside RAM");
    const out = new Uint8Array(length);
    for (let i = 0; i < length; i++) {
      const a = addr + BigInt(i);
      out[i] = this.page(a >> 12n, false)?.[Number(a & 0xfffn)] ?? 0;
    }
    return out;
  }

  /** The bytes of the 4 KiB page holding addr, or undefined if never written (reads as zero). */
  pageBytes(addr: bigint): Uint8Array | undefined {
    return this.pages.get(addr >> 12n);
  }

  /** A little-endian 64-bit entry. */
  read64(addr: bigint): bigint {
    const b = this.read(addr, 8);
    let v = 0n;
    for (let i = 7; i >= 0; i--) v = (v << 8n) | BigInt(b[i]);
    return v;
  }

  write64(addr: bigint, value: bigint): void {
    const b = new Uint8Array(8);
    for (let i = 0; i < 8; i++) b[i] = Number((value >> BigInt(8 * i)) & 0xffn);
    this.write(addr, b);
  }
}

// ---------------------------------------------------------------------------
// Stage 2: the IOAS areas as the VMM mapped them

export interface RefArea {
  readonly iova: bigint;
  readonly userVa: bigint;
  readonly length: bigint;
  readonly readable: boolean;
  readonly writeable: boolean;
  /** HUGE_PAGES when the area was mapped into the stage-2 table. */
  readonly hugePages: boolean;
}

export interface Stage2Hit {
  /** Host address of the GPA. */
  hpa: bigint;
  /** The stage-2 leaf size covering it. */
  pageSize: bigint;
  /** Levels of the stage-2 walk that ends at that leaf. */
  entriesRead: number;
  readable: boolean;
  writeable: boolean;
}

export class RefStage2 {
  readonly areas: RefArea[] = [];

  /** levels: 4 (48-bit input) or 5 (57-bit). */
  constructor(readonly levels: 4 | 5) {}

  /** Input addresses must be below 2^width (vtd.md §2.1: MGAW/AGAW). */
  get width(): bigint {
    return this.levels === 5 ? 57n : 48n;
  }

  overlaps(iova: bigint, length: bigint): boolean {
    return this.areas.some((a) => iova < a.iova + a.length && a.iova < iova + length);
  }

  add(area: RefArea): void {
    if (this.overlaps(area.iova, area.length)) throw new Error("areas overlap");
    this.areas.push(area);
  }

  /**
   * IOMMU_IOAS_UNMAP (iommufd-semantics.md §3.7): (0, U64_MAX) unmaps
   * everything, even nothing; otherwise every area intersecting the range
   * must lie inside it. Returns the bytes unmapped, or undefined for ENOENT
   * (nothing there, or an area only partly covered).
   */
  unmap(iova: bigint, length: bigint): bigint | undefined {
    if (iova === 0n && length === (1n << 64n) - 1n) {
      // Everything; succeeds even when nothing is mapped.
      const bytes = this.areas.reduce((n, a) => n + a.length, 0n);
      this.areas.length = 0;
      return bytes;
    }
    const last = iova + length - 1n;
    const hit = this.areas.filter((a) => a.iova <= last && iova <= a.iova + a.length - 1n);
    if (hit.length === 0 || hit.some((a) => a.iova < iova || a.iova + a.length - 1n > last)) return undefined;
    let bytes = 0n;
    for (const a of hit) {
      this.areas.splice(this.areas.indexOf(a), 1);
      bytes += a.length;
    }
    return bytes;
  }

  /**
   * The stage-2 leaf covering gpa, or undefined when nothing maps it. The
   * leaf is the largest of 1 GiB / 2 MiB (with HUGE_PAGES) / 4 KiB whose
   * aligned block around gpa lies inside the area and to which iova and
   * user_va are equally aligned (api.md: "at each IOVA the largest size to
   * which both iova and user_va are aligned and which the rest of the area
   * covers").
   */
  lookup(gpa: bigint): Stage2Hit | undefined {
    const area = this.areas.find((a) => a.iova <= gpa && gpa < a.iova + a.length);
    if (area === undefined) return undefined;
    const hpa = area.userVa + (gpa - area.iova);
    let pageSize = SIZE_4K;
    if (area.hugePages) {
      for (const size of [SIZE_1G, SIZE_2M]) {
        const block = gpa - (gpa % size);
        const sameAlignment = area.iova % size === area.userVa % size;
        if (sameAlignment && block >= area.iova && block + size <= area.iova + area.length) {
          pageSize = size;
          break;
        }
      }
    }
    const leafLevel = pageSize === SIZE_4K ? 1 : pageSize === SIZE_2M ? 2 : 3;
    return { hpa, pageSize, entriesRead: this.levels - leafLevel + 1, readable: area.readable, writeable: area.writeable };
  }
}

// ---------------------------------------------------------------------------
// Translation outcomes

/** An A/D update of one stage-1 entry: the bits ORed into the 64-bit word at hpa. */
export interface AdUpdate {
  readonly hpa: bigint;
  readonly bits: bigint;
}

export interface Outcome {
  /** 0 when translated, else the fault reason. */
  fault: number;
  /** Host address (0 on a fault). */
  address: bigint;
  /** The GPA the first stage produced (nested walks that got that far), else undefined. */
  gpa?: bigint;
  /** Effective page size of the combined translation (0 on a fault). */
  pageSize: bigint;
  /** Combined rights: stage-2 R; stage-1 R/W and stage-2 W. */
  readable: boolean;
  writeable: boolean;
  /**
   * Entries read. A walk that meets a non-present stage-2 entry reads
   * between 1 and m entries of that stage-2 walk, depending on which
   * intermediate stage-2 tables exist, so the count is a range.
   */
  refsMin: number;
  refsMax: number;
  /** A/D updates the walk makes (when it translated: all of them must be visible in RAM). */
  updates: AdUpdate[];
  /** Stage-1 entries the walk read (a faulting walk may have set A/EA, or D on a leaf, in them). */
  read: bigint[];
}

function faulted(fault: number, refsMin: number, refsMax: number, updates: AdUpdate[], read: bigint[]): Outcome {
  return { fault, address: 0n, pageSize: 0n, readable: false, writeable: false, refsMin, refsMax, updates, read };
}

/** Stage-2-only translation (a paging HWPT): api.md "Stage-2-only VT-d faults". */
export function translateStage2(s2: RefStage2, iova: bigint, write: boolean): Outcome {
  if (iova >> s2.width !== 0n) return faulted(FAULT.BEYOND_MAX_ADDRESS, 0, 0, [], []);
  const hit = s2.lookup(iova);
  if (hit === undefined) return faulted(FAULT.S2_NOT_PRESENT, 1, s2.levels, [], []);
  const n = hit.entriesRead;
  if (write && !hit.writeable) return faulted(FAULT.NO_WRITE, n, n, [], []);
  if (!write && !hit.readable) return faulted(FAULT.NO_READ, n, n, [], []);
  return { fault: 0, address: hit.hpa, pageSize: hit.pageSize, readable: hit.readable, writeable: hit.writeable, refsMin: n, refsMax: n, updates: [], read: [] };
}

export interface Stage1Config {
  /** 4 (addr_width 48) or 5 (addr_width 57). */
  readonly levels: 4 | 5;
  /** pgtbl_addr: the GPA of the root table (FSPTPTR). */
  readonly root: bigint;
  /** EAFE: EA is set together with A. */
  readonly eafe: boolean;
}

/** Index of iova's entry in the level-L table (9 bits per level above bit 12). */
function indexAt(iova: bigint, level: number): bigint {
  return (iova >> BigInt(12 + 9 * (level - 1))) & 511n;
}

/** The size a leaf at level L maps. */
function leafSize(level: number): bigint {
  return 1n << BigInt(12 + 9 * (level - 1));
}

/**
 * The nested translation (PGTT = 011b, vtd.md §2.2) of a user-privilege
 * request without execute (api.md: requests are untranslated user requests)
 * for iova: the first-stage tables are read from `ram` at the host addresses
 * `s2` gives their GPAs.
 */
export function translateNested(ram: RefRam, s2: RefStage2, s1: Stage1Config, iova: bigint, write: boolean): Outcome {
  iova = BigInt.asUintN(64, iova);
  const m = s2.levels;
  let refsMin = 0;
  let refsMax = 0;
  const updates: AdUpdate[] = [];
  const read: bigint[] = [];
  const fail = (fault: number) => faulted(fault, refsMin, refsMax, updates, read);

  // §1.2: the input must be canonical: bits 63:(w-1) all equal; no memory reference.
  const w = s1.levels === 5 ? 57n : 48n;
  const top = iova >> (w - 1n);
  if (top !== 0n && top !== (1n << (65n - w)) - 1n) return fail(FAULT.NON_CANONICAL);

  // §1.1: address bits 51:HAW are reserved, HAW being the stage-2 width.
  const reservedAddress = s2.width >= 52n ? 0n : ((1n << 52n) - 1n) & ~((1n << s2.width) - 1n);
  const accessed = s1.eafe ? A | EA : A;

  let tableGpa = s1.root & ~0xfffn;
  let writable = true; // R/W = 1 at every level so far
  let user = true; // U/S = 1 at every level so far
  for (let level: number = s1.levels; level >= 1; level--) {
    const isRoot = level === s1.levels;
    // §2.3: the table's GPA goes through stage 2 first.
    if (tableGpa >> s2.width !== 0n) return fail(FAULT.S1_TABLE_BEYOND_S2);
    const table = s2.lookup(tableGpa);
    if (table === undefined) {
      refsMin += 1;
      refsMax += m;
      return fail(isRoot ? FAULT.S2_ACCESS_S1_ROOT : FAULT.S2_NOT_PRESENT);
    }
    refsMin += table.entriesRead;
    refsMax += table.entriesRead;
    if (!table.readable) return fail(isRoot ? FAULT.S2_NO_READ_S1_ROOT : FAULT.S2_NO_READ_S1_TABLE);

    const entryHpa = table.hpa + indexAt(iova, level) * 8n;
    const entry = ram.read64(entryHpa);
    refsMin += 1;
    refsMax += 1;
    read.push(entryHpa);

    if ((entry & P) === 0n) return fail(FAULT.S1_NOT_PRESENT);
    const ps = (entry & PS) !== 0n;
    if (level >= 4 && ps) return fail(FAULT.S1_RESERVED); // PS reserved in PML4E/PML5E
    const leaf = level === 1 || ps;
    if ((entry & reservedAddress) !== 0n) return fail(FAULT.S1_RESERVED);
    if (leaf && level === 2 && (entry & 0x1fe000n) !== 0n) return fail(FAULT.S1_RESERVED); // 2 MiB: bits 20:13
    if (leaf && level === 3 && (entry & 0x3fffe000n) !== 0n) return fail(FAULT.S1_RESERVED); // 1 GiB: bits 29:13

    writable &&= (entry & RW) !== 0n;
    user &&= (entry & US) !== 0n;

    if (!leaf) {
      if ((entry & accessed) !== accessed) {
        if (!table.writeable) return fail(FAULT.S2_NO_WRITE_S1_AD);
        updates.push({ hpa: entryHpa, bits: accessed });
      }
      tableGpa = entry & ADDR_51_12;
      continue;
    }

    // The leaf: permissions accumulated over every level (§1.1, §1.3).
    if (!user) return fail(FAULT.USER_TO_SUPERVISOR);
    if (write && !writable) return fail(FAULT.NO_WRITE);
    const leafBits = write ? accessed | D : accessed;
    if ((entry & leafBits) !== leafBits) {
      if (!table.writeable) return fail(FAULT.S2_NO_WRITE_S1_AD);
      updates.push({ hpa: entryHpa, bits: leafBits });
    }

    // The output GPA: the leaf's frame plus the input bits below the leaf size.
    const size = leafSize(level);
    const outGpa = (entry & ADDR_51_12 & ~(size - 1n)) | (iova & (size - 1n));
    if (outGpa >> s2.width !== 0n) return fail(FAULT.BEYOND_MAX_ADDRESS);
    const data = s2.lookup(outGpa);
    if (data === undefined) {
      refsMin += 1;
      refsMax += m;
      return fail(FAULT.S2_NOT_PRESENT);
    }
    refsMin += data.entriesRead;
    refsMax += data.entriesRead;
    if (write && !data.writeable) return fail(FAULT.NO_WRITE);
    if (!write && !data.readable) return fail(FAULT.NO_READ);
    return {
      fault: 0,
      address: data.hpa,
      gpa: outGpa,
      pageSize: size < data.pageSize ? size : data.pageSize,
      readable: data.readable,
      writeable: writable && data.writeable,
      refsMin,
      refsMax,
      updates,
      read,
    };
  }
  throw new Error("unreachable: level 1 is always a leaf");
}
