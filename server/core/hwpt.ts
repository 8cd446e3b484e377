import { INVALIDATION_SECONDS_BOUNDS, type IommufdContext, type InvalidationDataType } from "./context.js";
import { hwPagetableAttach, hwPagetableDetach } from "./device.js";
import type { HwptAllocFlags, IotlbDump, UserData } from "./drivers/driver.js";
import { fail, IommuError } from "./errno.js";
import { checkQuota } from "./limits.js";
import { type Device, type Hwpt, HwptNested, HwptPaging, type Ioas } from "./objects.js";
import {
  encodeHwptData,
  encodeInvalidations,
  type UserDataArray,
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
  try {
    ctx.reserve(hwpt);
    ioas.users++;
    if (immediateAttach) hwPagetableAttach(ctx, hwpt, idev, pasid);
    try {
      ioas.iopt.tableAddDomain(domain);
    } catch (e) {
      // out_detach
      if (immediateAttach) hwPagetableDetach(ctx, idev, pasid);
      throw e;
    }
  } catch (e) {
    // out_abort: iommufd_object_abort_and_destroy() -> iommufd_hwpt_paging_destroy()
    // frees the domain whatever step failed, reserve() included.
    domain.free();
    if (hwpt.id !== 0) {
      ioas.users--;
      ctx.abort(hwpt);
    }
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
  try {
    ctx.reserve(hwpt);
  } catch (e) {
    // out_abort: iommufd_object_abort_and_destroy() -> iommufd_hwpt_nested_destroy()
    // frees the domain (a VT-d nested domain leaves its parent's children).
    domain.free();
    throw e;
  }
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
 * IOMMU_HWPT_INVALIDATE (iommufd_hwpt_invalidate()), in steps: the checks
 * before any entry is looked at, then the entries in ranges (step()), so
 * that the edge can spread a long array over event-loop turns. The HWPT is
 * looked up at every step: it may have been destroyed in between, like a
 * HWPT destroyed while another thread's invalidation runs. A failure carries
 * the entries handled in IommuError.entriesHandled (0 for the early checks).
 */
export class HwptInvalidation {
  readonly array: UserDataArray;
  handled = 0;
  private readonly started = performance.now();

  constructor(
    ctx: IommufdContext,
    private readonly hwptId: number,
    requests: Invalidations | undefined,
  ) {
    if (requests === undefined) throw new IommuError("EINVAL", "no invalidation entries given (oneof requests is unset)", 0);
    this.array = encodeInvalidations(requests);
    try {
      checkQuota("invalidateEntries", ctx.limits, 0, this.array.entryNum, "request", "Invalidate entries");
      if (this.array.entryNum !== 0 && (this.array.data.length === 0 || this.array.entryLen === 0)) {
        fail("EINVAL", "entry_num is non-zero but data is empty or entry_len is 0");
      }
    } catch (e) {
      this.finish(ctx);
      throw e instanceof IommuError ? e.withEntriesHandled(0) : e;
    }
  }

  get done(): boolean {
    return this.handled >= this.array.entryNum;
  }

  /** Handles up to `count` more entries (the first step runs even for entry_num 0). */
  step(ctx: IommufdContext, count: number): void {
    const from = this.handled;
    try {
      const obj = ctx.getObject(this.hwptId);
      if (obj.type !== "hwpt_nested") fail("EINVAL", `object ${this.hwptId} is not a nested HWPT`);
      this.handled = (obj as HwptNested).domain.cacheInvalidateUser(this.array, from, Math.min(this.array.entryNum, from + count));
      ctx.stats.invalidationEntries += this.handled - from;
      if (this.done) this.finish(ctx);
    } catch (e) {
      if (!(e instanceof IommuError)) throw e;
      this.handled = e.entriesHandled ?? from;
      ctx.stats.invalidationEntries += this.handled - from;
      this.finish(ctx);
      throw e.withEntriesHandled(this.handled);
    }
  }

  /** The request's wall time, from its checks to its last entry, into the VM's invalidation histogram. */
  private finish(ctx: IommufdContext): void {
    recordInvalidation(ctx, this.array.type, (performance.now() - this.started) / 1000);
  }
}

/** IOMMU_HWPT_INVALIDATE at once: returns the entries handled. */
export function hwptInvalidate(ctx: IommufdContext, hwptId: number, requests: Invalidations | undefined): number {
  const invalidation = new HwptInvalidation(ctx, hwptId, requests);
  invalidation.step(ctx, invalidation.array.entryNum);
  return invalidation.handled;
}

const DATA_TYPE_NAMES = new Map<number, InvalidationDataType>([
  [IOMMU_HWPT_INVALIDATE_DATA_VTD_S1, "vtd_s1"],
  [IOMMU_HWPT_INVALIDATE_DATA_SELFTEST, "selftest"],
  [IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3, "arm_smmuv3"],
]);

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
