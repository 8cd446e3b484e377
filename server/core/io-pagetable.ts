import type { IommuProt, PagingDomain } from "./drivers/driver.js";
import { fail } from "./errno.js";
import { faultPoint } from "./fail-nth.js";
import type { GuestMemory } from "./guest-memory.js";
import { checkQuota, type Limits } from "./limits.js";
import {
  addU64,
  hex,
  holes,
  intersects,
  isAligned,
  type IovaRange,
  lowestSetBit,
  roundupPowOfTwo,
  ULONG_MAX,
  usedSpans,
} from "./iova.js";

const PAGE_SIZE = 4096n;
/** HPAGE_SIZE with CONFIG_TRANSPARENT_HUGEPAGE: caps the auto-IOVA alignment. */
const HPAGE_SIZE = 2n * 1024n * 1024n;

/**
 * A mapped IOVA range (struct iopt_area): [iova, last] -> guest RAM at
 * hostAddr. `pagesWritable` is iopt_pages->writable: whether the pages were
 * first mapped WRITEABLE, which IOMMU_IOAS_COPY inherits.
 */
export interface Area {
  readonly iova: bigint;
  readonly last: bigint;
  readonly hostAddr: bigint;
  readonly prot: IommuProt;
  readonly pagesWritable: boolean;
}

/** One element of a pages list (struct iopt_pages_list). */
export interface PagesSlice {
  readonly hostAddr: bigint;
  readonly length: bigint;
  readonly writable: boolean;
}

interface Reserved extends IovaRange {
  readonly owner: object;
}

export const areaLength = (a: Area): bigint => a.last - a.iova + 1n;

/**
 * The IOVA bookkeeping of one IOAS (struct io_pagetable, io_pagetable.c):
 * areas, reserved ranges (domain apertures, device regions) and allowed
 * ranges, the IOAS alignment, and the domains every area is mapped into.
 * Every method either succeeds or leaves the table exactly as it was.
 */
export class IoPagetable {
  /** Sorted by iova, never overlapping. */
  private readonly areas: Area[] = [];
  private readonly reserved: Reserved[] = [];
  private allowed: IovaRange[] = [];
  /** iopt->iova_alignment: starts at 1 (a software table takes any IOVA). */
  iovaAlignment = 1n;
  /** IOMMU_OPTION_HUGE_PAGES = 0 */
  disableLargePages = false;
  /** iopt->domains: every paging domain allocated on this IOAS. */
  readonly domains: PagingDomain[] = [];
  /** Bytes mapped by all areas (the mappedBytesPerIoas quota). */
  private mappedBytes = 0n;

  /** What the mappedBytesPerIoas quota counts now. */
  get mappedBytesUsed(): bigint {
    return this.mappedBytes;
  }
  /** Names this IOAS in quota violations. */
  subject = "ioas";

  constructor(
    private readonly memory: GuestMemory,
    private readonly limits: Limits,
  ) {}

  get areaCount(): number {
    return this.areas.length;
  }

  allAreas(): readonly Area[] {
    return this.areas;
  }

  allowedRanges(): readonly IovaRange[] {
    return this.allowed;
  }

  /** Reserved ranges, each with its owner (a domain for its aperture). */
  reservedRanges(): readonly (IovaRange & { readonly owner: object })[] {
    return this.reserved;
  }

  /** Index of the first area whose last >= iova (binary search). */
  private lowerBound(iova: bigint): number {
    let lo = 0;
    let hi = this.areas.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.areas[mid].last < iova) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  /** iopt_area_iter_first(): the lowest area intersecting [start, last]. */
  areaIterFirst(start: bigint, last: bigint): Area | undefined {
    const area = this.areas[this.lowerBound(start)];
    return area !== undefined && area.iova <= last ? area : undefined;
  }

  private areasIn(start: bigint, last: bigint): Area[] {
    const out: Area[] = [];
    for (let i = this.lowerBound(start); i < this.areas.length && this.areas[i].iova <= last; i++) out.push(this.areas[i]);
    return out;
  }

  private reservedIntersects(start: bigint, last: bigint): boolean {
    return this.reserved.some((r) => intersects(r, start, last));
  }

  private allowedIntersects(start: bigint, last: bigint): boolean {
    return this.allowed.some((r) => intersects(r, start, last));
  }

  /** IOMMU_IOAS_IOVA_RANGES: the holes of the reserved set over [0, ULONG_MAX]. */
  iovaRanges(): IovaRange[] {
    return holes(this.reserved, 0n, ULONG_MAX);
  }

  /** iopt_check_iova(): may a FIXED_IOVA mapping go at [iova, iova + length)? */
  private checkIova(iova: bigint, length: bigint): void {
    if (!isAligned(iova, this.iovaAlignment)) fail("EINVAL", `iova ${hex(iova)} is not aligned to the IOAS alignment ${hex(this.iovaAlignment)}`);
    const last = addU64(iova, length - 1n);
    if (last === undefined) fail("EOVERFLOW", `iova ${hex(iova)} + length ${hex(length)} overflows`);
    if (this.reservedIntersects(iova, last)) fail("EINVAL", `[${hex(iova)}, ${hex(last)}] intersects a reserved IOVA range`);
    if (this.areaIterFirst(iova, last)) fail("EEXIST", `[${hex(iova)}, ${hex(last)}] overlaps an existing mapping`);
  }

  /**
   * iopt_alloc_iova(): the lowest IOVA in an allowed span, outside reserved
   * ranges and areas, aligned to keep the alignment present in `addr`
   * (to favour huge pages) and with addr's offset in its page. Never 0.
   */
  private allocIova(addr: bigint, length: bigint): bigint {
    const pageOffset = addr % PAGE_SIZE;
    if (length === 0n || length >= ULONG_MAX / 2n) fail("EOVERFLOW", `length ${hex(length)} is too large for automatic IOVA allocation`);
    let alignment = roundupPowOfTwo(length);
    if (addr !== 0n) {
      const low = lowestSetBit(addr);
      if (low < alignment) alignment = low;
    }
    if (alignment >= HPAGE_SIZE) alignment = HPAGE_SIZE;
    if (alignment < this.iovaAlignment) {
      fail("EINVAL", `user_va ${hex(addr)} is less aligned than the IOAS alignment ${hex(this.iovaAlignment)}`);
    }

    // __alloc_iova_check_range(): ALIGN up, keep the page offset, fit length.
    const fit = (start: bigint, last: bigint): bigint | undefined => {
      const up = addU64(start, alignment - 1n);
      if (up === undefined) return undefined;
      const aligned = (up & ~(alignment - 1n)) | pageOffset;
      if (aligned >= last || last - aligned < length - 1n) return undefined;
      return aligned;
    };

    const window: IovaRange = { start: PAGE_SIZE, last: ULONG_MAX - PAGE_SIZE };
    const allowedSpans = this.allowed.length === 0 ? [window] : usedSpans(this.allowed, window.start, window.last);
    const used: IovaRange[] = [...this.reserved, ...this.areas.map((a) => ({ start: a.iova, last: a.last }))];
    for (const span of allowedSpans) {
      const start = fit(span.start, span.last);
      if (start === undefined) continue;
      for (const hole of holes(used, start, span.last)) {
        const iova = fit(hole.start, hole.last);
        if (iova !== undefined) return iova;
      }
    }
    fail("ENOSPC", `no free IOVA range of ${hex(length)} bytes`);
  }

  /** The pin of iopt_area_fill_domains(): the area's pages must be guest RAM. */
  private checkPinnable(area: Area): void {
    const end = area.hostAddr + areaLength(area);
    if (end > BigInt(this.memory.size)) {
      fail("EFAULT", `user_va range [${hex(area.hostAddr)}, ${hex(end)}) is not backed by guest RAM of ${hex(this.memory.size)} bytes`);
    }
  }

  /**
   * An area mapped while HUGE_PAGES was 0 keeps its 4 KiB pages in that
   * domain when large pages are enabled again: the domains each area was so
   * mapped into, for a snapshot to rebuild the very same tables.
   */
  private readonly smallPagesIn = new WeakMap<Area, Set<PagingDomain>>();

  private mapArea(domain: PagingDomain, area: Area, largePages = !this.disableLargePages): () => void {
    const undo = domain.map(area.iova, area.hostAddr, areaLength(area), area.prot, largePages);
    if (largePages) return undo;
    let domains = this.smallPagesIn.get(area);
    if (domains === undefined) this.smallPagesIn.set(area, (domains = new Set()));
    domains.add(domain);
    return () => {
      domains.delete(domain);
      undo();
    };
  }

  /** The areas `domain` maps with 4 KiB pages only (HUGE_PAGES was 0 when they went in). */
  smallPageAreas(domain: PagingDomain): Area[] {
    return this.areas.filter((a) => this.smallPagesIn.get(a)?.has(domain));
  }

  /**
   * iopt_area_fill_domains() for a batch of new areas: pin, then map each into
   * every domain; on failure unmap what was mapped and rethrow.
   */
  private fillDomains(areas: readonly Area[], domains: readonly PagingDomain[], largePages?: (area: Area) => boolean): void {
    const undo: (() => void)[] = [];
    try {
      for (const area of areas) {
        if (domains.length === 0) continue;
        this.checkPinnable(area);
        // pfn_reader_first(): the pin batch of the area.
        faultPoint("iopt_area_fill_domains");
        for (const domain of domains) undo.push(this.mapArea(domain, area, largePages?.(area)));
      }
    } catch (e) {
      // iopt_area_unfill_domains() of the error path, newest first. The
      // kernel's iommu_unmap() here flushes caches (for a nest parent, every
      // nested child's) and keeps the page-table pages it allocated; neither
      // has a meaning for ranges no DMA has seen, and in the emulator both
      // would show (DumpIotlb, a walk's memory references), so each map is
      // undone exactly instead.
      for (const u of undo.reverse()) u();
      throw e;
    }
  }

  /**
   * iopt_map_pages(): place `slices` back to back at `iova` (FIXED_IOVA) or at
   * an allocated IOVA, and map them into every domain. Returns the IOVA.
   */
  mapPages(slices: readonly PagesSlice[], length: bigint, fixedIova: bigint | undefined, prot: IommuProt): bigint {
    // iopt_alloc_area_pages()
    if (length === 0n || !isAligned(length, this.iovaAlignment)) {
      fail("EINVAL", `length ${hex(length)} is zero or not a multiple of the IOAS alignment ${hex(this.iovaAlignment)}`);
    }
    let iova: bigint;
    if (fixedIova === undefined) {
      iova = this.allocIova(slices[0].hostAddr, length);
    } else {
      this.checkIova(fixedIova, length);
      iova = fixedIova;
    }

    // iopt_insert_area() for each slice, validated before anything is inserted.
    const created: Area[] = [];
    let cursor = iova;
    for (const slice of slices) {
      if (prot.write && !slice.writable) fail("EPERM", "WRITEABLE mapping of pages that were mapped read-only");
      faultPoint("iopt_alloc_area");
      const pageOffset = slice.hostAddr % PAGE_SIZE;
      if (!isAligned(pageOffset, this.iovaAlignment)) {
        fail("EINVAL", `user_va offset in page ${hex(pageOffset)} is not aligned to the IOAS alignment ${hex(this.iovaAlignment)}`);
      }
      const last = addU64(cursor, slice.length - 1n);
      if (last === undefined || addU64(slice.hostAddr, slice.length - 1n) === undefined) fail("EOVERFLOW", "area end overflows");
      created.push({ iova: cursor, last, hostAddr: slice.hostAddr, prot, pagesWritable: slice.writable });
      cursor = last + 1n;
    }

    checkQuota("mappedBytesPerIoas", this.limits, Number(this.mappedBytes), Number(length), this.subject, "mapped bytes");
    this.fillDomains(created, this.domains);
    for (const area of created) this.areas.splice(this.lowerBound(area.iova), 0, area);
    this.mappedBytes += length;
    return iova;
  }

  /**
   * iopt_get_pages(): the slices behind [iova, iova + length), which areas
   * must cover contiguously (ENOENT otherwise). Used by IOMMU_IOAS_COPY.
   */
  getPages(iova: bigint, length: bigint): PagesSlice[] {
    if (length === 0n) fail("EINVAL", "length is 0");
    const last = addU64(iova, length - 1n);
    if (last === undefined) fail("EOVERFLOW", `iova ${hex(iova)} + length ${hex(length)} overflows`);
    const slices: PagesSlice[] = [];
    let cursor = iova;
    for (let i = this.lowerBound(iova); i < this.areas.length; i++) {
      const area = this.areas[i];
      if (area.iova > cursor) break;
      const end: bigint = area.last < last ? area.last : last;
      // The iopt_pages_list element of each area.
      faultPoint("iopt_get_pages");
      slices.push({ hostAddr: area.hostAddr + (cursor - area.iova), length: end - cursor + 1n, writable: area.pagesWritable });
      if (end === last) return slices;
      cursor = end + 1n;
    }
    fail("ENOENT", `[${hex(iova)}, ${hex(last)}] is not fully mapped`);
  }

  /**
   * iopt_unmap_iova_range(): remove every area intersecting [start, last];
   * each must lie wholly inside (areas are never split), else ENOENT.
   * Unlike the kernel, which may already have removed the areas below a
   * straddling one when it returns ENOENT, this checks all of them first:
   * a failed unmap changes nothing.
   */
  unmapIovaRange(start: bigint, last: bigint): bigint {
    const victims = this.areasIn(start, last);
    if (victims.length === 0) fail("ENOENT", `no mapping in [${hex(start)}, ${hex(last)}]`);
    const straddler = victims.find((a) => a.iova < start || a.last > last);
    if (straddler) fail("ENOENT", `mapping [${hex(straddler.iova)}, ${hex(straddler.last)}] is only partly inside [${hex(start)}, ${hex(last)}]`);
    let unmapped = 0n;
    for (const area of victims) {
      for (const domain of this.domains) domain.unmap(area.iova, areaLength(area));
      unmapped += areaLength(area);
    }
    this.areas.splice(this.lowerBound(victims[0].iova), victims.length);
    this.mappedBytes -= unmapped;
    return unmapped;
  }

  /** iopt_unmap_all(): succeeds on an empty IOAS. */
  unmapAll(): bigint {
    return this.areas.length === 0 ? 0n : this.unmapIovaRange(0n, ULONG_MAX);
  }

  /** iopt_set_allow_iova(): swap in a validated allowed list. */
  setAllowIova(ranges: readonly IovaRange[]): void {
    const clash = ranges.find((r) => this.reservedIntersects(r.start, r.last));
    if (clash) fail("EADDRINUSE", `allowed range [${hex(clash.start)}, ${hex(clash.last)}] intersects a reserved range`);
    this.allowed = ranges.map((r) => ({ start: r.start, last: r.last }));
  }

  /** iopt_reserve_iova(): reserved ranges may not cover areas or allowed ranges. */
  reserveIova(start: bigint, last: bigint, owner: object): void {
    if (this.areaIterFirst(start, last) || this.allowedIntersects(start, last)) {
      fail("EADDRINUSE", `cannot reserve [${hex(start)}, ${hex(last)}]: it overlaps a mapping or an allowed range`);
    }
    faultPoint("iopt_reserve_iova");
    this.reserved.push({ start, last, owner });
  }

  /** iopt_remove_reserved_iova() */
  removeReservedIova(owner: object): void {
    for (let i = this.reserved.length - 1; i >= 0; i--) if (this.reserved[i].owner === owner) this.reserved.splice(i, 1);
  }

  /** iopt_check_iova_alignment(): do all areas conform to a larger alignment? */
  private checkIovaAlignment(alignment: bigint): void {
    const bad = this.areas.find(
      (a) => !isAligned(a.iova, alignment) || !isAligned(areaLength(a), alignment) || !isAligned(a.hostAddr % PAGE_SIZE, alignment),
    );
    if (bad) fail("EADDRINUSE", `mapping at ${hex(bad.iova)} is not aligned to ${hex(alignment)}`);
  }

  /** iopt_calculate_iova_alignment() */
  private calculateIovaAlignment(): void {
    let alignment = this.disableLargePages ? PAGE_SIZE : 1n;
    for (const d of this.domains) if (d.pgsizeMin > alignment) alignment = d.pgsizeMin;
    if (alignment > this.iovaAlignment) this.checkIovaAlignment(alignment);
    this.iovaAlignment = alignment;
  }

  /**
   * iopt_table_add_domain(): the domain's page size raises the alignment, its
   * aperture becomes reserved, and every area is mapped into it (a
   * snapshot's restore says which areas were mapped with 4 KiB pages only).
   */
  tableAddDomain(domain: PagingDomain, smallPageIovas?: ReadonlySet<bigint>): void {
    const alignment = domain.pgsizeMin > this.iovaAlignment ? domain.pgsizeMin : this.iovaAlignment;
    if (alignment > PAGE_SIZE) fail("EINVAL", `domain page size ${hex(alignment)} exceeds PAGE_SIZE`);
    if (alignment !== this.iovaAlignment) this.checkIovaAlignment(alignment);
    try {
      if (domain.aperture.start !== 0n) this.reserveIova(0n, domain.aperture.start - 1n, domain);
      if (domain.aperture.last !== ULONG_MAX) this.reserveIova(domain.aperture.last + 1n, ULONG_MAX, domain);
      // xa_reserve() of the domain's slot in iopt->domains.
      faultPoint("xa_reserve");
      this.fillDomains(this.areas, [domain], smallPageIovas && ((area) => !this.disableLargePages && !smallPageIovas.has(area.iova)));
    } catch (e) {
      this.removeReservedIova(domain);
      throw e;
    }
    this.iovaAlignment = alignment;
    this.domains.push(domain);
  }

  /** iopt_table_remove_domain() */
  tableRemoveDomain(domain: PagingDomain): void {
    const index = this.domains.indexOf(domain);
    if (index < 0) return;
    this.domains.splice(index, 1);
    for (const area of this.areas) domain.unmap(area.iova, areaLength(area));
    this.removeReservedIova(domain);
    this.calculateIovaAlignment();
  }

  /** iopt_disable_large_pages(): HUGE_PAGES 0. */
  setLargePages(enable: boolean): void {
    if (!enable === this.disableLargePages) return;
    if (!enable && this.domains.length > 0 && this.areas.length > 0) {
      fail("EINVAL", "cannot disable huge pages while domains already have pages mapped");
    }
    this.disableLargePages = !enable;
    try {
      this.calculateIovaAlignment();
    } catch (e) {
      this.disableLargePages = enable;
      throw e;
    }
  }
}
