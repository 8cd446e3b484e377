import type { IommuDriver } from "./drivers/driver.js";
import { fail } from "./errno.js";
import type { GuestMemory } from "./guest-memory.js";
import { IdAllocator } from "./id-allocator.js";
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
}

/**
 * One iommufd context (struct iommufd_ctx, main.c): what one open /dev/iommu
 * is to a VMM. Owns the object table with the kernel's id policy and the
 * two-phase creation of iommufd_object_alloc() / _finalize() / _abort().
 */
export class IommufdContext {
  private readonly objects = new Map<number, IommufdObject>();
  private readonly ids = new IdAllocator();
  readonly devicesByName = new Map<string, Device>();
  readonly stats: VmStats = { translations: 0, iotlbHits: 0, iotlbMisses: 0, memoryReferences: 0, faults: 0, invalidationEntries: 0 };

  constructor(
    readonly memory: GuestMemory,
    readonly driver: IommuDriver,
  ) {}

  get objectCount(): number {
    return this.objects.size;
  }

  /** Live objects in id order. */
  allObjects(): IommufdObject[] {
    return [...this.objects.values()].sort((a, b) => a.id - b.id);
  }

  /** iommufd_object_alloc(): reserve the lowest free id; invisible until finalize. */
  reserve(obj: IommufdObject): void {
    obj.id = this.ids.alloc();
  }

  /** iommufd_object_finalize(): publish a reserved object. */
  finalize(obj: IommufdObject): void {
    this.objects.set(obj.id, obj);
  }

  /** iommufd_object_abort(): give a reserved, unpublished id back. */
  abort(obj: IommufdObject): void {
    this.ids.free(obj.id);
    obj.id = 0;
  }

  /** Remove a published object from the table and free its id. */
  remove(obj: IommufdObject): void {
    this.objects.delete(obj.id);
    this.ids.free(obj.id);
  }

  /** iommufd_get_object(IOMMUFD_OBJ_ANY): missing, 0 or unpublished -> ENOENT. */
  getObject(id: number): IommufdObject {
    const obj = this.objects.get(id);
    if (obj === undefined) fail("ENOENT", `object ${id} does not exist`);
    return obj;
  }

  /** A typed lookup: missing or of another type -> ENOENT. */
  private getTyped<T extends IommufdObject>(id: number, type: ObjectType, what: string): T {
    const obj = this.objects.get(id);
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
