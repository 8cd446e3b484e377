import { IommufdContext } from "./context.js";
import type { IommuDriver } from "./drivers/driver.js";
import { MockDriver } from "./drivers/mock/mock-driver.js";
import { VtdDriver } from "./drivers/vtd/vtd-driver.js";
import { fail } from "./errno.js";
import { faultPoint } from "./fail-nth.js";
import { GUEST_MEMORY_MAX, GuestMemory, PAGE_SIZE } from "./guest-memory.js";
import { checkQuota, DEFAULT_LIMITS, type Limits } from "./limits.js";

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
    /** The owning tenant ("" = the single implicit tenant of a server without TLS). */
    readonly tenant: string,
    readonly model: IommuModel,
    readonly options: VmOptions,
    readonly ctx: IommufdContext,
  ) {}

  get guestMemoryBytes(): number {
    return this.ctx.memory.size;
  }

  /** The VM's name across tenants: its vm_id, qualified by a named tenant. */
  get name(): string {
    return this.tenant === "" ? this.id : `${this.tenant}/${this.id}`;
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

export function checkVmId(vmId: string): void {
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

/** A tenant's VMs and what they consume against the tenant quotas. */
interface Tenant {
  readonly vms: Map<string, Vm>;
  declaredBytes: number;
  readonly usage: { touchedPages: number };
  /** VMs prepared and not yet adopted or discarded (imports in flight). */
  preparing: number;
}

const tenantSubject = (tenant: string): string => `tenant:${tenant === "" ? "default" : tenant}`;

/** Passed as the tenant to list every tenant's VMs (the admin identity). */
export const ALL_TENANTS = Symbol("all tenants");

/**
 * Every VM of the server, per tenant: a tenant sees only its own VMs (another
 * tenant's vm_id behaves as one that does not exist), and each tenant has its
 * own vm_id namespace.
 */
export class VmRegistry {
  private readonly tenants = new Map<string, Tenant>();
  private readonly createdListeners: ((vm: Vm) => void)[] = [];
  private readonly destroyedListeners: ((vm: Vm) => void)[] = [];

  constructor(readonly limits: Limits = DEFAULT_LIMITS) {}

  /** Call `listener` with every VM created from now on. */
  onCreated(listener: (vm: Vm) => void): void {
    this.createdListeners.push(listener);
  }

  /** Call `listener` with every VM as it is destroyed (its counters are final). */
  onDestroyed(listener: (vm: Vm) => void): void {
    this.destroyedListeners.push(listener);
  }

  /** Live VMs of all tenants. */
  get size(): number {
    let n = 0;
    for (const t of this.tenants.values()) n += t.vms.size;
    return n;
  }

  /** Live VMs of all tenants. */
  *all(): IterableIterator<Vm> {
    for (const t of this.tenants.values()) yield* t.vms.values();
  }

  /** Arguments are checked before existence, existence before the tenant's quotas. */
  create(tenant: string, cmd: CreateVmCmd): Vm {
    const vm = this.prepare(tenant, cmd);
    this.adopt(vm);
    return vm;
  }

  private tenantOf(tenant: string): Tenant {
    let t = this.tenants.get(tenant);
    if (t === undefined) {
      t = { vms: new Map(), declaredBytes: 0, usage: { touchedPages: 0 }, preparing: 0 };
      this.tenants.set(tenant, t);
    }
    return t;
  }

  /** Existence, then the tenant's quotas for one more VM of `bytes`. */
  private checkRoom(tenant: string, vmId: string, bytes: number): void {
    const t = this.tenants.get(tenant);
    if (t?.vms.has(vmId)) fail("EEXIST", `VM "${vmId}" already exists`);
    checkQuota("vmsPerTenant", this.limits, t?.vms.size ?? 0, 1, tenantSubject(tenant), "VMs");
    checkQuota("guestMemoryBytesPerTenant", this.limits, t?.declaredBytes ?? 0, bytes, tenantSubject(tenant), "declared guest RAM");
  }

  /**
   * A new VM, checked against every rule and quota but not yet visible: an
   * import fills it before adopt() publishes it (or discard() drops it).
   */
  prepare(tenant: string, cmd: CreateVmCmd): Vm {
    checkVmId(cmd.vmId);
    if (cmd.model === undefined) fail("EINVAL", "model is unset or unknown");
    const bytes = cmd.guestMemoryBytes;
    if (bytes === 0n || bytes % BigInt(PAGE_SIZE) !== 0n || bytes > BigInt(GUEST_MEMORY_MAX)) {
      fail("EINVAL", `guest_memory_bytes ${bytes} must be a non-zero multiple of 4096 and at most ${GUEST_MEMORY_MAX}`);
    }
    const options: VmOptions = { ...DEFAULT_VM_OPTIONS, ...cmd.options };
    if (cmd.model === "arm_smmuv3") fail("EOPNOTSUPP", "the ARM SMMUv3 model is not implemented yet");
    const subject = `vm:${tenant === "" ? cmd.vmId : `${tenant}/${cmd.vmId}`}`;
    checkQuota("guestMemoryBytesPerVm", this.limits, 0, Number(bytes), subject, "guest_memory_bytes");
    checkQuota("iotlbEntriesPerVm", this.limits, 0, options.iotlbEntries, subject, "iotlb_entries");
    this.checkRoom(tenant, cmd.vmId, Number(bytes));
    const t = this.tenantOf(tenant);
    t.preparing++;
    try {
      // iommufd_fops_open(): the context's kzalloc().
      faultPoint("iommufd_fops_open");
      const memory = new GuestMemory(Number(bytes), { limits: this.limits, vmSubject: subject, tenantSubject: tenantSubject(tenant), tenant: t.usage });
      const ctx = new IommufdContext(memory, createDriver(cmd.model, options, memory), this.limits, subject);
      return new Vm(cmd.vmId, tenant, cmd.model, options, ctx);
    } catch (e) {
      // Nothing was built: the tenant must not keep a preparation (or an entry) for it.
      this.unprepare(tenant, t);
      throw e;
    }
  }

  /** A preparation ends without a VM: forget the tenant once it has nothing left. */
  private unprepare(tenant: string, t: Tenant): void {
    t.preparing--;
    if (t.vms.size === 0 && t.preparing === 0) this.tenants.delete(tenant);
  }

  /** What a tenant consumes now (undefined: nothing); the quotas are checked against it. */
  usage(tenant: string): { vms: number; declaredBytes: number; touchedPages: number; preparing: number } | undefined {
    const t = this.tenants.get(tenant);
    return t && { vms: t.vms.size, declaredBytes: t.declaredBytes, touchedPages: t.usage.touchedPages, preparing: t.preparing };
  }

  /** Publish a prepared VM (existence and quotas are checked again). */
  adopt(vm: Vm): void {
    this.checkRoom(vm.tenant, vm.id, vm.guestMemoryBytes);
    const t = this.tenantOf(vm.tenant);
    t.preparing--;
    t.vms.set(vm.id, vm);
    t.declaredBytes += vm.guestMemoryBytes;
    for (const listener of this.createdListeners) listener(vm);
  }

  /** Drop a prepared VM that was never adopted, giving back the RAM it touched. */
  discard(vm: Vm): void {
    const t = this.tenantOf(vm.tenant);
    t.usage.touchedPages -= vm.ctx.memory.touchedPages;
    this.unprepare(vm.tenant, t);
  }

  /** Whether this very VM is published (not destroyed, not replaced by a namesake). */
  isLive(vm: Vm): boolean {
    return this.tenants.get(vm.tenant)?.vms.get(vm.id) === vm;
  }

  /** A malformed vm_id is EINVAL; an unknown one, or another tenant's, ENOENT. */
  get(tenant: string, vmId: string): Vm {
    checkVmId(vmId);
    const vm = this.tenants.get(tenant)?.vms.get(vmId);
    if (vm === undefined) fail("ENOENT", `VM "${vmId}" does not exist`);
    return vm;
  }

  /** Closing the iommufd: every object of the VM goes with it. */
  destroy(tenant: string, vmId: string): void {
    const vm = this.get(tenant, vmId);
    const t = this.tenants.get(tenant)!;
    t.vms.delete(vmId);
    t.declaredBytes -= vm.guestMemoryBytes;
    t.usage.touchedPages -= vm.ctx.memory.touchedPages;
    if (t.vms.size === 0 && t.preparing === 0) this.tenants.delete(tenant);
    for (const listener of this.destroyedListeners) listener(vm);
  }

  /**
   * A tenant's VMs (or every tenant's, for ALL_TENANTS) ordered by (tenant,
   * vm_id). The page token names the last VM of the previous page,
   * base64url-encoded so that clients treat it as opaque.
   */
  list(tenant: string | typeof ALL_TENANTS, pageSize: number, pageToken: string): { vms: Vm[]; nextPageToken: string } {
    let after: [string, string] = ["", ""];
    if (pageToken !== "") {
      try {
        after = JSON.parse(Buffer.from(pageToken, "base64url").toString("utf8")) as [string, string];
      } catch {
        after = [] as unknown as [string, string];
      }
      if (!Array.isArray(after) || after.length !== 2 || typeof after[0] !== "string" || !VM_ID.test(after[1])) {
        fail("EINVAL", "page_token is not a token this server issued");
      }
    }
    const size = pageSize === 0 ? LIST_PAGE_SIZE_DEFAULT : Math.min(pageSize, LIST_PAGE_SIZE_MAX);
    const key = (vm: Vm): [string, string] => [vm.tenant, vm.id];
    const before = (a: [string, string], b: [string, string]) => a[0] < b[0] || (a[0] === b[0] && a[1] < b[1]);
    const pool = tenant === ALL_TENANTS ? [...this.all()] : [...(this.tenants.get(tenant)?.vms.values() ?? [])];
    const sorted = pool.filter((vm) => before(after, key(vm))).sort((a, b) => (before(key(a), key(b)) ? -1 : 1));
    const page = sorted.slice(0, size);
    const nextPageToken = sorted.length > size ? Buffer.from(JSON.stringify(key(page[page.length - 1])), "utf8").toString("base64url") : "";
    return { vms: page, nextPageToken };
  }
}
