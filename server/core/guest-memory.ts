import { fail } from "./errno.js";
import { faultPoint } from "./fail-nth.js";
import { checkQuota, type Limits } from "./limits.js";

export const PAGE_SHIFT = 12;
export const PAGE_SIZE = 1 << PAGE_SHIFT;
/** Largest guest RAM a VM may declare: 1 TiB keeps the page directory small. */
export const GUEST_MEMORY_MAX = 2 ** 40;

const REGION_SHIFT = 9; // 512 pages = one 2 MiB region per directory slot
const REGION_PAGES = 1 << REGION_SHIFT;
const CHUNK_PAGES = 16; // pages carved from one backing allocation
const PAGE_WORDS = PAGE_SIZE / 4;

/** What every untouched page reads as; never written. */
const ZERO_PAGE = new Uint32Array(PAGE_WORDS);

if (new Uint8Array(new Uint32Array([1]).buffer)[0] !== 1) {
  // Page-table entries are read as little-endian u32 halves straight from the
  // backing words; that is only the guest's byte order on a little-endian host.
  throw new Error("iommufd-service requires a little-endian host");
}

/**
 * A VM's guest RAM, the role the VMM's anonymous memory plays for the kernel:
 * byte-addressable, GPA = user_va = offset, sparse (untouched pages cost
 * nothing and read as zero).
 *
 * Pages are Uint32Array views (1024 words) so that the page walkers read a
 * 64-bit entry as two 32-bit halves with two array loads and no allocation.
 * Lookup is a two-level directory (2 MiB regions, then pages), plain arrays,
 * no string or BigInt keys.
 */
/**
 * Who pays for touched pages: the quota on a VM's own RAM and the running
 * total of its tenant (shared by the tenant's VMs).
 */
export interface MemoryAccount {
  readonly limits: Limits;
  readonly vmSubject: string;
  readonly tenantSubject: string;
  readonly tenant: { touchedPages: number };
}

export class GuestMemory {
  readonly size: number;
  private readonly regions: (Array<Uint32Array | undefined> | undefined)[];
  private chunk: Uint32Array = ZERO_PAGE;
  private chunkNextPage = CHUNK_PAGES;
  private touched = 0;

  constructor(
    size: number,
    private readonly account?: MemoryAccount,
  ) {
    this.size = size;
    const regionCount = Math.ceil(size / PAGE_SIZE / REGION_PAGES);
    this.regions = new Array(regionCount).fill(undefined);
  }

  /** Pages ever written (what the guest's RAM really costs). */
  get touchedPages(): number {
    return this.touched;
  }

  /** True when [gpa, gpa + length) lies inside guest RAM. */
  contains(gpa: number, length: number): boolean {
    return gpa >= 0 && length >= 0 && gpa + length <= this.size;
  }

  /**
   * The words of page `pfn` for reading; an untouched page is the shared zero
   * page. The caller guarantees pfn < size / PAGE_SIZE.
   */
  page(pfn: number): Uint32Array {
    const region = this.regions[pfn >>> REGION_SHIFT];
    if (region === undefined) return ZERO_PAGE;
    return region[pfn & (REGION_PAGES - 1)] ?? ZERO_PAGE;
  }

  /** The words of page `pfn` for writing, materialising it if untouched. */
  pageForWrite(pfn: number): Uint32Array {
    const regionIndex = pfn >>> REGION_SHIFT;
    let region = this.regions[regionIndex];
    if (region === undefined) {
      region = new Array(REGION_PAGES).fill(undefined);
      this.regions[regionIndex] = region;
    }
    const slot = pfn & (REGION_PAGES - 1);
    let page = region[slot];
    if (page === undefined) {
      if (this.chunkNextPage === CHUNK_PAGES) {
        this.chunk = new Uint32Array(CHUNK_PAGES * PAGE_WORDS);
        this.chunkNextPage = 0;
      }
      const start = this.chunkNextPage++ * PAGE_WORDS;
      page = this.chunk.subarray(start, start + PAGE_WORDS);
      region[slot] = page;
      this.touched++;
      if (this.account) this.account.tenant.touchedPages++;
    }
    return page;
  }

  /** Pages of [gpa, gpa + length) never written yet: what writing them would add. */
  private untouchedPagesIn(gpa: number, length: number): number {
    let n = 0;
    for (let pfn = Math.floor(gpa / PAGE_SIZE); pfn * PAGE_SIZE < gpa + length; pfn++) {
      const region = this.regions[pfn >>> REGION_SHIFT];
      if (region === undefined || region[pfn & (REGION_PAGES - 1)] === undefined) n++;
    }
    return n;
  }

  /** The page numbers of every touched page, ascending. */
  *touchedPageNumbers(): IterableIterator<number> {
    for (let r = 0; r < this.regions.length; r++) {
      const region = this.regions[r];
      if (region === undefined) continue;
      for (let i = 0; i < REGION_PAGES; i++) if (region[i] !== undefined) yield r * REGION_PAGES + i;
    }
  }

  /** Copies `data` to guest RAM at `gpa`; EFAULT if it does not fit. */
  write(gpa: number, data: Uint8Array): void {
    if (!this.contains(gpa, data.length)) {
      fail("EFAULT", `guest write [0x${gpa.toString(16)}, +0x${data.length.toString(16)}) is outside guest RAM of 0x${this.size.toString(16)} bytes`);
    }
    const newPages = this.untouchedPagesIn(gpa, data.length);
    const a = this.account;
    if (a !== undefined) {
      // Touched RAM is what a VM really costs: both quotas hold before a byte is written.
      const adding = newPages * PAGE_SIZE;
      checkQuota("touchedBytesPerVm", a.limits, this.touched * PAGE_SIZE, adding, a.vmSubject, "touched guest RAM");
      checkQuota("touchedBytesPerTenant", a.limits, a.tenant.touchedPages * PAGE_SIZE, adding, a.tenantSubject, "touched guest RAM");
    }
    // alloc_page() of each page first touched, all before a byte is written,
    // so that a failed write leaves guest RAM as it was.
    for (let k = 0; k < newPages; k++) faultPoint("alloc_page");
    let done = 0;
    while (done < data.length) {
      const addr = gpa + done;
      const offset = addr % PAGE_SIZE;
      const n = Math.min(PAGE_SIZE - offset, data.length - done);
      const words = this.pageForWrite(Math.floor(addr / PAGE_SIZE));
      new Uint8Array(words.buffer, words.byteOffset, PAGE_SIZE).set(data.subarray(done, done + n), offset);
      done += n;
    }
  }

  /** Copies `length` bytes of guest RAM at `gpa`; EFAULT if out of range. */
  read(gpa: number, length: number): Uint8Array {
    if (!this.contains(gpa, length)) {
      fail("EFAULT", `guest read [0x${gpa.toString(16)}, +0x${length.toString(16)}) is outside guest RAM of 0x${this.size.toString(16)} bytes`);
    }
    const out = new Uint8Array(length);
    let done = 0;
    while (done < length) {
      const addr = gpa + done;
      const offset = addr % PAGE_SIZE;
      const n = Math.min(PAGE_SIZE - offset, length - done);
      const words = this.page(Math.floor(addr / PAGE_SIZE));
      if (words !== ZERO_PAGE) out.set(new Uint8Array(words.buffer, words.byteOffset + offset, n), done);
      done += n;
    }
    return out;
  }
}

/** WriteGuestMemory: a u64 GPA from the wire; out of range is EFAULT. */
export function guestMemoryWrite(memory: GuestMemory, limits: Limits, gpa: bigint, data: Uint8Array): void {
  checkQuota("guestIoBytes", limits, 0, data.length, "request", "WriteGuestMemory bytes");
  memory.write(gpa > BigInt(memory.size) ? Number.MAX_SAFE_INTEGER : Number(gpa), data);
}

/** ReadGuestMemory */
export function guestMemoryRead(memory: GuestMemory, limits: Limits, gpa: bigint, length: number): Uint8Array {
  checkQuota("guestIoBytes", limits, 0, length, "request", "ReadGuestMemory bytes");
  return memory.read(gpa > BigInt(memory.size) ? Number.MAX_SAFE_INTEGER : Number(gpa), length);
}
