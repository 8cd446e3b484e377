import { fail, IommuError } from "../../errno.js";
import { faultPoint } from "../../fail-nth.js";
import { hex, type IovaRange } from "../../iova.js";
import {
  copyStructFromUserArray,
  IOMMU_HWPT_INVALIDATE_DATA_VTD_S1,
  IOMMU_VTD_INV_FLAGS_LEAF,
  IOMMU_VTD_S1_EAFE,
  type UserDataArray,
} from "../../uapi.js";
import type { IommuProt, NestedDomain, PagingDomain } from "../driver.js";
import { userInvalidationBlock } from "./psi.js";
import { SecondStageTable } from "./second-stage.js";
import type { TaggedDomain, TaggedParent, VtdCaches } from "./vtd-caches.js";

export const VTD_PAGE_SIZE = 4096n;

/** The stage-1 configuration of a nested domain (struct iommu_hwpt_vtd_s1). */
export interface VtdS1Config {
  /** IOMMU_VTD_S1_SRE / _EAFE / _WPE (and any other bits, unvalidated). */
  readonly flags: bigint;
  /** FSPTPTR: the guest physical address of the stage-1 root table. */
  readonly pgtblAddr: bigint;
  readonly addrWidth: number;
}

/**
 * A second-stage paging domain (a dmar_domain using the second stage): its
 * page table is filled from the IOAS; an unmap flushes what depended on it.
 */
export class VtdPagingDomain implements PagingDomain, TaggedParent {
  readonly type = "paging";
  readonly pgsizeMin = VTD_PAGE_SIZE;
  readonly aperture: IovaRange;
  readonly table: SecondStageTable;
  readonly tags = new Map<number, number>();
  ssTag = -1;
  readonly children = new Set<VtdNestedDomain>();

  constructor(
    private readonly caches: VtdCaches,
    readonly addressWidth: number,
    readonly dirtyTracking: boolean,
    readonly nestParent: boolean,
  ) {
    // domain->geometry.aperture_end = __DOMAIN_MAX_ADDR(gaw)
    this.aperture = { start: 0n, last: (1n << BigInt(addressWidth)) - 1n };
    this.table = new SecondStageTable(addressWidth === 57 ? 5 : 4);
  }

  map(iova: bigint, hostAddr: bigint, length: bigint, prot: IommuProt, largePages: boolean): () => void {
    // IOMMU_HW_INFO_VTD_ERRATA_772415_SPR17: read-only mappings are refused
    // in a domain that serves as a nest parent (intel_iommu_map()).
    if (this.nestParent && !prot.write) {
      fail("EINVAL", `read-only mapping at ${hex(iova)} refused by a VT-d nest-parent domain (ERRATA_772415_SPR17)`);
    }
    return this.table.map(Number(iova >> 12n), Number(hostAddr >> 12n), Number(length >> 12n), prot.read, prot.write, largePages);
  }

  unmap(iova: bigint, length: bigint): void {
    const first = Number(iova >> 12n);
    const pages = Number(length >> 12n);
    this.table.unmap(first, pages);
    this.caches.flushStage2(this, first, pages);
  }

  free(): void {
    this.caches.release(this);
  }
}

/** A nested domain: the guest's first stage (PGTT = 011b) over a nest parent. */
export class VtdNestedDomain implements NestedDomain, TaggedDomain {
  readonly type = "nested";
  readonly tags = new Map<number, number>();
  /** First-stage levels: 4 (addr_width 48) or 5 (57). */
  readonly fsLevels: number;
  /** FSPTPTR as u32 halves. */
  readonly rootLo: number;
  readonly rootHi: number;
  /** EAFE: set the extended-accessed bit with A. */
  readonly eafe: boolean;

  constructor(
    readonly parent: VtdPagingDomain,
    readonly s1: VtdS1Config,
    private readonly caches: VtdCaches,
  ) {
    this.fsLevels = s1.addrWidth === 57 ? 5 : 4;
    const root = s1.pgtblAddr & ~0xfffn;
    this.rootLo = Number(root & 0xffffffffn);
    this.rootHi = Number(root >> 32n);
    this.eafe = (s1.flags & BigInt(IOMMU_VTD_S1_EAFE)) !== 0n;
    parent.children.add(this);
  }

  /** intel_nested_cache_invalidate_user() */
  cacheInvalidateUser(array: UserDataArray, start: number, end: number): number {
    if (array.type !== IOMMU_HWPT_INVALIDATE_DATA_VTD_S1) {
      throw new IommuError("EINVAL", `invalidation data_type ${array.type} is not IOMMU_HWPT_INVALIDATE_DATA_VTD_S1`, 0);
    }
    let processed = start;
    try {
      for (let i = start; i < end; i++) {
        // struct iommu_hwpt_vtd_s1_invalidate, min_last __reserved: exactly 24 bytes
        const inv = copyStructFromUserArray(array, IOMMU_HWPT_INVALIDATE_DATA_VTD_S1, i, 24, 24);
        const addrLo = inv.getUint32(0, true);
        const addrHi = inv.getUint32(4, true);
        const npagesLo = inv.getUint32(8, true);
        const npagesHi = inv.getUint32(12, true);
        const flags = inv.getUint32(16, true);
        if (flags & ~IOMMU_VTD_INV_FLAGS_LEAF || inv.getUint32(20, true) !== 0) {
          fail("EOPNOTSUPP", `entry ${i}: unknown flags 0x${flags.toString(16)} or non-zero __reserved`);
        }
        const all = npagesLo === 0xffffffff && npagesHi === 0xffffffff;
        if ((addrLo & 0xfff) !== 0 || (all && (addrLo | addrHi) !== 0)) {
          fail("EINVAL", `entry ${i}: addr is not 4 KiB aligned, or npages U64_MAX with addr != 0`);
        }
        // [addr, addr + npages * 4 KiB), in pages: exact as numbers below 2^52.
        const pfn = addrHi * 2 ** 20 + (addrLo >>> 12);
        const npages = npagesHi >= 2 ** 20 ? Infinity : npagesHi * 2 ** 32 + npagesLo;
        // The entry's flush (intel_nested_flush_cache() -> qi_submit_sync()).
        faultPoint("intel_nested_flush_cache");
        this.caches.flushNested(this, userInvalidationBlock(pfn, npages), (flags & IOMMU_VTD_INV_FLAGS_LEAF) !== 0);
        processed++;
      }
    } catch (e) {
      if (e instanceof IommuError) throw e.withEntriesHandled(processed);
      throw e;
    }
    return processed;
  }

  free(): void {
    this.caches.release(this);
    this.parent.children.delete(this);
  }
}
