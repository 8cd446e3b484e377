import { INVALIDATION_SECONDS_BOUNDS, type IommufdContext, type InvalidationDataType } from "./context.js";
import { hwPagetableAttach, hwPagetableDetach } from "./device.js";
import type { HwptAllocFlags, IotlbDump, UserData } from "./drivers/driver.js";
import { fail, IommuError } from "./errno.js";
import { checkQuota } from "./limits.js";
import { type Device, type Hwpt, HwptNested, HwptPaging, type Ioas } from "./objects.js";
import {
  encodeHwptData,
  encodeInvalidations,
  type HwptData,
  IOMMU_HWPT_DATA_NONE,
  IOMMU_HWPT_INVALIDATE_DATA_SELFTEST,
  IOMMU_HWPT_INVALIDATE_DATA_VTD_S1,
  IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3,
  type Invalidations,
} from "./uapi.js";

/** HWPT allocation and lifetime (hw_pagetable.c). */

export interface HwptAllocCmd {
  devId: number;
  ptId: number;
  flags: HwptAllocFlags;
  /** Absent = IOMMU_HWPT_DATA_NONE. */
  data?: HwptData;
}

/**
 * iommufd_hwpt_paging_alloc(): a paging HWPT on `ioas` whose domain the
 * device's driver allocates; with `immediateAttach` the device is attached
 * before the domain joins the IOAS (the auto-domain path). The returned HWPT
 * holds an id but is not published: the caller finalizes it.
 */
export function hwptPagingAlloc(
  ctx: IommufdContext,
  ioas: Ioas,
  idev: Device,
  pasid: number,
  flags: HwptAllocFlags,
  immediateAttach: boolean,
  userData: UserData | undefined,
): HwptPaging {
  if (flags.dirtyTracking && !idev.dirtyTrackingCapable) {
    fail("EOPNOTSUPP", `device ${idev.id} cannot track dirty pages`);
  }
  const domain = ctx.driver.allocPaging(idev, flags, userData);
  const hwpt = new HwptPaging(ioas, domain, flags.nestParent, flags.pasid);
  ctx.reserve(hwpt);
  ioas.users++;
  try {
    if (immediateAttach) hwPagetableAttach(ctx, hwpt, idev, pasid);
    try {
      ioas.iopt.tableAddDomain(domain);
    } catch (e) {
      if (immediateAttach) hwPagetableDetach(ctx, idev, pasid);
      throw e;
    }
  } catch (e) {
    domain.free();
    ioas.users--;
    ctx.abort(hwpt);
    throw e;
  }
  ioas.hwpts.push(hwpt);
  return hwpt;
}

/** iommufd_hwpt_nested_alloc(): a user-managed stage 1 over a nest parent. */
function hwptNestedAlloc(ctx: IommufdContext, parent: HwptPaging, idev: Device, flags: HwptAllocFlags, userData: UserData | undefined): HwptNested {
  if (flags.nestParent || flags.dirtyTracking || userData === undefined || ctx.driver.allocNested === undefined) {
    fail("EOPNOTSUPP", "a nested HWPT needs driver data and takes no flags but PASID");
  }
  if (parent.autoDomain || !parent.nestParent) {
    fail("EINVAL", `HWPT ${parent.id} is ${parent.autoDomain ? "an automatic domain" : "not a nest parent"}`);
  }
  const domain = ctx.driver.allocNested(idev, parent.domain, flags, userData);
  const hwpt = new HwptNested(parent, domain, flags.pasid, userData);
  ctx.reserve(hwpt);
  parent.users++;
  return hwpt;
}

/** IOMMU_HWPT_ALLOC (iommufd_hwpt_alloc()) */
export function hwptAlloc(ctx: IommufdContext, cmd: HwptAllocCmd): number {
  const userData: UserData = cmd.data ? encodeHwptData(cmd.data) : { type: IOMMU_HWPT_DATA_NONE, data: new Uint8Array() };
  const none = userData.type === IOMMU_HWPT_DATA_NONE;
  if (none !== (userData.data.length === 0)) {
    fail("EINVAL", `data_type ${userData.type} does not match data_len ${userData.data.length}`);
  }
  const idev = ctx.getDevice(cmd.devId);
  let pt;
  try {
    pt = ctx.getObject(cmd.ptId);
  } catch {
    fail("EINVAL", `pt_id ${cmd.ptId} does not exist`);
  }
  let hwpt: Hwpt;
  if (pt.type === "ioas") {
    hwpt = hwptPagingAlloc(ctx, pt as Ioas, idev, 0, cmd.flags, false, none ? undefined : userData);
  } else if (pt.type === "hwpt_paging") {
    hwpt = hwptNestedAlloc(ctx, pt as HwptPaging, idev, cmd.flags, none ? undefined : userData);
  } else {
    fail("EINVAL", `pt_id ${cmd.ptId} is neither an IOAS nor a paging HWPT`);
  }
  ctx.finalize(hwpt);
  return hwpt.id;
}

/**
 * iommufd_hw_pagetable_put(): drop an attachment's reference; an automatic
 * domain is destroyed with its last device.
 */
export function hwPagetablePut(ctx: IommufdContext, hwpt: Hwpt): void {
  hwpt.users--;
  if (hwpt.type === "hwpt_paging" && hwpt.autoDomain && hwpt.users === 1) {
    ctx.remove(hwpt);
    hwpt.destroy();
  }
}

/** IOMMU_DESTROY: only an object nobody else holds can go. */
export function iommufdDestroy(ctx: IommufdContext, id: number): void {
  const obj = ctx.getObject(id);
  if (obj.users !== 1) fail("EBUSY", `object ${id} is in use`);
  ctx.remove(obj);
  obj.destroy();
}

/**
 * IOMMU_HWPT_INVALIDATE (iommufd_hwpt_invalidate()): returns the entries
 * handled; a failure carries them in IommuError.entriesHandled (0 for the
 * checks before any entry is looked at).
 */
export function hwptInvalidate(ctx: IommufdContext, hwptId: number, requests: Invalidations | undefined): number {
  if (requests === undefined) throw new IommuError("EINVAL", "no invalidation entries given (oneof requests is unset)", 0);
  const array = encodeInvalidations(requests);
  const start = performance.now();
  try {
    checkQuota("invalidateEntries", ctx.limits, 0, array.entryNum, "request", "Invalidate entries");
    if (array.entryNum !== 0 && (array.data.length === 0 || array.entryLen === 0)) {
      fail("EINVAL", "entry_num is non-zero but data is empty or entry_len is 0");
    }
    const obj = ctx.getObject(hwptId);
    if (obj.type !== "hwpt_nested") fail("EINVAL", `object ${hwptId} is not a nested HWPT`);
    const handled = (obj as HwptNested).domain.cacheInvalidateUser(array);
    ctx.stats.invalidationEntries += handled;
    return handled;
  } catch (e) {
    if (!(e instanceof IommuError)) throw e;
    ctx.stats.invalidationEntries += e.entriesHandled ?? 0;
    throw e.entriesHandled === undefined ? e.withEntriesHandled(0) : e;
  } finally {
    recordInvalidation(ctx, array.type, (performance.now() - start) / 1000);
  }
}

const DATA_TYPE_NAMES = new Map<number, InvalidationDataType>([
  [IOMMU_HWPT_INVALIDATE_DATA_VTD_S1, "vtd_s1"],
  [IOMMU_HWPT_INVALIDATE_DATA_SELFTEST, "selftest"],
  [IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3, "arm_smmuv3"],
]);

/** The request's wall time into the VM's invalidation-duration histogram. */
function recordInvalidation(ctx: IommufdContext, dataType: number, seconds: number): void {
  const type = DATA_TYPE_NAMES.get(dataType) ?? "other";
  const bucket = INVALIDATION_SECONDS_BOUNDS.findIndex((bound) => seconds <= bound);
  ctx.stats.invalidationSeconds[type][bucket < 0 ? INVALIDATION_SECONDS_BOUNDS.length : bucket]++;
  ctx.stats.invalidationSecondsSum[type] += seconds;
}

/** DumpIotlb (IOMMU_TEST_OP_MD_CHECK_IOTLB made general). */
export function hwptDumpIotlb(ctx: IommufdContext, hwptId: number): IotlbDump {
  const obj = ctx.getObject(hwptId);
  if (obj.type !== "hwpt_paging" && obj.type !== "hwpt_nested") fail("EINVAL", `object ${hwptId} is not a HWPT`);
  return ctx.driver.dumpIotlb((obj as Hwpt).domain);
}
