import { fail, IommuError } from "../../errno.js";
import { hex, type IovaRange, U64_MAX } from "../../iova.js";
import {
  copyStructFromUserArray,
  IOMMU_HW_INFO_TYPE_DEFAULT,
  IOMMU_HW_INFO_TYPE_INTEL_VTD,
  IOMMU_HW_INFO_VTD_ERRATA_772415_SPR17,
  IOMMU_HWPT_DATA_VTD_S1,
  IOMMU_HWPT_INVALIDATE_DATA_VTD_S1,
  IOMMU_VTD_INV_FLAGS_LEAF,
  IOMMU_VTD_S1_EAFE,
  IOMMU_VTD_S1_SRE,
  type UserDataArray,
} from "../../uapi.js";
import type {
  DeviceInfo,
  HwptAllocFlags,
  IommuDomain,
  IommuDriver,
  IommuProt,
  IotlbDump,
  NestedDomain,
  PagingDomain,
  UserData,
} from "../driver.js";
import { CAP_FL5LP, ECAP_EAFS, ECAP_SRS, type VtdCaps, vtdCaps } from "./caps.js";
import { type PsiRange, userInvalidationRange } from "./psi.js";

/**
 * The emulated Intel VT-d in scalable mode (drivers/iommu/intel/): paging
 * domains are second-stage tables; nested domains put a guest first stage on
 * top of a nest-parent second stage.
 */

/** ECAP.PSS + 1: 20-bit PASIDs. */
export const VTD_PASID_WIDTH = 20;
export const VTD_PAGE_SIZE = 4096n;

export interface VtdConfig {
  /** CAP.FL5LP and 5-level (57-bit) second-stage tables. */
  readonly fiveLevel: boolean;
}

/** The stage-1 configuration of a nested domain (struct iommu_hwpt_vtd_s1). */
export interface VtdS1Config {
  /** IOMMU_VTD_S1_SRE / _EAFE / _WPE (and any other bits, unvalidated). */
  readonly flags: bigint;
  /** FSPTPTR: the guest physical address of the stage-1 root table. */
  readonly pgtblAddr: bigint;
  readonly addrWidth: number;
}

/** Where nested-domain invalidations land: the emulated IOTLB and PSCs. */
export interface VtdCacheFlusher {
  /** Drop what `domain` caches for inputs in `range`; leaf = keep paging-structure caches (IH = 1). */
  flushNested(domain: VtdNestedDomain, range: PsiRange, leaf: boolean): void;
}

/** A second-stage paging domain (struct dmar_domain with use_first_level = false). */
export class VtdPagingDomain implements PagingDomain {
  readonly type = "paging";
  readonly pgsizeMin = VTD_PAGE_SIZE;
  readonly aperture: IovaRange;

  constructor(
    readonly addressWidth: number,
    readonly dirtyTracking: boolean,
    readonly nestParent: boolean,
  ) {
    // domain->geometry.aperture_end = __DOMAIN_MAX_ADDR(gaw)
    this.aperture = { start: 0n, last: (1n << BigInt(addressWidth)) - 1n };
  }

  map(iova: bigint, _hostAddr: bigint, _length: bigint, prot: IommuProt, _largePages: boolean): void {
    // IOMMU_HW_INFO_VTD_ERRATA_772415_SPR17: read-only mappings are refused
    // in a domain that serves as a nest parent (intel_iommu_map()).
    if (this.nestParent && !prot.write) {
      fail("EINVAL", `read-only mapping at ${hex(iova)} refused by a VT-d nest-parent domain (ERRATA_772415_SPR17)`);
    }
  }

  unmap(_iova: bigint, _length: bigint): void {}
}

/** A nested domain: the guest's first stage (PGTT = 011b) over a nest parent. */
export class VtdNestedDomain implements NestedDomain {
  readonly type = "nested";

  constructor(
    readonly parent: VtdPagingDomain,
    readonly s1: VtdS1Config,
    private readonly caches: VtdCacheFlusher,
  ) {}

  /** intel_nested_cache_invalidate_user() */
  cacheInvalidateUser(array: UserDataArray): number {
    if (array.type !== IOMMU_HWPT_INVALIDATE_DATA_VTD_S1) {
      throw new IommuError("EINVAL", `invalidation data_type ${array.type} is not IOMMU_HWPT_INVALIDATE_DATA_VTD_S1`, 0);
    }
    let processed = 0;
    try {
      for (let i = 0; i < array.entryNum; i++) {
        // struct iommu_hwpt_vtd_s1_invalidate, min_last __reserved: exactly 24 bytes
        const inv = copyStructFromUserArray(array, IOMMU_HWPT_INVALIDATE_DATA_VTD_S1, i, 24, 24);
        const addr = inv.getBigUint64(0, true);
        const npages = inv.getBigUint64(8, true);
        const flags = inv.getUint32(16, true);
        if (flags & ~IOMMU_VTD_INV_FLAGS_LEAF || inv.getUint32(20, true) !== 0) {
          fail("EOPNOTSUPP", `entry ${i}: unknown flags 0x${flags.toString(16)} or non-zero __reserved`);
        }
        if (addr % VTD_PAGE_SIZE !== 0n || (npages === U64_MAX && addr !== 0n)) {
          fail("EINVAL", `entry ${i}: addr ${hex(addr)} is not 4 KiB aligned, or npages U64_MAX with addr != 0`);
        }
        this.caches.flushNested(this, userInvalidationRange(addr, npages), (flags & IOMMU_VTD_INV_FLAGS_LEAF) !== 0);
        processed++;
      }
    } catch (e) {
      if (e instanceof IommuError) throw new IommuError(e.errno, e.message, processed);
      throw e;
    }
    return processed;
  }
}

export class VtdDriver implements IommuDriver {
  readonly pasidWidth = VTD_PASID_WIDTH;
  readonly caps: VtdCaps;

  constructor(
    readonly config: VtdConfig,
    private readonly caches: VtdCacheFlusher,
  ) {
    this.caps = vtdCaps(config.fiveLevel);
  }

  /** The second-stage input width: SAGAW 4-level (48) or 5-level (57). */
  get addressWidth(): number {
    return this.config.fiveLevel ? 57 : 48;
  }

  /** intel_iommu_domain_alloc_paging_flags(): no user data for a paging domain. */
  allocPaging(_dev: DeviceInfo, flags: HwptAllocFlags, userData: UserData | undefined): PagingDomain {
    if (userData !== undefined) fail("EOPNOTSUPP", "VT-d takes no user data for a paging domain");
    return new VtdPagingDomain(this.addressWidth, flags.dirtyTracking, flags.nestParent);
  }

  /**
   * intel_iommu_domain_alloc_nested(): type IOMMU_HWPT_DATA_VTD_S1 of exactly
   * 24 bytes. The fields are only validated at attach (domain_setup_nested()).
   */
  allocNested(_dev: DeviceInfo, parent: PagingDomain, _flags: HwptAllocFlags, userData: UserData): NestedDomain {
    if (userData.type !== IOMMU_HWPT_DATA_VTD_S1) fail("EOPNOTSUPP", `data_type ${userData.type} is not IOMMU_HWPT_DATA_VTD_S1`);
    if (!(parent instanceof VtdPagingDomain) || !parent.nestParent) fail("EINVAL", "the parent is not a VT-d nest-parent domain");
    if (userData.data.length !== 24) fail("EINVAL", `data_len ${userData.data.length} is not 24 (struct iommu_hwpt_vtd_s1)`);
    const view = new DataView(userData.data.buffer, userData.data.byteOffset, 24);
    const s1 = { flags: view.getBigUint64(0, true), pgtblAddr: view.getBigUint64(8, true), addrWidth: view.getUint32(16, true) };
    return new VtdNestedDomain(parent, s1, this.caches);
  }

  /** intel_pasid_setup_nested(): the stage-1 configuration must suit the unit. */
  private checkS1Config(s1: VtdS1Config): void {
    if (s1.addrWidth !== 48 && !(s1.addrWidth === 57 && this.caps.cap & CAP_FL5LP)) {
      fail("EINVAL", `stage-1 addr_width ${s1.addrWidth} is not supported (48${this.caps.cap & CAP_FL5LP ? " or 57" : ""})`);
    }
    if (s1.flags & BigInt(IOMMU_VTD_S1_SRE) && !(this.caps.ecap & ECAP_SRS)) fail("EINVAL", "SRE needs ECAP.SRS, which this unit lacks");
    if (s1.flags & BigInt(IOMMU_VTD_S1_EAFE) && !(this.caps.ecap & ECAP_EAFS)) fail("EINVAL", "EAFE needs ECAP.EAFS, which this unit lacks");
  }

  /** intel_iommu_attach_device() / intel_nested_attach_dev() / set_dev_pasid(). */
  attachDev(domain: IommuDomain, dev: DeviceInfo, pasid: number, _old: IommuDomain | undefined): void {
    if (pasid !== 0 && (!dev.pasidCapable || pasid >= 2 ** VTD_PASID_WIDTH)) {
      fail("EINVAL", `PASID ${pasid} is not supported by the device`);
    }
    // paging_domain_compatible() of the domain, or of a nested domain's parent:
    // a dirty-tracking domain needs second-stage A/D for the device.
    const paging = domain.type === "paging" ? domain : domain.parent;
    if (paging.dirtyTracking && !dev.dirtyTrackingCapable) {
      fail("EINVAL", "a device without dirty tracking cannot attach to a dirty-tracking domain");
    }
    if (domain instanceof VtdNestedDomain) this.checkS1Config(domain.s1);
  }

  detachDev(_dev: DeviceInfo, _pasid: number): void {}

  /** intel_iommu_hw_info(): struct iommu_hw_info_vtd. */
  hwInfo(_dev: DeviceInfo, type: number): { type: number; data: Uint8Array } {
    if (type !== IOMMU_HW_INFO_TYPE_DEFAULT && type !== IOMMU_HW_INFO_TYPE_INTEL_VTD) {
      fail("EOPNOTSUPP", `hw_info type ${type} is not supported by VT-d`);
    }
    const view = new DataView(new ArrayBuffer(24));
    view.setUint32(0, IOMMU_HW_INFO_VTD_ERRATA_772415_SPR17, true);
    view.setBigUint64(8, this.caps.cap, true);
    view.setBigUint64(16, this.caps.ecap, true);
    return { type: IOMMU_HW_INFO_TYPE_INTEL_VTD, data: new Uint8Array(view.buffer) };
  }

  dumpIotlb(_domain: IommuDomain): IotlbDump {
    return { selftestIotlb: [], entries: [] };
  }
}
