/**
 * An independent reference model of one VM's iommufd context (one open
 * /dev/iommu), written from /work/shared/spec/iommufd-semantics.md (§1.1 ids,
 * §1.2 users, §3 per-ioctl check order, §4 attach/replace/detach, §8 mock
 * driver, §7.1 VT-d) and api.md — deliberately NOT importing server/core.
 *
 * State is plain maps: objects by id, each IOAS with its area list, allowed
 * list and HWPT list (creation order), devices with their attachments by
 * PASID. Reference counts are not stored: users() derives them from the
 * graph (§1.2), so comparing them with the core's counters checks that the
 * core's counters equal the references that exist.
 *
 * Every operation checks everything before it changes anything (the kernel's
 * ioctls are atomic in the cases modelled here), except IOMMU_HWPT_INVALIDATE,
 * whose entries take effect one by one up to the first failure (§3.10).
 *
 * Documented deviations of the service that are modelled as documented:
 * - IOMMU_IOAS_UNMAP of a range that partly covers an area fails with ENOENT
 *   and unmaps nothing (io-pagetable.ts unmapIovaRange(); the kernel may have
 *   removed the areas below the straddling one already).
 * - Quotas (api.md Errors, EDQUOT): mapped bytes per IOAS and entries per
 *   Invalidate, with limits the test configures (Profile).
 *
 * Where the spec is terse the kernel (v6.17 drivers/iommu/iommufd/*.c, the
 * spec's own snapshot) decides: e.g. the automatic IOVA search is
 * iopt_alloc_iova()'s (ALIGN up, OR in the page offset, "start >= last" fails).
 * ExportVm + ImportVm (snapshot()) must lose nothing: the model does not
 * change, except that the imported VM's caches start empty.
 */

export const U64_MAX = (1n << 64n) - 1n;
export const PAGE_SIZE = 4096n;
/** HPAGE_SIZE: caps the automatic IOVA alignment (§3.5). */
const HPAGE_SIZE = 2n * 1024n * 1024n;

export type ErrnoName =
  | "EPERM"
  | "ENOENT"
  | "EIO"
  | "E2BIG"
  | "ENOMEM"
  | "EFAULT"
  | "EBUSY"
  | "EEXIST"
  | "ENODEV"
  | "EINVAL"
  | "ENOSPC"
  | "EOVERFLOW"
  | "EOPNOTSUPP"
  | "EADDRINUSE"
  | "EDQUOT";

/** A failure of the model: the errno the kernel would return, and why (for reports). */
export class ModelFail extends Error {
  constructor(
    readonly errno: ErrnoName,
    readonly why: string,
    /** IOMMU_HWPT_INVALIDATE's entry_num out on failure. */
    readonly entriesHandled?: number,
  ) {
    super(`${errno}: ${why}`);
  }
}

function fail(errno: ErrnoName, why: string, entriesHandled?: number): never {
  throw new ModelFail(errno, why, entriesHandled);
}

export interface Range {
  readonly start: bigint;
  readonly last: bigint;
}

const overlaps = (a: Range, start: bigint, last: bigint): boolean => a.start <= last && start <= a.last;
const hex = (x: bigint | number): string => `0x${x.toString(16)}`;

// ---------------------------------------------------------------------------
// Driver profiles

/** The selftest mock (§8) or the VT-d driver (§7.1, vtd.md), as far as the model needs. */
export interface Profile {
  readonly driver: "mock" | "intel_vtd";
  /** domain->geometry.aperture */
  readonly aperture: Range;
  /** The domain's smallest page size (becomes the IOAS alignment). */
  readonly pgsizeMin: bigint;
  readonly guestMemoryBytes: bigint;
  /** The test's quotas (EDQUOT). */
  readonly mappedBytesPerIoas: bigint;
  readonly invalidateEntries: number;
  /** VmOptions.iotlb_entries (0: no IOTLB, so every DMA walks the current tables). */
  readonly iotlbEntries: number;
}

/** MOCK_APERTURE_START / _LAST, MOCK_IO_PAGE_SIZE = PAGE_SIZE / 2 (§8.3). */
export const MOCK_APERTURE: Range = { start: 1n << 24n, last: (1n << 31n) - 1n };
export const MOCK_PAGE = PAGE_SIZE / 2n;

export function mockProfile(guestMemoryBytes: bigint, mappedBytesPerIoas: bigint, invalidateEntries: number): Profile {
  return { driver: "mock", aperture: MOCK_APERTURE, pgsizeMin: MOCK_PAGE, guestMemoryBytes, mappedBytesPerIoas, invalidateEntries, iotlbEntries: 4096 };
}

/** VT-d with 4-level second stage: aperture [0, 2^48 - 1], 4 KiB pages. */
export function vtdProfile(guestMemoryBytes: bigint, mappedBytesPerIoas: bigint, invalidateEntries: number, iotlbEntries = 4096): Profile {
  return { driver: "intel_vtd", aperture: { start: 0n, last: (1n << 48n) - 1n }, pgsizeMin: PAGE_SIZE, guestMemoryBytes, mappedBytesPerIoas, invalidateEntries, iotlbEntries };
}

/** IOMMU_HWPT_DATA_* and the selftest's (§2.2, §5). */
export const HWPT_DATA_NONE = 0;
export const HWPT_DATA_VTD_S1 = 1;
export const HWPT_DATA_SELFTEST = 0xdead;
export const INVALIDATE_DATA_VTD_S1 = 0;
export const INVALIDATE_DATA_SELFTEST = 0xdeadbeef;
export const HW_INFO_TYPE_DEFAULT = 0;
export const HW_INFO_TYPE_INTEL_VTD = 1;
export const HW_INFO_TYPE_SELFTEST = 0xfeedbeef;
/** IOMMU_TEST_PASID_RESERVED: the mock's fake-error PASID (§8, selftest.c). */
export const PASID_FAKE_ERROR = 1024;
export const PASID_WIDTH = 20;

/** Translation fault reasons (api.md Translate; vtd.md §3). */
export const FAULT_BLOCKED = 0x59;
export const FAULT_S1_NOT_PRESENT = 0x71;
export const FAULT_S2_NOT_PRESENT = 0x79;
export const FAULT_NO_WRITE = 0x85;
export const FAULT_NO_READ = 0x86;
/** vtd.md §2: a second-stage input address at or above 2^min(MGAW, AGAW). */
export const FAULT_BEYOND_MAX_ADDRESS = 0x83;

// ---------------------------------------------------------------------------
// Objects

export interface MArea {
  readonly iova: bigint;
  readonly last: bigint;
  readonly hostAddr: bigint;
  readonly read: boolean;
  readonly write: boolean;
  /** iopt_pages->writable: the pages were first pinned for write (COPY inherits it). */
  readonly pagesWritable: boolean;
}

export interface MIoas {
  readonly kind: "ioas";
  readonly id: number;
  /** Sorted by iova, disjoint. */
  areas: MArea[];
  allowed: Range[];
  /** ioas->hwpt_list: paging HWPT ids, creation order. */
  readonly hwpts: number[];
  /** IOMMU_OPTION_HUGE_PAGES */
  hugePages: boolean;
}

export interface MPaging {
  readonly kind: "hwpt_paging";
  readonly id: number;
  readonly ioasId: number;
  readonly auto: boolean;
  readonly nestParent: boolean;
  readonly dirty: boolean;
  readonly pasidCompat: boolean;
  /**
   * Not compared directly: per area (by iova), the HUGE_PAGES in force when
   * the area was mapped into this domain, which fixed its stage-2 page sizes
   * (api.md: HUGE_PAGES "affects how areas mapped afterwards are placed").
   */
  readonly largePages: Map<bigint, boolean>;
}

export interface MNested {
  readonly kind: "hwpt_nested";
  readonly id: number;
  readonly parentId: number;
  readonly pasidCompat: boolean;
  /** Mock: the four iotlb values (§8.4). */
  readonly iotlb: number[];
  /** VT-d: the stage-1 configuration, validated at attach (§7.1). */
  readonly vtd?: { readonly flags: bigint; readonly pgtblAddr: bigint; readonly addrWidth: number };
  /**
   * Not compared state: the guest wrote RAM since this HWPT's IOTLB entries
   * were last all invalidated, so a cached translation may legitimately be
   * stale (the guest changed its tables without invalidating).
   */
  mayBeStale: boolean;
}

export interface MDevice {
  readonly kind: "device";
  readonly id: number;
  readonly name: string;
  readonly pasidCapable: boolean;
  readonly dirtyCapable: boolean;
  /** pasid (0 = RID) -> HWPT id */
  readonly attachments: Map<number, number>;
  /** mdev->pasid_1024_fake_error */
  fakeErrorArmed: boolean;
}

export type MObject = MIoas | MPaging | MNested | MDevice;
export type MHwpt = MPaging | MNested;

// ---------------------------------------------------------------------------
// Command inputs (shared with the adapter that drives the core)

export interface MapArgs {
  ioasId: number;
  userVa: bigint;
  length: bigint;
  iova?: bigint;
  readable: boolean;
  writeable: boolean;
}

export interface CopyArgs {
  dstIoasId: number;
  srcIoasId: number;
  srcIova: bigint;
  length: bigint;
  dstIova?: bigint;
  readable: boolean;
  writeable: boolean;
}

export interface HwptFlags {
  nestParent: boolean;
  dirtyTracking: boolean;
  pasid: boolean;
}

/** HWPT_ALLOC's (data_type, data_len/data_uptr): absent = IOMMU_HWPT_DATA_NONE. */
export interface UserData {
  type: number;
  bytes: Uint8Array;
}

/** IOMMU_HWPT_INVALIDATE's array: entry i at bytes[i * entryLen]. */
export interface InvalidateArray {
  type: number;
  entryLen: number;
  entryNum: number;
  bytes: Uint8Array;
}

export interface TranslateResult {
  /** Per IOVA: the host address, or a fault reason. */
  readonly results: readonly ({ addr: bigint } | { fault: number })[];
}

export interface HwInfoResult {
  type: number;
  data: Uint8Array;
  capabilities: bigint;
  maxPasidLog2: number;
}

// ---------------------------------------------------------------------------
// Interval helpers

/** Overlapping or adjacent ranges merged, clipped to [lo, hi], ascending. */
function spans(ranges: readonly Range[], lo: bigint, hi: bigint): Range[] {
  const sorted = ranges.filter((r) => overlaps(r, lo, hi)).sort((a, b) => (a.start < b.start ? -1 : a.start > b.start ? 1 : 0));
  const out: { start: bigint; last: bigint }[] = [];
  for (const r of sorted) {
    const start = r.start > lo ? r.start : lo;
    const last = r.last < hi ? r.last : hi;
    const prev = out[out.length - 1];
    if (prev !== undefined && start <= prev.last + 1n) {
      if (last > prev.last) prev.last = last;
    } else {
      out.push({ start, last });
    }
  }
  return out;
}

/** The complement of `ranges` within [lo, hi]. */
function gaps(ranges: readonly Range[], lo: bigint, hi: bigint): Range[] {
  const out: Range[] = [];
  let cursor = lo;
  for (const s of spans(ranges, lo, hi)) {
    if (s.start > cursor) out.push({ start: cursor, last: s.start - 1n });
    if (s.last === U64_MAX) return out;
    cursor = s.last + 1n;
  }
  if (cursor <= hi) out.push({ start: cursor, last: hi });
  return out;
}

function roundupPow2(x: bigint): bigint {
  let p = 1n;
  while (p < x) p <<= 1n;
  return p;
}

const lowBit = (x: bigint): bigint => x & -x;
const aligned = (x: bigint, a: bigint): boolean => x % a === 0n;

// ---------------------------------------------------------------------------
// The model

export class ReferenceModel {
  readonly objects = new Map<number, MObject>();

  constructor(readonly profile: Profile) {}

  // ---- ids and lookups (§1.1)

  /** xa_alloc with XA_FLAGS_ALLOC1: the lowest free id >= 1. */
  lowestFreeId(): number {
    let id = 1;
    while (this.objects.has(id)) id++;
    return id;
  }

  idsOf(kind: MObject["kind"] | "hwpt" | "any"): number[] {
    const out: number[] = [];
    for (const o of this.objects.values()) {
      if (kind === "any" || o.kind === kind || (kind === "hwpt" && (o.kind === "hwpt_paging" || o.kind === "hwpt_nested"))) out.push(o.id);
    }
    return out.sort((a, b) => a - b);
  }

  private ioas(id: number): MIoas {
    const o = this.objects.get(id);
    if (o?.kind !== "ioas") fail("ENOENT", `IOAS ${id} does not exist`);
    return o;
  }

  private device(id: number): MDevice {
    const o = this.objects.get(id);
    if (o?.kind !== "device") fail("ENOENT", `device ${id} does not exist`);
    return o;
  }

  private paging(id: number): MPaging {
    return this.objects.get(id) as MPaging;
  }

  private hwpt(id: number): MHwpt {
    return this.objects.get(id) as MHwpt;
  }

  /** The paging HWPT whose IOAS backs an attachment to `h`. */
  pagingOf(h: MHwpt): MPaging {
    return h.kind === "hwpt_paging" ? h : this.paging(h.parentId);
  }

  // ---- reference counts (§1.2)

  private attachmentsTo(hwptId: number): number {
    let n = 0;
    for (const o of this.objects.values()) if (o.kind === "device") for (const h of o.attachments.values()) if (h === hwptId) n++;
    return n;
  }

  private nestedOn(parentId: number): number {
    let n = 0;
    for (const o of this.objects.values()) if (o.kind === "hwpt_nested" && o.parentId === parentId) n++;
    return n;
  }

  /** The users count §1.2 implies: the table's own reference plus every holder. */
  users(id: number): number {
    const o = this.objects.get(id);
    if (o === undefined) return 0;
    switch (o.kind) {
      case "ioas":
        return 1 + o.hwpts.length;
      case "hwpt_paging":
        return 1 + this.attachmentsTo(id) + this.nestedOn(id);
      case "hwpt_nested":
        return 1 + this.attachmentsTo(id);
      case "device":
        // the binding driver, and every attach (iommufd_device_attach()).
        return 2 + o.attachments.size;
    }
  }

  // ---- IOAS geometry

  /** iova_alignment: the domains' page size, PAGE_SIZE with HUGE_PAGES = 0, else 1 (§3.2, §3.8, §3.9). */
  alignment(ioas: MIoas): bigint {
    let a = ioas.hugePages ? 1n : PAGE_SIZE;
    if (ioas.hwpts.length > 0 && this.profile.pgsizeMin > a) a = this.profile.pgsizeMin;
    return a;
  }

  /** The ranges a domain's aperture reserves (§3.9 iopt_table_add_domain). */
  private apertureReserved(): Range[] {
    const { start, last } = this.profile.aperture;
    const out: Range[] = [];
    if (start !== 0n) out.push({ start: 0n, last: start - 1n });
    if (last !== U64_MAX) out.push({ start: last + 1n, last: U64_MAX });
    return out;
  }

  reserved(ioas: MIoas): Range[] {
    return ioas.hwpts.length > 0 ? this.apertureReserved() : [];
  }

  /** IOMMU_IOAS_IOVA_RANGES (§3.3): the holes of the reserved set. */
  iovaRanges(ioas: MIoas): Range[] {
    return gaps(this.reserved(ioas), 0n, U64_MAX);
  }

  mappedBytes(ioas: MIoas): bigint {
    return ioas.areas.reduce((sum, a) => sum + (a.last - a.iova + 1n), 0n);
  }

  // ---- IOAS ioctls

  /** IOMMU_IOAS_ALLOC (§3.2) */
  allocIoas(): number {
    const id = this.lowestFreeId();
    this.objects.set(id, { kind: "ioas", id, areas: [], allowed: [], hwpts: [], hugePages: true });
    return id;
  }

  /** IOMMU_IOAS_MAP (§3.5) */
  map(a: MapArgs): bigint {
    if ((a.iova ?? 0n) >= U64_MAX || a.length >= U64_MAX) fail("EOVERFLOW", "iova or length >= U64_MAX");
    if (!a.readable && !a.writeable) fail("EINVAL", "neither READABLE nor WRITEABLE");
    const ioas = this.ioas(a.ioasId);
    // iopt_alloc_user_pages(): user_va + length must not wrap; then the pages object's length.
    if (a.userVa + a.length > U64_MAX) fail("EOVERFLOW", "user_va + length wraps");
    if (a.length === 0n || a.length > U64_MAX - PAGE_SIZE) fail("EINVAL", "length is 0 or larger than SIZE_MAX - PAGE_SIZE");
    return this.place(ioas, [{ hostAddr: a.userVa, length: a.length, writable: a.writeable }], a.length, a.iova, a.readable, a.writeable);
  }

  /**
   * iopt_map_pages(): place the slices back to back at a FIXED iova or an
   * allocated one, pin and map them into every domain (§3.5 steps 5-9).
   */
  private place(
    ioas: MIoas,
    slices: readonly { hostAddr: bigint; length: bigint; writable: boolean }[],
    length: bigint,
    fixed: bigint | undefined,
    read: boolean,
    write: boolean,
  ): bigint {
    const align = this.alignment(ioas);
    if (length === 0n || !aligned(length, align)) fail("EINVAL", `length ${hex(length)} not a multiple of the IOAS alignment ${hex(align)}`);
    const iova = fixed === undefined ? this.allocIova(ioas, slices[0].hostAddr, length) : this.checkFixed(ioas, fixed, length);
    const created: MArea[] = [];
    let cursor = iova;
    for (const s of slices) {
      if (write && !s.writable) fail("EPERM", "WRITEABLE mapping of pages pinned read-only");
      if (!aligned(s.hostAddr % PAGE_SIZE, align)) fail("EINVAL", `user_va offset in page ${hex(s.hostAddr % PAGE_SIZE)} not aligned to ${hex(align)}`);
      const last = cursor + s.length - 1n;
      if (last > U64_MAX || s.hostAddr + s.length - 1n > U64_MAX) fail("EOVERFLOW", "area end wraps");
      created.push({ iova: cursor, last, hostAddr: s.hostAddr, read, write, pagesWritable: s.writable });
      cursor = last + 1n;
    }
    if (this.mappedBytes(ioas) + length > this.profile.mappedBytesPerIoas) fail("EDQUOT", "mappedBytesPerIoas");
    const domains = ioas.hwpts.map((id) => this.paging(id));
    this.fillDomains(domains, created);
    for (const d of domains) for (const a of created) d.largePages.set(a.iova, ioas.hugePages);
    ioas.areas = [...ioas.areas, ...created].sort((x, y) => (x.iova < y.iova ? -1 : 1));
    return iova;
  }

  /** iopt_check_iova() for FIXED_IOVA (§3.5 step 6). */
  private checkFixed(ioas: MIoas, iova: bigint, length: bigint): bigint {
    if (!aligned(iova, this.alignment(ioas))) fail("EINVAL", `iova ${hex(iova)} not aligned`);
    const last = iova + length - 1n;
    if (last > U64_MAX) fail("EOVERFLOW", "iova + length - 1 wraps");
    if (this.reserved(ioas).some((r) => overlaps(r, iova, last))) fail("EINVAL", `[${hex(iova)}, ${hex(last)}] intersects a reserved range`);
    if (ioas.areas.some((r) => overlaps({ start: r.iova, last: r.last }, iova, last))) fail("EEXIST", `[${hex(iova)}, ${hex(last)}] overlaps an area`);
    return iova;
  }

  /**
   * iopt_alloc_iova() (§3.5 "Automatic"): alignment min(roundup_pow_of_two(length),
   * lowest set bit of user_va) capped at HPAGE_SIZE; the lowest hole of
   * (reserved ∪ areas) inside an allowed span (default [PAGE_SIZE,
   * ULONG_MAX - PAGE_SIZE]) that fits, keeping user_va's offset in its page.
   */
  private allocIova(ioas: MIoas, addr: bigint, length: bigint): bigint {
    const pageOffset = addr % PAGE_SIZE;
    if (length === 0n || length >= U64_MAX / 2n) fail("EOVERFLOW", "length too large for automatic IOVA");
    let align = roundupPow2(length);
    if (addr !== 0n && lowBit(addr) < align) align = lowBit(addr);
    if (align >= HPAGE_SIZE) align = HPAGE_SIZE;
    if (align < this.alignment(ioas)) fail("EINVAL", `automatic alignment ${hex(align)} below the IOAS alignment`);
    // __alloc_iova_check_range(): ALIGN up, OR in the page offset, must fit.
    const fit = (r: Range): bigint | undefined => {
      const up = r.start + align - 1n;
      if (up > U64_MAX) return undefined;
      const start = (up - (up % align)) | pageOffset;
      if (start >= r.last || r.last - start < length - 1n) return undefined;
      return start;
    };
    const lo = PAGE_SIZE;
    const hi = U64_MAX - PAGE_SIZE;
    const windows = ioas.allowed.length === 0 ? [{ start: lo, last: hi }] : spans(ioas.allowed, lo, hi);
    const used: Range[] = [...this.reserved(ioas), ...ioas.areas.map((x) => ({ start: x.iova, last: x.last }))];
    for (const w of windows) {
      const start = fit(w);
      if (start === undefined) continue;
      for (const hole of gaps(used, start, w.last)) {
        const iova = fit(hole);
        if (iova !== undefined) return iova;
      }
    }
    fail("ENOSPC", `no hole for ${hex(length)} bytes`);
  }

  /**
   * iopt_area_fill_domains(): per area, pin its pages (user_va range must be
   * guest RAM, api.md "user_va + length beyond guest RAM → EFAULT"), then map
   * it into each domain (VT-d nest parents refuse read-only, §7.1).
   */
  private fillDomains(domains: readonly MPaging[], areas: readonly MArea[]): void {
    if (domains.length === 0) return;
    for (const area of areas) {
      if (area.hostAddr + (area.last - area.iova + 1n) > this.profile.guestMemoryBytes) {
        fail("EFAULT", `user_va range of area ${hex(area.iova)} is beyond guest RAM`);
      }
      for (const d of domains) {
        if (this.profile.driver === "intel_vtd" && d.nestParent && !area.write) fail("EINVAL", "VT-d nest parent refuses a read-only mapping (ERRATA_772415_SPR17)");
      }
    }
  }

  /** IOMMU_IOAS_UNMAP (§3.7), atomic as documented in io-pagetable.ts. */
  unmap(ioasId: number, iova: bigint, length: bigint): bigint {
    const ioas = this.ioas(ioasId);
    const bytes = (list: readonly MArea[]) => list.reduce((s, x) => s + (x.last - x.iova + 1n), 0n);
    if (iova === 0n && length === U64_MAX) {
      const all = bytes(ioas.areas);
      ioas.areas = [];
      return all;
    }
    if (iova >= U64_MAX || length >= U64_MAX) fail("EOVERFLOW", "iova or length >= U64_MAX");
    if (length === 0n) fail("EINVAL", "length 0");
    const last = iova + length - 1n;
    if (last > U64_MAX) fail("EOVERFLOW", "iova + length - 1 wraps");
    const victims = ioas.areas.filter((x) => overlaps({ start: x.iova, last: x.last }, iova, last));
    if (victims.length === 0) fail("ENOENT", "nothing mapped in the range");
    if (victims.some((x) => x.iova < iova || x.last > last)) fail("ENOENT", "an area is only partly inside the range");
    ioas.areas = ioas.areas.filter((x) => !victims.includes(x));
    return bytes(victims);
  }

  /** IOMMU_IOAS_COPY (§3.6) */
  copy(a: CopyArgs): bigint {
    if (a.length >= U64_MAX || a.srcIova >= U64_MAX || (a.dstIova ?? 0n) >= U64_MAX) fail("EOVERFLOW", "length/src_iova/dst_iova >= U64_MAX");
    if (!a.readable && !a.writeable) fail("EINVAL", "neither READABLE nor WRITEABLE");
    const src = this.ioas(a.srcIoasId);
    // iopt_get_pages()
    if (a.length === 0n) fail("EINVAL", "length 0");
    const last = a.srcIova + a.length - 1n;
    if (last > U64_MAX) fail("EOVERFLOW", "src_iova + length - 1 wraps");
    const slices: { hostAddr: bigint; length: bigint; writable: boolean }[] = [];
    let cursor = a.srcIova;
    for (;;) {
      const area = src.areas.find((x) => x.iova <= cursor && cursor <= x.last);
      if (area === undefined) fail("ENOENT", `source ${hex(cursor)} is not mapped`);
      const end = area.last < last ? area.last : last;
      slices.push({ hostAddr: area.hostAddr + (cursor - area.iova), length: end - cursor + 1n, writable: area.pagesWritable });
      if (end === last) break;
      cursor = end + 1n;
    }
    const dst = this.ioas(a.dstIoasId);
    return this.place(dst, slices, a.length, a.dstIova, a.readable, a.writeable);
  }

  /** IOMMU_IOAS_ALLOW_IOVAS (§3.4) */
  allowIovas(ioasId: number, ranges: readonly Range[]): void {
    const ioas = this.ioas(ioasId);
    ranges.forEach((r, i) => {
      if (r.start >= r.last) fail("EINVAL", `range ${i}: start >= last`);
      if (ranges.slice(0, i).some((p) => overlaps(p, r.start, r.last))) fail("EINVAL", `range ${i} overlaps an earlier one`);
    });
    if (ranges.some((r) => this.reserved(ioas).some((x) => overlaps(x, r.start, r.last)))) fail("EADDRINUSE", "an allowed range intersects a reserved range");
    ioas.allowed = ranges.map((r) => ({ start: r.start, last: r.last }));
  }

  /** IOMMU_OPTION HUGE_PAGES (§3.8, api.md Fine points); returns the value in force. */
  option(option: "huge_pages" | undefined, ioasId: number, set: bigint | undefined): bigint {
    if (option !== "huge_pages") fail("EOPNOTSUPP", "unknown option");
    const ioas = this.ioas(ioasId);
    if (set !== undefined) {
      if (set !== 0n && set !== 1n) fail("EINVAL", "HUGE_PAGES value not 0 or 1");
      const enable = set === 1n;
      if (enable !== ioas.hugePages) {
        if (!enable) {
          // iopt_disable_large_pages(): not once domains have pages; then the new alignment must hold.
          if (ioas.hwpts.length > 0 && ioas.areas.length > 0) fail("EINVAL", "domains already have pages mapped");
          const align = this.alignment({ ...ioas, hugePages: false });
          if (align > this.alignment(ioas)) this.checkAreasAligned(ioas, align);
        }
        ioas.hugePages = enable;
      }
    }
    return ioas.hugePages ? 1n : 0n;
  }

  /** iopt_check_iova_alignment(): EADDRINUSE when an area does not conform. */
  private checkAreasAligned(ioas: MIoas, align: bigint): void {
    for (const x of ioas.areas) {
      if (!aligned(x.iova, align) || !aligned(x.last - x.iova + 1n, align) || !aligned(x.hostAddr % PAGE_SIZE, align)) {
        fail("EADDRINUSE", `area ${hex(x.iova)} not aligned to ${hex(align)}`);
      }
    }
  }

  /**
   * iopt_table_add_domain() (§3.9): the alignment may rise (areas must
   * conform), the aperture's complement becomes reserved (no area or allowed
   * range there), every area is pinned and mapped into the new domain.
   */
  private checkAddDomain(ioas: MIoas, nestParent: boolean): void {
    const newAlign = this.profile.pgsizeMin > this.alignment(ioas) ? this.profile.pgsizeMin : this.alignment(ioas);
    if (newAlign > PAGE_SIZE) fail("EINVAL", "domain page size above PAGE_SIZE");
    if (newAlign !== this.alignment(ioas)) this.checkAreasAligned(ioas, newAlign);
    for (const r of this.apertureReserved()) {
      if (ioas.areas.some((x) => overlaps(r, x.iova, x.last)) || ioas.allowed.some((x) => overlaps(r, x.start, x.last))) {
        fail("EADDRINUSE", `aperture reservation [${hex(r.start)}, ${hex(r.last)}] covers an area or allowed range`);
      }
    }
    const d: MPaging = { kind: "hwpt_paging", id: 0, ioasId: ioas.id, auto: false, nestParent, dirty: false, pasidCompat: false, largePages: new Map() };
    this.fillDomains([d], ioas.areas);
  }

  /** A new domain is filled with every area now, with the HUGE_PAGES in force. */
  private filledNow(ioas: MIoas): Map<bigint, boolean> {
    return new Map(ioas.areas.map((a) => [a.iova, ioas.hugePages]));
  }

  // ---- devices

  /** BindDevice (api.md Devices) */
  bind(name: string, pasidCapable: boolean, dirtyCapable: boolean): number {
    if (name.length === 0 || name.length > 255) fail("EINVAL", "bad name");
    for (const o of this.objects.values()) if (o.kind === "device" && o.name === name) fail("EEXIST", `device name ${name} taken`);
    const id = this.lowestFreeId();
    this.objects.set(id, { kind: "device", id, name, pasidCapable, dirtyCapable, attachments: new Map(), fakeErrorArmed: false });
    return id;
  }

  /** UnbindDevice: detach every PASID and the RID, free the id. */
  unbind(devId: number): void {
    const dev = this.device(devId);
    for (const pasid of [...dev.attachments.keys()].sort((a, b) => b - a)) this.detach(devId, pasid);
    this.objects.delete(devId);
  }

  /** HwInfo / IOMMU_GET_HW_INFO (§3.11, §8.2). */
  hwInfo(devId: number, type: number | undefined): HwInfoResult {
    const dev = this.device(devId);
    const requested = type ?? HW_INFO_TYPE_DEFAULT;
    let out: { type: number; data: Uint8Array };
    if (this.profile.driver === "mock") {
      if (requested !== HW_INFO_TYPE_DEFAULT && requested !== HW_INFO_TYPE_SELFTEST) fail("EOPNOTSUPP", "hw_info type");
      const data = new Uint8Array(8);
      new DataView(data.buffer).setUint32(4, 0xdeadbeef, true);
      out = { type: HW_INFO_TYPE_SELFTEST, data };
    } else {
      if (requested !== HW_INFO_TYPE_DEFAULT && requested !== HW_INFO_TYPE_INTEL_VTD) fail("EOPNOTSUPP", "hw_info type");
      out = { type: HW_INFO_TYPE_INTEL_VTD, data: new Uint8Array() /* compared by type and length only */ };
    }
    return { ...out, capabilities: dev.dirtyCapable ? 1n : 0n, maxPasidLog2: dev.pasidCapable ? PASID_WIDTH : 0 };
  }

  // ---- HWPT allocation (§3.9)

  hwptAlloc(devId: number, ptId: number, flags: HwptFlags, data: UserData | undefined): number {
    const type = data?.type ?? HWPT_DATA_NONE;
    const len = data?.bytes.length ?? 0;
    if ((type === HWPT_DATA_NONE) !== (len === 0)) fail("EINVAL", "data_type / data_len mismatch");
    const dev = this.device(devId);
    const pt = this.objects.get(ptId);
    if (pt === undefined) fail("EINVAL", `pt_id ${ptId} does not exist`);
    const userData = type === HWPT_DATA_NONE ? undefined : data;
    if (pt.kind === "ioas") {
      if (flags.dirtyTracking && !dev.dirtyCapable) fail("EOPNOTSUPP", "device cannot track dirty pages");
      // mock 6.17 / VT-d: no user data for a paging domain.
      if (userData !== undefined) fail("EOPNOTSUPP", "paging domain with user data");
      this.checkAddDomain(pt, flags.nestParent);
      const id = this.lowestFreeId();
      this.objects.set(id, {
        kind: "hwpt_paging",
        id,
        ioasId: pt.id,
        auto: false,
        nestParent: flags.nestParent,
        dirty: flags.dirtyTracking,
        pasidCompat: flags.pasid,
        largePages: this.filledNow(pt),
      });
      pt.hwpts.push(id);
      return id;
    }
    if (pt.kind === "hwpt_paging") {
      if (flags.nestParent || flags.dirtyTracking || userData === undefined) fail("EOPNOTSUPP", "nested alloc takes only PASID and needs data");
      if (pt.auto || !pt.nestParent) fail("EINVAL", `HWPT ${pt.id} is auto or not a nest parent`);
      const nested = this.driverAllocNested(userData);
      const id = this.lowestFreeId();
      this.objects.set(id, { kind: "hwpt_nested", id, parentId: pt.id, pasidCompat: flags.pasid, ...nested, mayBeStale: false });
      return id;
    }
    fail("EINVAL", `pt_id ${ptId} is a ${pt.kind}`);
  }

  /** mock_domain_alloc_nested() (§8.4) / intel_iommu_domain_alloc_nested() (§7.1). */
  private driverAllocNested(d: UserData): { iotlb: number[]; vtd?: MNested["vtd"] } {
    const view = new DataView(d.bytes.buffer, d.bytes.byteOffset, d.bytes.byteLength);
    if (this.profile.driver === "mock") {
      if (d.type !== HWPT_DATA_SELFTEST) fail("EOPNOTSUPP", "data_type is not SELFTEST");
      if (d.bytes.length !== 4) fail("EINVAL", "iommu_hwpt_selftest is 4 bytes");
      return { iotlb: new Array<number>(4).fill(view.getUint32(0, true)) };
    }
    if (d.type !== HWPT_DATA_VTD_S1) fail("EOPNOTSUPP", "data_type is not VTD_S1");
    if (d.bytes.length !== 24) fail("EINVAL", "iommu_hwpt_vtd_s1 is 24 bytes");
    return { iotlb: [], vtd: { flags: view.getBigUint64(0, true), pgtblAddr: view.getBigUint64(8, true), addrWidth: view.getUint32(16, true) } };
  }

  // ---- attach / replace / detach (§4)

  /** iommufd_hwpt_pasid_compat() (§4 step 4). */
  private pasidCompat(h: MHwpt, dev: MDevice, pasid: number): void {
    if (pasid === 0) {
      const pasidsAttached = [...dev.attachments.keys()].some((p) => p !== 0);
      if (!h.pasidCompat && pasidsAttached) fail("EINVAL", "RID onto a non-PASID-compatible HWPT while PASIDs are attached");
    } else {
      if (!h.pasidCompat) fail("EINVAL", "PASID onto a HWPT without the PASID flag");
      const rid = dev.attachments.get(0);
      if (rid !== undefined && !this.hwpt(rid).pasidCompat) fail("EINVAL", "RID is attached to a non-PASID-compatible HWPT");
    }
  }

  /**
   * The driver's attach_dev / set_dev_pasid. Returns the driver state change
   * to commit (the mock's fake-error flag), checking only.
   */
  private driverAttach(h: MHwpt, dev: MDevice, pasid: number): () => void {
    const paging = this.pagingOf(h);
    if (this.profile.driver === "mock") {
      if (pasid === 0) {
        // mock_domain_nop_attach(): a dirty-tracking (paging) domain needs a dirty-capable device.
        if (h.kind === "hwpt_paging" && h.dirty && !dev.dirtyCapable) fail("EINVAL", "NO_DIRTY device onto a dirty-tracking domain");
        return () => {};
      }
      if (!dev.pasidCapable || pasid >= 2 ** PASID_WIDTH) fail("EINVAL", `PASID ${pasid} not supported by the device`);
      if (pasid === PASID_FAKE_ERROR) {
        // mock_domain_set_dev_pasid_nop(): arm on one call, fail (and disarm) the next.
        if (dev.fakeErrorArmed) {
          dev.fakeErrorArmed = false;
          fail("ENOMEM", "mock fake error for PASID 1024");
        }
        return () => {
          dev.fakeErrorArmed = true;
        };
      }
      return () => {};
    }
    // VT-d
    if (pasid !== 0 && (!dev.pasidCapable || pasid >= 2 ** PASID_WIDTH)) fail("EINVAL", `PASID ${pasid} not supported by the device`);
    if (paging.dirty && !dev.dirtyCapable) fail("EINVAL", "device without dirty tracking onto a dirty-tracking domain");
    if (h.kind === "hwpt_nested" && h.vtd !== undefined) {
      // intel_pasid_setup_nested(): addr_width 48 (57 needs FL5LP, absent); SRE needs ECAP.SRS (absent).
      if (h.vtd.addrWidth !== 48) fail("EINVAL", `stage-1 addr_width ${h.vtd.addrWidth}`);
      if (h.vtd.flags & 1n) fail("EINVAL", "SRE without ECAP.SRS");
    }
    return () => {};
  }

  /** iommufd_device_do_attach() checks; returns the commit. */
  private checkAttach(h: MHwpt, dev: MDevice, pasid: number): () => void {
    if (dev.attachments.has(pasid)) fail("EBUSY", `device ${dev.id} already attached for pasid ${pasid}`);
    this.pasidCompat(h, dev, pasid);
    const driverCommit = this.driverAttach(h, dev, pasid);
    return () => {
      driverCommit();
      dev.attachments.set(pasid, h.id);
    };
  }

  /** iommufd_device_do_replace() checks; returns the commit and the HWPT to release. */
  private checkReplace(h: MHwpt, dev: MDevice, pasid: number): () => number | undefined {
    const old = dev.attachments.get(pasid);
    if (old === undefined) fail("EINVAL", `device ${dev.id} not attached for pasid ${pasid}`);
    if (old === h.id) return () => undefined;
    this.pasidCompat(h, dev, pasid);
    const driverCommit = this.driverAttach(h, dev, pasid);
    return () => {
      driverCommit();
      dev.attachments.set(pasid, h.id);
      return old;
    };
  }

  /** AttachDevice: iommufd_device_attach() / _replace(); returns the HWPT id now attached. */
  attach(devId: number, ptId: number, pasid: number, replace: boolean): number {
    const dev = this.device(devId);
    const pt = this.objects.get(ptId);
    if (pt === undefined) fail("ENOENT", `pt_id ${ptId} does not exist`);
    let id: number;
    let release: number | undefined;
    if (pt.kind === "hwpt_paging" || pt.kind === "hwpt_nested") {
      if (replace) release = this.checkReplace(pt, dev, pasid)();
      else this.checkAttach(pt, dev, pasid)();
      id = pt.id;
    } else if (pt.kind === "ioas") {
      [id, release] = this.autoDomain(dev, pasid, pt, replace);
    } else {
      fail("EINVAL", `pt_id ${ptId} is a device`);
    }
    if (release !== undefined) this.release(release);
    return id;
  }

  /**
   * iommufd_device_auto_get_domain() (§4 "Automatic domain"): the first auto
   * HWPT of the IOAS that takes the device (EINVAL = try the next), else a new
   * one with no flags — attached before it joins the IOAS for an attach,
   * after for a replace.
   */
  private autoDomain(dev: MDevice, pasid: number, ioas: MIoas, replace: boolean): [number, number | undefined] {
    for (const hid of ioas.hwpts) {
      const h = this.paging(hid);
      if (!h.auto) continue;
      try {
        if (replace) return [hid, this.checkReplace(h, dev, pasid)()];
        this.checkAttach(h, dev, pasid)();
        return [hid, undefined];
      } catch (e) {
        if (e instanceof ModelFail && e.errno === "EINVAL") continue;
        throw e;
      }
    }
    const id = this.lowestFreeId();
    const h: MPaging = { kind: "hwpt_paging", id, ioasId: ioas.id, auto: true, nestParent: false, dirty: false, pasidCompat: false, largePages: this.filledNow(ioas) };
    let commit: () => number | undefined;
    if (replace) {
      this.checkAddDomain(ioas, false);
      commit = this.checkReplace(h, dev, pasid);
    } else {
      const c = this.checkAttach(h, dev, pasid);
      this.checkAddDomain(ioas, false);
      commit = () => {
        c();
        return undefined;
      };
    }
    this.objects.set(id, h);
    ioas.hwpts.push(id);
    return [id, commit()];
  }

  /** iommufd_hw_pagetable_put(): an auto domain goes with its last device. */
  private release(hwptId: number): void {
    const h = this.hwpt(hwptId);
    if (h.kind === "hwpt_paging" && h.auto && this.users(hwptId) === 1) this.remove(hwptId);
  }

  private remove(id: number): void {
    const o = this.objects.get(id)!;
    if (o.kind === "hwpt_paging") {
      const list = (this.objects.get(o.ioasId) as MIoas).hwpts;
      list.splice(list.indexOf(id), 1);
    }
    this.objects.delete(id);
  }

  /** DetachDevice: a no-op when nothing is attached. */
  detach(devId: number, pasid: number): void {
    const dev = this.device(devId);
    const h = dev.attachments.get(pasid);
    if (h === undefined) return;
    dev.attachments.delete(pasid);
    // The blocking domain's set_dev_pasid clears the mock's fake-error flag.
    if (pasid === PASID_FAKE_ERROR) dev.fakeErrorArmed = false;
    this.release(h);
  }

  /** IOMMU_DESTROY (§3.1) */
  destroy(id: number): void {
    if (!this.objects.has(id)) fail("ENOENT", `object ${id} does not exist`);
    if (this.users(id) !== 1) fail("EBUSY", `object ${id} has ${this.users(id)} users`);
    this.remove(id);
  }

  // ---- invalidation (§3.10, §8.4, §7.1)

  invalidate(hwptId: number, arr: InvalidateArray): number {
    if (arr.entryNum > this.profile.invalidateEntries) fail("EDQUOT", "invalidateEntries", 0);
    if (arr.entryNum !== 0 && (arr.bytes.length === 0 || arr.entryLen === 0)) fail("EINVAL", "entries without data or entry_len", 0);
    const o = this.objects.get(hwptId);
    if (o === undefined) fail("ENOENT", `HWPT ${hwptId} does not exist`, 0);
    if (o.kind !== "hwpt_nested") fail("EINVAL", `${hwptId} is a ${o.kind}`, 0);
    const mock = this.profile.driver === "mock";
    const type = mock ? INVALIDATE_DATA_SELFTEST : INVALIDATE_DATA_VTD_S1;
    const size = mock ? 8 : 24;
    if (arr.type !== type) fail("EINVAL", "invalidation data_type", 0);
    let done = 0;
    for (let i = 0; i < arr.entryNum; i++) {
      // iommu_copy_struct_from_user_array(): entry_len exactly the struct size here; then the copy.
      if (arr.entryLen !== size) fail("EINVAL", `entry_len ${arr.entryLen}`, done);
      const offset = i * arr.entryLen;
      if (offset + size > arr.bytes.length) fail("EFAULT", `entry ${i} beyond the data`, done);
      const v = new DataView(arr.bytes.buffer, arr.bytes.byteOffset + offset, size);
      if (mock) {
        const flags = v.getUint32(0, true);
        const iotlbId = v.getUint32(4, true);
        if (flags & ~1) fail("EOPNOTSUPP", `entry ${i} flags`, done);
        if (iotlbId > 3) fail("EINVAL", `entry ${i} iotlb_id ${iotlbId}`, done);
        if (flags & 1) o.iotlb.fill(0);
        else o.iotlb[iotlbId] = 0;
      } else {
        const addr = v.getBigUint64(0, true);
        const npages = v.getBigUint64(8, true);
        const flags = v.getUint32(16, true);
        if (flags & ~1 || v.getUint32(20, true) !== 0) fail("EOPNOTSUPP", `entry ${i} flags/reserved`, done);
        if (addr % PAGE_SIZE !== 0n || (npages === U64_MAX && addr !== 0n)) fail("EINVAL", `entry ${i} addr`, done);
        // addr 0, npages U64_MAX: everything of this HWPT is flushed (§7.1).
        if (npages === U64_MAX) o.mayBeStale = false;
      }
      done++;
    }
    return done;
  }

  /** DumpIotlb (api.md): mock nested → iotlb values; mock paging → ENOENT; not a HWPT → EINVAL. */
  dumpIotlb(hwptId: number): readonly number[] {
    const o = this.objects.get(hwptId);
    if (o === undefined) fail("ENOENT", `${hwptId} does not exist`);
    if (o.kind !== "hwpt_paging" && o.kind !== "hwpt_nested") fail("EINVAL", `${hwptId} is not a HWPT`);
    if (this.profile.driver === "mock" && o.kind !== "hwpt_nested") fail("ENOENT", "mock paging HWPT has no iotlb");
    return o.kind === "hwpt_nested" ? [...o.iotlb] : [];
  }

  // ---- DMA (api.md Translate)

  /**
   * A device's accesses through whatever it (or the PASID) is attached to:
   * blocked when nothing is; otherwise the paging HWPT's IOAS decides (a mock
   * nested stage 1 is the identity over its parent). A VT-d nested HWPT's
   * walk of the guest's stage-1 tables is not done here: commands.ts hands
   * it to test/reference/reference-walker.ts (written from vtd.md).
   */
  translate(devId: number, pasid: number, iovas: readonly bigint[], write: boolean): TranslateResult {
    const dev = this.device(devId);
    const hid = dev.attachments.get(pasid);
    if (hid === undefined) return { results: iovas.map(() => ({ fault: FAULT_BLOCKED })) };
    const ioas = this.ioas(this.pagingOf(this.hwpt(hid)).ioasId);
    return {
      results: iovas.map((iova) => {
        if (this.profile.driver === "intel_vtd" && iova > this.profile.aperture.last) return { fault: FAULT_BEYOND_MAX_ADDRESS };
        const area = ioas.areas.find((x) => x.iova <= iova && iova <= x.last);
        if (area === undefined) return { fault: FAULT_S2_NOT_PRESENT };
        if (write && !area.write) return { fault: FAULT_NO_WRITE };
        if (!write && !area.read) return { fault: FAULT_NO_READ };
        return { addr: area.hostAddr + (iova - area.iova) };
      }),
    };
  }

  /** ExportVm + ImportVm: a snapshot loses nothing, so nothing observable changes. */
  snapshot(): void {
    for (const o of this.objects.values()) {
      // The imported VM starts with empty caches ("caches are not state").
      if (o.kind === "hwpt_nested") o.mayBeStale = false;
    }
  }

  /** WriteGuestMemory: [gpa, gpa + len) must lie in guest RAM (api.md). */
  writeGuestMemory(gpa: bigint, len: number): void {
    if (gpa + BigInt(len) > this.profile.guestMemoryBytes) fail("EFAULT", "outside guest RAM");
    if (len > 0) for (const o of this.objects.values()) if (o.kind === "hwpt_nested") o.mayBeStale = true;
  }
}
