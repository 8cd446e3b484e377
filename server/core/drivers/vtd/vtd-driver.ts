import { fail } from "../../errno.js";
import { faultPoint } from "../../fail-nth.js";
import type { GuestMemory } from "../../guest-memory.js";
import type { DmaBatch } from "../../translate/dma-batch.js";
import {
  IOMMU_HW_INFO_TYPE_DEFAULT,
  IOMMU_HW_INFO_TYPE_INTEL_VTD,
  IOMMU_HW_INFO_VTD_ERRATA_772415_SPR17,
  IOMMU_HWPT_DATA_VTD_S1,
  IOMMU_VTD_S1_EAFE,
  IOMMU_VTD_S1_SRE,
} from "../../uapi.js";
import type {
  DeviceInfo,
  HwptAllocFlags,
  IommuDomain,
  IommuDriver,
  IotlbDump,
  IotlbEntryInfo,
  NestedDomain,
  PagingDomain,
  UserData,
} from "../driver.js";
import { CAP_FL5LP, ECAP_EAFS, ECAP_SRS, ECAP_SSADS, type VtdCaps, vtdCaps } from "./caps.js";
import { VtdNestedDomain, VtdPagingDomain, type VtdS1Config } from "./domains.js";
import { VtdCaches } from "./vtd-caches.js";
import { PERM_R, PERM_W, VtdWalker } from "./walker.js";

/**
 * The emulated Intel VT-d in scalable mode (drivers/iommu/intel/): paging
 * domains are second-stage tables; nested domains put a guest first stage on
 * top of a nest-parent second stage. One instance per VM: one emulated unit
 * with its IOTLB and paging-structure caches.
 */

/** ECAP.PSS + 1: 20-bit PASIDs. */
export const VTD_PASID_WIDTH = 20;

export interface VtdConfig {
  /** CAP.FL5LP and 5-level (57-bit) second-stage tables. */
  readonly fiveLevel: boolean;
  /** IOTLB capacity in translations (0 disables it). */
  readonly iotlbEntries: number;
  readonly pagingStructureCaches: boolean;
}

export class VtdDriver implements IommuDriver {
  readonly pasidWidth = VTD_PASID_WIDTH;
  readonly caps: VtdCaps;
  readonly caches: VtdCaches;
  readonly walker: VtdWalker;

  constructor(
    readonly config: VtdConfig,
    memory: GuestMemory,
  ) {
    this.caps = vtdCaps(config.fiveLevel);
    this.caches = new VtdCaches(config.iotlbEntries, config.pagingStructureCaches);
    this.walker = new VtdWalker(memory, this.caches);
  }

  get iotlbOccupancy(): number {
    return this.caches.iotlb.size;
  }

  get iotlbEntriesInvalidated(): number {
    return this.caches.iotlbDropped;
  }

  /** The second-stage input width: SAGAW 4-level (48) or 5-level (57). */
  get addressWidth(): number {
    return this.config.fiveLevel ? 57 : 48;
  }

  /** intel_iommu_domain_alloc_paging_flags(): no user data for a paging domain. */
  allocPaging(_dev: DeviceInfo, flags: HwptAllocFlags, userData: UserData | undefined): PagingDomain {
    if (userData !== undefined) fail("EOPNOTSUPP", "VT-d takes no user data for a paging domain");
    // paging_domain_alloc(): the dmar_domain and its top-level table.
    faultPoint("intel_iommu_domain_alloc_paging_flags");
    return new VtdPagingDomain(this.caches, this.addressWidth, flags.dirtyTracking, flags.nestParent);
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
    // The dmar_domain's kzalloc(), before it joins the parent's s1_domains.
    faultPoint("intel_iommu_domain_alloc_nested");
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
    // domain_attach_iommu(): the per-unit attach record (kzalloc).
    faultPoint("domain_attach_iommu");
  }

  detachDev(_dev: DeviceInfo, _pasid: number): void {}

  /**
   * intel_iommu_hw_info(): struct iommu_hw_info_vtd. A device that can track
   * dirty pages sits behind a unit with second-stage A/D (ECAP.SSADS): that is
   * where Linux's IOMMU_CAP_DIRTY_TRACKING for VT-d comes from.
   */
  hwInfo(dev: DeviceInfo, type: number): { type: number; data: Uint8Array } {
    if (type !== IOMMU_HW_INFO_TYPE_DEFAULT && type !== IOMMU_HW_INFO_TYPE_INTEL_VTD) {
      fail("EOPNOTSUPP", `hw_info type ${type} is not supported by VT-d`);
    }
    const view = new DataView(new ArrayBuffer(24));
    view.setUint32(0, IOMMU_HW_INFO_VTD_ERRATA_772415_SPR17, true);
    view.setBigUint64(8, this.caps.cap, true);
    view.setBigUint64(16, this.caps.ecap | (dev.dirtyTrackingCapable ? ECAP_SSADS : 0n), true);
    return { type: IOMMU_HW_INFO_TYPE_INTEL_VTD, data: new Uint8Array(view.buffer) };
  }

  /** The IOTLB entries tagged with the domain, for every PASID it serves. */
  dumpIotlb(domain: IommuDomain): IotlbDump {
    const iotlb = this.caches.iotlb;
    const entries: IotlbEntryInfo[] = [];
    for (const [pasid, tag] of (domain as VtdPagingDomain | VtdNestedDomain).tags) {
      for (const e of iotlb.entriesOf(tag)) {
        entries.push({
          iova: iotlb.inputAddress(e),
          pageSize: 1n << BigInt(iotlb.shifts[iotlb.cls[e]]),
          address: BigInt(iotlb.addr[e]),
          readable: (iotlb.perm[e] & PERM_R) !== 0,
          writeable: (iotlb.perm[e] & PERM_W) !== 0,
          pasid: pasid === 0 ? undefined : pasid,
        });
      }
    }
    entries.sort((a, b) => (a.iova < b.iova ? -1 : a.iova > b.iova ? 1 : (a.pasid ?? -1) - (b.pasid ?? -1)));
    return { selftestIotlb: [], entries };
  }

  translate(domain: IommuDomain, pasid: number, batch: DmaBatch, start: number, end: number): void {
    this.walker.translate(domain as VtdPagingDomain | VtdNestedDomain, pasid, batch, start, end);
  }
}
