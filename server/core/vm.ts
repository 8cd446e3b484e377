import { IommufdContext } from "./context.js";
import type { IommuDriver } from "./drivers/driver.js";
import { MockDriver } from "./drivers/mock/mock-driver.js";
import { VtdDriver } from "./drivers/vtd/vtd-driver.js";
import { fail } from "./errno.js";
import { GUEST_MEMORY_MAX, GuestMemory, PAGE_SIZE } from "./guest-memory.js";

/**
 * The service's VMs: each is one iommufd context with its guest RAM and its
 * emulated IOMMU. vm_ids are DNS labels.
 */
export type IommuModel = "mock" | "intel_vtd" | "arm_smmuv3";

export interface VmOptions {
  readonly iotlbEntries: number;
  readonly pagingStructureCaches: boolean;
  readonly fiveLevel: boolean;
}

export const DEFAULT_VM_OPTIONS: VmOptions = { iotlbEntries: 4096, pagingStructureCaches: false, fiveLevel: false };

export class Vm {
  constructor(
    readonly id: string,
    readonly model: IommuModel,
    readonly options: VmOptions,
    readonly ctx: IommufdContext,
  ) {}

  get guestMemoryBytes(): number {
    return this.ctx.memory.size;
  }
}

const VM_ID = /^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$/;
export const LIST_PAGE_SIZE_DEFAULT = 100;
export const LIST_PAGE_SIZE_MAX = 1000;

export interface CreateVmCmd {
  vmId: string;
  /** Undefined for an unset or unknown model. */
  model: IommuModel | undefined;
  guestMemoryBytes: bigint;
  options: Partial<VmOptions>;
}

function checkVmId(vmId: string): void {
  if (!VM_ID.test(vmId)) fail("EINVAL", `vm_id "${vmId.slice(0, 80)}" is not a DNS label (^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$)`);
}

function createDriver(model: IommuModel, options: VmOptions, memory: GuestMemory): IommuDriver {
  switch (model) {
    case "mock":
      return new MockDriver();
    case "intel_vtd":
      return new VtdDriver(options, memory);
    case "arm_smmuv3":
      fail("EOPNOTSUPP", "the ARM SMMUv3 model is not implemented yet");
  }
}

export class VmRegistry {
  private readonly vms = new Map<string, Vm>();
  private readonly createdListeners: ((vm: Vm) => void)[] = [];
  private readonly destroyedListeners: ((vm: Vm) => void)[] = [];

  /** Call `listener` with every VM created from now on. */
  onCreated(listener: (vm: Vm) => void): void {
    this.createdListeners.push(listener);
  }

  /** Call `listener` with every VM as it is destroyed (its counters are final). */
  onDestroyed(listener: (vm: Vm) => void): void {
    this.destroyedListeners.push(listener);
  }

  get size(): number {
    return this.vms.size;
  }

  all(): IterableIterator<Vm> {
    return this.vms.values();
  }

  /** Arguments are checked before existence. */
  create(cmd: CreateVmCmd): Vm {
    checkVmId(cmd.vmId);
    if (cmd.model === undefined) fail("EINVAL", "model is unset or unknown");
    const bytes = cmd.guestMemoryBytes;
    if (bytes === 0n || bytes % BigInt(PAGE_SIZE) !== 0n || bytes > BigInt(GUEST_MEMORY_MAX)) {
      fail("EINVAL", `guest_memory_bytes ${bytes} must be a non-zero multiple of 4096 and at most ${GUEST_MEMORY_MAX}`);
    }
    const options: VmOptions = { ...DEFAULT_VM_OPTIONS, ...cmd.options };
    if (cmd.model === "arm_smmuv3") fail("EOPNOTSUPP", "the ARM SMMUv3 model is not implemented yet");
    if (this.vms.has(cmd.vmId)) fail("EEXIST", `VM "${cmd.vmId}" already exists`);
    const memory = new GuestMemory(Number(bytes));
    const vm = new Vm(cmd.vmId, cmd.model, options, new IommufdContext(memory, createDriver(cmd.model, options, memory)));
    this.vms.set(vm.id, vm);
    for (const listener of this.createdListeners) listener(vm);
    return vm;
  }

  /** A malformed vm_id is EINVAL, an unknown one ENOENT. */
  get(vmId: string): Vm {
    checkVmId(vmId);
    const vm = this.vms.get(vmId);
    if (vm === undefined) fail("ENOENT", `VM "${vmId}" does not exist`);
    return vm;
  }

  /** Closing the iommufd: every object of the VM goes with it. */
  destroy(vmId: string): void {
    const vm = this.get(vmId);
    this.vms.delete(vmId);
    for (const listener of this.destroyedListeners) listener(vm);
  }

  /**
   * VMs ordered by vm_id. The page token is the last vm_id of the previous
   * page, base64url-encoded so that clients treat it as opaque.
   */
  list(pageSize: number, pageToken: string): { vms: Vm[]; nextPageToken: string } {
    let after = "";
    if (pageToken !== "") {
      after = Buffer.from(pageToken, "base64url").toString("utf8");
      if (!VM_ID.test(after)) fail("EINVAL", "page_token is not a token this server issued");
    }
    const size = pageSize === 0 ? LIST_PAGE_SIZE_DEFAULT : Math.min(pageSize, LIST_PAGE_SIZE_MAX);
    const ids = [...this.vms.keys()].filter((id) => id > after).sort();
    const page = ids.slice(0, size);
    const nextPageToken = ids.length > size ? Buffer.from(page[page.length - 1], "utf8").toString("base64url") : "";
    return { vms: page.map((id) => this.vms.get(id)!), nextPageToken };
  }
}
