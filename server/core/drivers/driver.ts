import type { IovaRange } from "../iova.js";
import type { DmaBatch } from "../translate/dma-batch.js";
import type { UserDataArray } from "../uapi.js";

/**
 * The driver interface every emulated IOMMU model implements: the part of
 * struct iommu_ops / iommu_domain_ops that iommufd reaches. A new model is a
 * new folder next to this file; the core only talks to these types.
 */

/** IOMMU_READ / IOMMU_WRITE of a mapping. */
export interface IommuProt {
  readonly read: boolean;
  readonly write: boolean;
}

/** IOMMU_HWPT_ALLOC_* flags as the driver sees them (FAULT_ID_VALID stripped). */
export interface HwptAllocFlags {
  readonly nestParent: boolean;
  readonly dirtyTracking: boolean;
  readonly pasid: boolean;
}

/** struct iommu_user_data: a driver data type and the struct bytes. */
export interface UserData {
  readonly type: number;
  readonly data: Uint8Array;
}

/** What a driver knows of a bound device (its struct device + probe state). */
export interface DeviceInfo {
  readonly name: string;
  readonly pasidCapable: boolean;
  readonly dirtyTrackingCapable: boolean;
}

/** An iommu_domain of type IOMMU_DOMAIN_PAGING: an I/O page table. */
export interface PagingDomain {
  readonly type: "paging";
  /** domain->geometry: the IOVA window the domain can translate. */
  readonly aperture: IovaRange;
  /** 1 << __ffs(pgsize_bitmap): the smallest page the domain maps. */
  readonly pgsizeMin: bigint;
  /** Allocated with IOMMU_HWPT_ALLOC_DIRTY_TRACKING (has dirty_ops). */
  readonly dirtyTracking: boolean;
  /** Allocated with IOMMU_HWPT_ALLOC_NEST_PARENT. */
  readonly nestParent: boolean;
  /**
   * iommu_map(): map [iova, iova + length) to guest RAM at hostAddr.
   * `largePages` is false when the IOAS has HUGE_PAGES = 0. Throws an
   * IommuError for a mapping the domain refuses or cannot allocate for;
   * changes nothing then (iommu_map() unmaps what it mapped on error).
   * Returns the map's exact undo, for the unwind of the call that made it
   * (iopt_area_unfill_domains() on an error path): the range was never
   * visible to DMA, so there is nothing to flush, and the undo gives back
   * the page-table pages the map took, leaving the table as it was. Undos
   * of one domain must run newest first.
   */
  map(iova: bigint, hostAddr: bigint, length: bigint, prot: IommuProt, largePages: boolean): () => void;
  /** iommu_unmap() of a range map() accepted; drops what caches derived from it. */
  unmap(iova: bigint, length: bigint): void;
  /** iommu_domain_free(): the HWPT is destroyed. */
  free(): void;
}

/** An iommu_domain of type IOMMU_DOMAIN_NESTED: a user-owned stage 1. */
export interface NestedDomain {
  readonly type: "nested";
  readonly parent: PagingDomain;
  /**
   * cache_invalidate_user() of entries [start, end) of the array (the whole
   * array in one call, or a long one in ranges: see HwptInvalidation): in
   * order, stopping at the first failure. The array-level checks run on
   * every call, entry_num 0 included. Returns the entries handled in all
   * (`end`); a failure is an IommuError whose entriesHandled is the index of
   * the entry that failed.
   */
  cacheInvalidateUser(array: UserDataArray, start: number, end: number): number;
  /** iommu_domain_free(): the HWPT is destroyed. */
  free(): void;
}

export type IommuDomain = PagingDomain | NestedDomain;

export interface IommuDriver {
  /** PASID width of the device's IOMMU for a PASID-capable device. */
  readonly pasidWidth: number;
  /** Translations the IOTLB holds now. */
  readonly iotlbOccupancy: number;
  /** Cached translations dropped by invalidations (user or stage-2 driven), ever. */
  readonly iotlbEntriesInvalidated: number;

  /**
   * domain_alloc_paging_flags(): a paging domain for `dev`. The core has
   * already checked the flags it owns (iommufd_hwpt_paging_alloc()).
   */
  allocPaging(dev: DeviceInfo, flags: HwptAllocFlags, userData: UserData | undefined): PagingDomain;

  /**
   * domain_alloc_nested(): a nested domain over a paging parent of this
   * driver. Absent for a model without nesting (the core then answers
   * EOPNOTSUPP, as for a driver without the op).
   */
  allocNested?(dev: DeviceInfo, parent: PagingDomain, flags: HwptAllocFlags, userData: UserData): NestedDomain;

  /**
   * attach_dev() for the RID (pasid 0) or set_dev_pasid() for a PASID:
   * the driver's compatibility checks. `old` is the domain being replaced.
   * Throws on refusal and then changes nothing.
   */
  attachDev(domain: IommuDomain, dev: DeviceInfo, pasid: number, old: IommuDomain | undefined): void;

  /** The blocking domain's set_dev_pasid()/attach_dev() on detach. */
  detachDev(dev: DeviceInfo, pasid: number): void;

  /**
   * hw_info(): the driver struct IOMMU_GET_HW_INFO returns for a requested
   * type (IOMMU_HW_INFO_TYPE_DEFAULT = 0 picks the driver's own); an
   * unsupported type is EOPNOTSUPP.
   */
  hwInfo(dev: DeviceInfo, type: number): { type: number; data: Uint8Array };

  /**
   * What a domain's caches hold (IOMMU_TEST_OP_MD_CHECK_IOTLB made general):
   * the mock's iotlb values or IOTLB entries. Throws for a domain that has
   * nothing to show (the mock's paging domains: ENOENT).
   */
  dumpIotlb(domain: IommuDomain): IotlbDump;

  /** Restore what dumpIotlb() showed as selftestIotlb (a snapshot of a mock nested domain). */
  restoreSelftestIotlb?(domain: NestedDomain, values: readonly number[]): void;

  /** MOCK: whether the device's fake PASID replace error is armed, and its restore. */
  selftestPasidFakeError?(dev: DeviceInfo): boolean;
  restoreSelftestPasidFakeError?(dev: DeviceInfo, armed: boolean): void;

  /**
   * A device's DMA through `domain` for requests with `pasid` (0 = without
   * PASID): fills accesses [start, end) of the batch and its counters.
   */
  translate(domain: IommuDomain, pasid: number, batch: DmaBatch, start: number, end: number): void;
}

/** One cached translation as DumpIotlb reports it. */
export interface IotlbEntryInfo {
  readonly iova: bigint;
  readonly pageSize: bigint;
  readonly address: bigint;
  readonly readable: boolean;
  readonly writeable: boolean;
  readonly pasid: number | undefined;
}

export interface IotlbDump {
  readonly selftestIotlb: readonly number[];
  readonly entries: readonly IotlbEntryInfo[];
}
