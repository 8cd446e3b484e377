import { fail } from "../../errno.js";
import { hex, type IovaRange } from "../../iova.js";
import type { DeviceInfo, HwptAllocFlags, IommuDomain, IommuDriver, IommuProt, PagingDomain, UserData } from "../driver.js";

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

/** A second-stage paging domain (struct dmar_domain with use_first_level = false). */
class VtdPagingDomain implements PagingDomain {
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

export class VtdDriver implements IommuDriver {
  readonly pasidWidth = VTD_PASID_WIDTH;

  constructor(readonly config: VtdConfig) {}

  /** The second-stage input width: SAGAW 4-level (48) or 5-level (57). */
  get addressWidth(): number {
    return this.config.fiveLevel ? 57 : 48;
  }

  /** intel_iommu_domain_alloc_paging_flags(): no user data for a paging domain. */
  allocPaging(_dev: DeviceInfo, flags: HwptAllocFlags, userData: UserData | undefined): PagingDomain {
    if (userData !== undefined) fail("EOPNOTSUPP", "VT-d takes no user data for a paging domain");
    return new VtdPagingDomain(this.addressWidth, flags.dirtyTracking, flags.nestParent);
  }

  /** intel_iommu_attach_device() / intel_iommu_set_dev_pasid() compatibility checks. */
  attachDev(domain: IommuDomain, dev: DeviceInfo, pasid: number, _old: IommuDomain | undefined): void {
    // paging_domain_compatible(): a dirty-tracking domain needs SSADS for the device.
    if (domain.type === "paging" && domain.dirtyTracking && !dev.dirtyTrackingCapable) {
      fail("EINVAL", "a device without dirty tracking cannot attach to a dirty-tracking domain");
    }
    if (pasid !== 0 && (!dev.pasidCapable || pasid >= 2 ** VTD_PASID_WIDTH)) {
      fail("EINVAL", `PASID ${pasid} is not supported by the device`);
    }
  }

  detachDev(_dev: DeviceInfo, _pasid: number): void {}
}
