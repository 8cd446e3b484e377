import type { DeviceInfo, NestedDomain, PagingDomain, UserData } from "./drivers/driver.js";
import type { GuestMemory } from "./guest-memory.js";
import { IoPagetable } from "./io-pagetable.js";
import type { Limits } from "./limits.js";

/**
 * The objects of one iommufd context (iommufd_private.h): each has an id in
 * the context's single id space and a `users` count whose first reference is
 * the object table's own. IOMMU_DESTROY succeeds only at users == 1.
 */
export type ObjectType = "ioas" | "hwpt_paging" | "hwpt_nested" | "device";

export abstract class IommufdObject {
  /** 0 until iommufd_object_alloc() reserves an id. */
  id = 0;
  users = 1;
  abstract readonly type: ObjectType;
  /** The type's iommufd_object_ops.destroy: drop what the object holds. */
  abstract destroy(): void;
}

/** struct iommufd_ioas: an IOVA address space. */
export class Ioas extends IommufdObject {
  readonly type = "ioas";
  readonly iopt: IoPagetable;
  /** ioas->hwpt_list: paging HWPTs allocated on this IOAS, in creation order. */
  readonly hwpts: HwptPaging[] = [];

  constructor(memory: GuestMemory, limits: Limits) {
    super();
    this.iopt = new IoPagetable(memory, limits);
  }

  /** iommufd_ioas_destroy(): no HWPT holds it, so no domain is left to unmap from. */
  destroy(): void {
    this.iopt.unmapAll();
  }
}

/** struct iommufd_hwpt_paging: a paging domain filled from an IOAS. */
export class HwptPaging extends IommufdObject {
  readonly type = "hwpt_paging";
  /** Created implicitly by attaching a device to the IOAS. */
  autoDomain = false;

  constructor(
    readonly ioas: Ioas,
    readonly domain: PagingDomain,
    readonly nestParent: boolean,
    /** IOMMU_HWPT_ALLOC_PASID: may be attached to a PASID. */
    readonly pasidCompat: boolean,
  ) {
    super();
  }

  /** iommufd_hwpt_paging_destroy(): leave the IOAS, dropping the domain's reservations. */
  destroy(): void {
    const list = this.ioas.hwpts;
    const index = list.indexOf(this);
    if (index >= 0) {
      list.splice(index, 1);
      this.ioas.iopt.tableRemoveDomain(this.domain);
    }
    this.domain.free();
    this.ioas.users--;
  }
}

/** struct iommufd_hwpt_nested: a user-managed stage 1 over a paging parent. */
export class HwptNested extends IommufdObject {
  readonly type = "hwpt_nested";

  constructor(
    readonly parent: HwptPaging,
    readonly domain: NestedDomain,
    readonly pasidCompat: boolean,
    /** The user data it was allocated with (kept for snapshots). */
    readonly userData: UserData,
  ) {
    super();
  }

  /** iommufd_hwpt_nested_destroy() */
  destroy(): void {
    this.domain.free();
    this.parent.users--;
  }
}

export type Hwpt = HwptPaging | HwptNested;

/** find_hwpt_paging(): the paging HWPT whose IOAS backs an attachment. */
export function hwptPagingOf(hwpt: Hwpt): HwptPaging {
  return hwpt.type === "hwpt_paging" ? hwpt : hwpt.parent;
}

/**
 * struct iommufd_device: a bound device. Every emulated device is alone in its
 * IOMMU group (as mock devices are), so the group's per-PASID attach records
 * (igroup->pasid_attach) live here, keyed by PASID (0 = IOMMU_NO_PASID).
 */
export class Device extends IommufdObject implements DeviceInfo {
  readonly type = "device";
  readonly attachments = new Map<number, Hwpt>();

  constructor(
    readonly name: string,
    readonly pasidCapable: boolean,
    readonly dirtyTrackingCapable: boolean,
  ) {
    super();
    // The binding driver is a user until unbind (iommufd_device_bind()).
    this.users++;
  }

  /** iommufd_device_destroy(): reached only through unbind, after every detach. */
  destroy(): void {}
}
