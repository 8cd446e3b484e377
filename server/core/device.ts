import type { IommufdContext } from "./context.js";
import { fail } from "./errno.js";
import { faultPoint } from "./fail-nth.js";
import { hwPagetablePut, hwptPagingAlloc } from "./hwpt.js";
import { Device, type Hwpt, type Ioas } from "./objects.js";
import { IOMMU_HW_CAP_DIRTY_TRACKING, IOMMU_HW_INFO_TYPE_DEFAULT } from "./uapi.js";

/**
 * Device binding and attachment (device.c). Every emulated device is alone in
 * its IOMMU group, so the group's attach record for a PASID is the device's.
 * PASID 0 is IOMMU_NO_PASID, the RID path.
 */
export const IOMMU_NO_PASID = 0;

const NO_FLAGS = { nestParent: false, dirtyTracking: false, pasid: false } as const;

export interface BindCmd {
  name: string;
  pasidCapable: boolean;
  dirtyTrackingCapable: boolean;
}

/** VFIO_DEVICE_BIND_IOMMUFD -> iommufd_device_bind() */
export function deviceBind(ctx: IommufdContext, cmd: BindCmd): number {
  if (cmd.name.length === 0 || cmd.name.length > 255) fail("EINVAL", "device name must be 1 to 255 characters");
  if (ctx.devicesByName.has(cmd.name)) fail("EEXIST", `a device named "${cmd.name}" is already bound`);
  // iommufd_get_group(): the device's iommufd_group (kzalloc).
  faultPoint("iommufd_get_group");
  const idev = new Device(cmd.name, cmd.pasidCapable, cmd.dirtyTrackingCapable);
  ctx.reserve(idev);
  ctx.finalize(idev);
  ctx.devicesByName.set(cmd.name, idev);
  return idev.id;
}

/** VFIO unbind: detach every PASID and the RID, then iommufd_device_unbind(). */
export function deviceUnbind(ctx: IommufdContext, devId: number): void {
  const idev = ctx.getDevice(devId);
  for (const pasid of [...idev.attachments.keys()].sort((a, b) => b - a)) deviceDetach(ctx, idev.id, pasid);
  ctx.devicesByName.delete(idev.name);
  ctx.remove(idev);
  idev.destroy();
}

/**
 * iommufd_hwpt_pasid_compat(): a RID attachment of a non-PASID-compatible
 * HWPT excludes PASID attachments, and a PASID needs a PASID-compatible HWPT.
 */
function hwptPasidCompat(hwpt: Hwpt, idev: Device, pasid: number): void {
  if (pasid === IOMMU_NO_PASID) {
    if (!hwpt.pasidCompat && idev.attachments.size > (idev.attachments.has(IOMMU_NO_PASID) ? 1 : 0)) {
      fail("EINVAL", `HWPT ${hwpt.id} is not PASID-compatible and PASIDs of device ${idev.id} are attached`);
    }
  } else {
    if (!hwpt.pasidCompat) fail("EINVAL", `HWPT ${hwpt.id} was not allocated with the PASID flag`);
    const rid = idev.attachments.get(IOMMU_NO_PASID);
    if (rid !== undefined && !rid.pasidCompat) {
      fail("EINVAL", `the RID of device ${idev.id} is attached to HWPT ${rid.id}, which is not PASID-compatible`);
    }
  }
}

/** iommufd_hw_pagetable_attach(): attach one (device, PASID) to a HWPT. */
export function hwPagetableAttach(ctx: IommufdContext, hwpt: Hwpt, idev: Device, pasid: number): void {
  // xa_cmpxchg() of the group's pasid_attach slot and the attach record's kzalloc().
  faultPoint("iommufd_hw_pagetable_attach");
  if (idev.attachments.has(pasid)) fail("EBUSY", `device ${idev.id} is already attached${pasid ? ` for PASID ${pasid}` : ""}`);
  // The device's reserved regions would be enforced in the IOAS here for a
  // RID attach; emulated devices (like mock ones) have none.
  hwptPasidCompat(hwpt, idev, pasid);
  // iommufd_hwpt_attach_device(): the attach handle's kzalloc().
  faultPoint("iommufd_hwpt_attach_device");
  ctx.driver.attachDev(hwpt.domain, idev, pasid, undefined);
  hwpt.users++;
  idev.attachments.set(pasid, hwpt);
}

/** iommufd_hw_pagetable_detach(): returns the HWPT whose reference the caller drops. */
export function hwPagetableDetach(ctx: IommufdContext, idev: Device, pasid: number): Hwpt | undefined {
  const hwpt = idev.attachments.get(pasid);
  if (hwpt === undefined) return undefined;
  idev.attachments.delete(pasid);
  ctx.driver.detachDev(idev, pasid);
  return hwpt;
}

/** An attach function of iommufd_device_change_pt(): returns a HWPT to put. */
type AttachFn = (ctx: IommufdContext, idev: Device, pasid: number, hwpt: Hwpt) => Hwpt | undefined;

/** iommufd_device_do_attach() */
const doAttach: AttachFn = (ctx, idev, pasid, hwpt) => {
  hwPagetableAttach(ctx, hwpt, idev, pasid);
  return undefined;
};

/** iommufd_device_do_replace(): the old HWPT is released only once the new one is in. */
const doReplace: AttachFn = (ctx, idev, pasid, hwpt) => {
  const old = idev.attachments.get(pasid);
  if (old === undefined) fail("EINVAL", `device ${idev.id} is not attached${pasid ? ` for PASID ${pasid}` : ""}`);
  if (old === hwpt) return undefined;
  hwptPasidCompat(hwpt, idev, pasid);
  // iommufd_hwpt_replace_device(): the new attach handle's kzalloc().
  faultPoint("iommufd_hwpt_replace_device");
  ctx.driver.attachDev(hwpt.domain, idev, pasid, old.domain);
  idev.attachments.set(pasid, hwpt);
  hwpt.users++;
  return old;
};

/**
 * iommufd_device_auto_get_domain(): reuse the first automatic domain of the
 * IOAS that accepts the device (EINVAL means "incompatible, try the next"),
 * else allocate a new one with no flags.
 */
function autoGetDomain(ctx: IommufdContext, idev: Device, pasid: number, ioas: Ioas, attach: AttachFn): [number, Hwpt | undefined] {
  for (const hwpt of ioas.hwpts) {
    if (!hwpt.autoDomain) continue;
    try {
      return [hwpt.id, attach(ctx, idev, pasid, hwpt)];
    } catch (e) {
      if ((e as { errno?: string }).errno !== "EINVAL") throw e;
    }
  }
  const immediateAttach = attach === doAttach;
  const hwpt = hwptPagingAlloc(ctx, ioas, idev, pasid, NO_FLAGS, immediateAttach, undefined);
  let old: Hwpt | undefined;
  if (!immediateAttach) {
    try {
      old = attach(ctx, idev, pasid, hwpt);
    } catch (e) {
      // iommufd_object_abort_and_destroy()
      hwpt.destroy();
      ctx.abort(hwpt);
      throw e;
    }
  }
  hwpt.autoDomain = true;
  ctx.finalize(hwpt);
  return [hwpt.id, old];
}

/** iommufd_device_change_pt(): resolve pt_id and attach or replace. */
function changePt(ctx: IommufdContext, idev: Device, pasid: number, ptId: number, attach: AttachFn): number {
  const pt = ctx.getObject(ptId);
  let id: number;
  let release: Hwpt | undefined;
  if (pt.type === "hwpt_paging" || pt.type === "hwpt_nested") {
    release = attach(ctx, idev, pasid, pt as Hwpt);
    id = pt.id;
  } else if (pt.type === "ioas") {
    [id, release] = autoGetDomain(ctx, idev, pasid, pt as Ioas, attach);
  } else {
    fail("EINVAL", `pt_id ${ptId} is not an IOAS or a HWPT`);
  }
  if (release) hwPagetablePut(ctx, release);
  return id;
}

export interface AttachCmd {
  devId: number;
  ptId: number;
  pasid: number;
  replace: boolean;
}

/** iommufd_device_attach() / iommufd_device_replace(): returns the HWPT id now attached. */
export function deviceAttach(ctx: IommufdContext, cmd: AttachCmd): number {
  const idev = ctx.getDevice(cmd.devId);
  if (cmd.replace) return changePt(ctx, idev, cmd.pasid, cmd.ptId, doReplace);
  const id = changePt(ctx, idev, cmd.pasid, cmd.ptId, doAttach);
  // Pairs with deviceDetach(): an attached device cannot be destroyed.
  idev.users++;
  return id;
}

/** iommufd_device_detach(): a no-op when nothing is attached. */
export function deviceDetach(ctx: IommufdContext, devId: number, pasid: number): void {
  const idev = ctx.getDevice(devId);
  const hwpt = hwPagetableDetach(ctx, idev, pasid);
  if (hwpt === undefined) return;
  hwPagetablePut(ctx, hwpt);
  idev.users--;
}

export interface HwInfo {
  /** out_data_type */
  readonly type: number;
  /** The driver struct in kernel layout. */
  readonly data: Uint8Array;
  /** out_capabilities */
  readonly capabilities: bigint;
  /** out_max_pasid_log2 */
  readonly maxPasidLog2: number;
}

/**
 * IOMMU_GET_HW_INFO (iommufd_get_hw_info()): `type` absent is
 * IOMMU_HW_INFO_TYPE_DEFAULT (no IOMMU_HW_INFO_FLAG_INPUT_TYPE).
 */
export function deviceHwInfo(ctx: IommufdContext, devId: number, type: number | undefined): HwInfo {
  const idev = ctx.getDevice(devId);
  const info = ctx.driver.hwInfo(idev, type ?? IOMMU_HW_INFO_TYPE_DEFAULT);
  return {
    ...info,
    // device_iommu_capable(IOMMU_CAP_DIRTY_TRACKING); the PCI PASID
    // execute/privileged capabilities are not emulated.
    capabilities: idev.dirtyTrackingCapable ? IOMMU_HW_CAP_DIRTY_TRACKING : 0n,
    maxPasidLog2: idev.pasidCapable ? ctx.driver.pasidWidth : 0,
  };
}
