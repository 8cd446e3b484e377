import type { IommuDriver } from "./drivers/driver.js";
import { fail } from "./errno.js";
import { faultPoint } from "./fail-nth.js";
import type { GuestMemory } from "./guest-memory.js";
import { IdAllocator } from "./id-allocator.js";
import { checkQuota, DEFAULT_LIMITS, type Limits, QuotaError } from "./limits.js";
import { WALK_DEPTH_BOUNDS } from "./translate/dma-batch.js";
import { Device, Ioas, type IommufdObject, type ObjectType } from "./objects.js";

/** Per-VM counters, plain numbers the metrics read at scrape time. */
export interface VmStats {
  translations: number;
  iotlbHits: number;
  iotlbMisses: number;
  memoryReferences: number;
  faults: number;
  /** IOMMU_HWPT_INVALIDATE entries handled, by failed requests too. */
  invalidationEntries: number;
  /** Faults per VT-d reason code. */
  readonly faultsByReason: Float64Array;
  /** Walks per walk-depth bucket (WALK_DEPTH_BOUNDS, then +Inf), per walk mode. */
  readonly walkDepth: Record<"nested" | "stage2", Float64Array>;
  /** Entries read by all walks, per walk mode (the histogram's sum). */
  readonly walkDepthSum: Record<"nested" | "stage2", number>;
  /** Invalidate requests per duration bucket (INVALIDATION_SECONDS_BOUNDS, then +Inf), per data type. */
  readonly invalidationSeconds: Record<InvalidationDataType, Float64Array>;
  /** Total seconds of Invalidate requests, per data type. */
  readonly invalidationSecondsSum: Record<InvalidationDataType, number>;
}

/** The invalidation data types, named as the metrics label. */
export type InvalidationDataType = "vtd_s1" | "selftest" | "arm_smmuv3" | "other";
export const INVALIDATION_DATA_TYPES: readonly InvalidationDataType[] = ["vtd_s1", "selftest", "arm_smmuv3", "other"];
/** Upper bounds (seconds) of the invalidation-duration histogram: 1 µs to 10 ms. */
export const INVALIDATION_SECONDS_BOUNDS = [1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2] as const;

function perDataType<T>(make: () => T): Record<InvalidationDataType, T> {
  return { vtd_s1: make(), selftest: make(), arm_smmuv3: make(), other: make() };
}

function newStats(): VmStats {
  const buckets = () => new Float64Array(WALK_DEPTH_BOUNDS.length + 1);
  return {
    translations: 0,
    iotlbHits: 0,
    iotlbMisses: 0,
    memoryReferences: 0,
    faults: 0,
    invalidationEntries: 0,
    faultsByReason: new Float64Array(256),
    walkDepth: { nested: buckets(), stage2: buckets() },
    walkDepthSum: { nested: 0, stage2: 0 },
    invalidationSeconds: perDataType(() => new Float64Array(INVALIDATION_SECONDS_BOUNDS.length + 1)),
    invalidationSecondsSum: perDataType(() => 0),
  };
}

/**
 * One iommufd context (struct iommufd_ctx, main.c): what one open /dev/iommu
 * is to a VMM. Owns the object table with the kernel's id policy and the
 * two-phase creation of iommufd_object_alloc() / _finalize() / _abort().
 */
export class IommufdContext {
  private readonly table = new Map<number, IommufdObject>();
  private readonly ids = new IdAllocator();
  readonly devicesByName = new Map<string, Device>();
  readonly stats: VmStats = newStats();

  constructor(
    readonly memory: GuestMemory,
    readonly driver: IommuDriver,
    readonly limits: Limits = DEFAULT_LIMITS,
    /** Names the VM in quota violations. */
    readonly subject = "vm",
  ) {}

  get objectCount(): number {
    return this.table.size;
  }

  /** Live objects, in no particular order. */
  objects(): IterableIterator<IommufdObject> {
    return this.table.values();
  }

  /** iommufd_object_alloc(): reserve the lowest free id; invisible until finalize. */
  reserve(obj: IommufdObject): void {
    // The object's kzalloc() and xa_alloc() of its id.
    faultPoint("iommufd_object_alloc");
    checkQuota("objectsPerVm", this.limits, this.table.size, 1, this.subject, "objects");
    obj.id = this.ids.alloc();
  }

  /**
   * Restoring a snapshot: `ids` are (about to be) in use, the lower others
   * free. Ids beyond the objects quota cannot have been handed out under it
   * (xa_alloc() gives the lowest free id; one more may be reserved while the
   * quota's last object is published).
   */
  restoreIds(ids: readonly number[]): void {
    const bad = ids.find((id) => !Number.isSafeInteger(id) || id < 1);
    if (bad !== undefined) fail("EINVAL", `snapshot is inconsistent: object id ${bad} is not a valid id`);
    checkQuota("objectsPerVm", this.limits, 0, ids.length, this.subject, "objects");
    const beyond = ids.find((id) => id > this.limits.objectsPerVm + 1);
    if (beyond !== undefined) {
      const max = this.limits.objectsPerVm;
      throw new QuotaError({ subject: this.subject, description: `objectsPerVm = ${max}` }, `object id ${beyond} is beyond any id the objectsPerVm limit of ${max} lets ${this.subject} hand out`);
    }
    this.ids.restore(ids);
  }

  /** An object of a snapshot takes its id (given to restoreIds()). */
  reserveId(obj: IommufdObject, id: number): void {
    faultPoint("iommufd_object_alloc");
    checkQuota("objectsPerVm", this.limits, this.table.size, 1, this.subject, "objects");
    obj.id = id;
  }

  /** iommufd_object_finalize(): publish a reserved object. */
  finalize(obj: IommufdObject): void {
    this.table.set(obj.id, obj);
  }

  /** iommufd_object_abort(): give a reserved, unpublished id back. */
  abort(obj: IommufdObject): void {
    this.ids.free(obj.id);
    obj.id = 0;
  }

  /** Remove a published object from the table and free its id. */
  remove(obj: IommufdObject): void {
    this.table.delete(obj.id);
    this.ids.free(obj.id);
  }

  /** The ids the allocator holds (reserved or published), ascending: for tests. */
  idsInUse(): number[] {
    return this.ids.inUse();
  }

  /** iommufd_get_object(IOMMUFD_OBJ_ANY): missing, 0 or unpublished -> ENOENT. */
  getObject(id: number): IommufdObject {
    const obj = this.table.get(id);
    if (obj === undefined) fail("ENOENT", `object ${id} does not exist`);
    return obj;
  }

  /** A typed lookup: missing or of another type -> ENOENT. */
  private getTyped<T extends IommufdObject>(id: number, type: ObjectType, what: string): T {
    const obj = this.table.get(id);
    if (obj === undefined || obj.type !== type) fail("ENOENT", `${what} ${id} does not exist`);
    return obj as T;
  }

  /** iommufd_get_ioas() */
  getIoas(id: number): Ioas {
    return this.getTyped<Ioas>(id, "ioas", "IOAS");
  }

  /** iommufd_get_device() */
  getDevice(id: number): Device {
    return this.getTyped<Device>(id, "device", "device");
  }
}
