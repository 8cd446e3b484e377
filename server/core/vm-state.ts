import type { DeviceInfo, UserData } from "./drivers/driver.js";
import { fail, IommuError } from "./errno.js";
import { PAGE_SIZE } from "./guest-memory.js";
import type { IovaRange } from "./iova.js";
import { Device, HwptNested, HwptPaging, Ioas } from "./objects.js";
import { checkVmId, type IommuModel, type Vm, type VmOptions, type VmRegistry } from "./vm.js";

/**
 * A VM's state as plain data — every object with its id, the IOAS areas,
 * attachments, options, counters — and its rebuild with the very same ids
 * and reference counts. Caches are not state: a rebuilt VM starts with them
 * empty. The wire/file encoding is the edge's (rpc/snapshot-codec.ts).
 */

export interface AreaState {
  readonly iova: bigint;
  readonly length: bigint;
  readonly userVa: bigint;
  readonly readable: boolean;
  readonly writeable: boolean;
  readonly pagesWritable: boolean;
}

export type ObjectState =
  | { readonly id: number; readonly kind: "ioas"; readonly areas: readonly AreaState[]; readonly allowed: readonly IovaRange[]; readonly hugePages: boolean; readonly hwptIds: readonly number[] }
  | {
      readonly id: number;
      readonly kind: "hwpt_paging";
      readonly ioasId: number;
      readonly nestParent: boolean;
      readonly dirtyTracking: boolean;
      readonly pasid: boolean;
      readonly autoDomain: boolean;
      /** Areas (by IOVA) this domain maps with 4 KiB pages only: mapped while HUGE_PAGES was 0. */
      readonly smallPageAreas: readonly bigint[];
    }
  | { readonly id: number; readonly kind: "hwpt_nested"; readonly parentId: number; readonly pasid: boolean; readonly data: UserData; readonly selftestIotlb: readonly number[] }
  | {
      readonly id: number;
      readonly kind: "device";
      readonly name: string;
      readonly pasidCapable: boolean;
      readonly dirtyTrackingCapable: boolean;
      readonly attachments: readonly { readonly pasid: number; readonly hwptId: number }[];
      readonly selftestPasidFakeError: boolean;
    };

export interface CounterState {
  readonly translations: number;
  readonly iotlbHits: number;
  readonly iotlbMisses: number;
  readonly memoryReferences: number;
  readonly faults: number;
  readonly invalidationEntries: number;
}

export interface VmState {
  readonly vmId: string;
  readonly tenant: string;
  readonly model: IommuModel;
  readonly guestMemoryBytes: bigint;
  readonly options: VmOptions;
  readonly stats: CounterState;
  /** In id order. */
  readonly objects: readonly ObjectState[];
}

/** The VM's state (not its RAM: see capturePages()). */
export function captureVm(vm: Vm): VmState {
  const ctx = vm.ctx;
  const objects: ObjectState[] = [];
  for (const obj of [...ctx.objects()].sort((a, b) => a.id - b.id)) {
    if (obj instanceof Ioas) {
      const areas = obj.iopt.allAreas().map((a) => ({
        iova: a.iova,
        length: a.last - a.iova + 1n,
        userVa: a.hostAddr,
        readable: a.prot.read,
        writeable: a.prot.write,
        pagesWritable: a.pagesWritable,
      }));
      objects.push({ id: obj.id, kind: "ioas", areas, allowed: [...obj.iopt.allowedRanges()], hugePages: !obj.iopt.disableLargePages, hwptIds: obj.hwpts.map((h) => h.id) });
    } else if (obj instanceof HwptPaging) {
      const d = obj.domain;
      const smallPageAreas = obj.ioas.iopt.smallPageAreas(d).map((a) => a.iova);
      objects.push({ id: obj.id, kind: "hwpt_paging", ioasId: obj.ioas.id, nestParent: obj.nestParent, dirtyTracking: d.dirtyTracking, pasid: obj.pasidCompat, autoDomain: obj.autoDomain, smallPageAreas });
    } else if (obj instanceof HwptNested) {
      const selftestIotlb = ctx.driver.restoreSelftestIotlb ? [...ctx.driver.dumpIotlb(obj.domain).selftestIotlb] : [];
      objects.push({ id: obj.id, kind: "hwpt_nested", parentId: obj.parent.id, pasid: obj.pasidCompat, data: obj.userData, selftestIotlb });
    } else if (obj instanceof Device) {
      const attachments = [...obj.attachments].map(([pasid, hwpt]) => ({ pasid, hwptId: hwpt.id })).sort((a, b) => a.pasid - b.pasid);
      const selftestPasidFakeError = ctx.driver.selftestPasidFakeError?.(obj) ?? false;
      objects.push({ id: obj.id, kind: "device", name: obj.name, pasidCapable: obj.pasidCapable, dirtyTrackingCapable: obj.dirtyTrackingCapable, attachments, selftestPasidFakeError });
    }
  }
  const s = ctx.stats;
  return {
    vmId: vm.id,
    tenant: vm.tenant,
    model: vm.model,
    guestMemoryBytes: BigInt(vm.guestMemoryBytes),
    options: vm.options,
    stats: { translations: s.translations, iotlbHits: s.iotlbHits, iotlbMisses: s.iotlbMisses, memoryReferences: s.memoryReferences, faults: s.faults, invalidationEntries: s.invalidationEntries },
    objects,
  };
}

/** One 4 KiB page of guest RAM. */
export interface GuestPageState {
  readonly gpa: number;
  readonly data: Uint8Array;
}

/** The touched pages of guest RAM, ascending, each a copy. */
export function* capturePages(vm: Vm): IterableIterator<GuestPageState> {
  const memory = vm.ctx.memory;
  for (const pfn of memory.touchedPageNumbers()) yield { gpa: pfn * PAGE_SIZE, data: memory.read(pfn * PAGE_SIZE, PAGE_SIZE) };
}

/**
 * The drivers validated every domain when it was first made; rebuilding one
 * must not depend on which device asked, so this one can do everything.
 */
const SNAPSHOT_DEVICE: DeviceInfo = { name: "(snapshot)", pasidCapable: true, dirtyTrackingCapable: true };

function inconsistent(what: string): never {
  fail("EINVAL", `snapshot is inconsistent: ${what}`);
}

/**
 * Rebuild the objects of `state` in a prepared (empty, unpublished) VM, with
 * their ids, in dependency order: IOASes with their options and areas, their
 * paging HWPTs in creation order (so stage-2 tables are rebuilt from the
 * areas), nested HWPTs, devices, then attachments. Throws EINVAL for a state
 * that does not hang together.
 */
export function restoreObjects(vm: Vm, state: VmState): void {
  const ctx = vm.ctx;
  const byId = new Map(state.objects.map((o) => [o.id, o]));
  if (byId.size !== state.objects.length) inconsistent("duplicate object ids");
  ctx.restoreIds([...byId.keys()]);
  const of = <K extends ObjectState["kind"]>(id: number, kind: K): Extract<ObjectState, { kind: K }> => {
    const o = byId.get(id);
    if (o?.kind !== kind) inconsistent(`object ${id} is not a ${kind}`);
    return o as Extract<ObjectState, { kind: K }>;
  };
  const live = new Map<number, Ioas | HwptPaging | HwptNested | Device>();

  try {
    for (const o of state.objects) {
      if (o.kind !== "ioas") continue;
      const ioas = new Ioas(ctx.memory, ctx.limits);
      ctx.reserveId(ioas, o.id);
      ioas.iopt.subject = `${ctx.subject}/ioas:${o.id}`;
      ioas.iopt.setLargePages(o.hugePages);
      // Areas one by one at their IOVA (MapIoas's own checks), then the
      // allowed ranges, which may have been set after the areas.
      for (const a of o.areas) {
        ioas.iopt.mapPages([{ hostAddr: a.userVa, length: a.length, writable: a.pagesWritable }], a.length, a.iova, { read: a.readable, write: a.writeable });
      }
      ioas.iopt.setAllowIova(o.allowed);
      ctx.finalize(ioas);
      live.set(o.id, ioas);
    }
    for (const o of state.objects) {
      if (o.kind !== "ioas") continue;
      const ioas = live.get(o.id) as Ioas;
      for (const hwptId of o.hwptIds) {
        const h = of(hwptId, "hwpt_paging");
        if (h.ioasId !== o.id) inconsistent(`HWPT ${hwptId} is listed by IOAS ${o.id} but belongs to ${h.ioasId}`);
        const flags = { nestParent: h.nestParent, dirtyTracking: h.dirtyTracking, pasid: h.pasid };
        const domain = ctx.driver.allocPaging(SNAPSHOT_DEVICE, flags, undefined);
        const hwpt = new HwptPaging(ioas, domain, h.nestParent, h.pasid);
        ctx.reserveId(hwpt, hwptId);
        ioas.users++;
        ioas.iopt.tableAddDomain(domain, new Set(h.smallPageAreas));
        ioas.hwpts.push(hwpt);
        hwpt.autoDomain = h.autoDomain;
        ctx.finalize(hwpt);
        live.set(hwptId, hwpt);
      }
    }
    for (const o of state.objects) {
      if (o.kind === "hwpt_paging" && !live.has(o.id)) inconsistent(`HWPT ${o.id} is not listed by its IOAS`);
      if (o.kind !== "hwpt_nested") continue;
      const parent = live.get(o.parentId);
      if (!(parent instanceof HwptPaging)) inconsistent(`nested HWPT ${o.id} has no paging parent ${o.parentId}`);
      // What iommufd_hwpt_nested_alloc() requires of a parent.
      if (parent.autoDomain || !parent.nestParent) inconsistent(`nested HWPT ${o.id}: parent ${o.parentId} is not a nest parent`);
      const flags = { nestParent: false, dirtyTracking: false, pasid: o.pasid };
      const domain = ctx.driver.allocNested!(SNAPSHOT_DEVICE, parent.domain, flags, o.data);
      ctx.driver.restoreSelftestIotlb?.(domain, o.selftestIotlb);
      const hwpt = new HwptNested(parent, domain, o.pasid, o.data);
      ctx.reserveId(hwpt, o.id);
      parent.users++;
      ctx.finalize(hwpt);
      live.set(o.id, hwpt);
    }
    for (const o of state.objects) {
      if (o.kind !== "device") continue;
      if (ctx.devicesByName.has(o.name)) inconsistent(`two devices are named "${o.name}"`);
      const idev = new Device(o.name, o.pasidCapable, o.dirtyTrackingCapable);
      ctx.reserveId(idev, o.id);
      ctx.finalize(idev);
      ctx.devicesByName.set(o.name, idev);
      live.set(o.id, idev);
      for (const { pasid, hwptId } of o.attachments) {
        const hwpt = live.get(hwptId);
        if (!(hwpt instanceof HwptPaging || hwpt instanceof HwptNested)) inconsistent(`device ${o.id} is attached to ${hwptId}, not a HWPT`);
        ctx.driver.attachDev(hwpt.domain, idev, pasid, undefined);
        hwpt.users++;
        idev.users++;
        idev.attachments.set(pasid, hwpt);
      }
      ctx.driver.restoreSelftestPasidFakeError?.(idev, o.selftestPasidFakeError);
      // iommufd_hwpt_pasid_compat(): PASIDs only on PASID-compatible HWPTs,
      // and only beside a RID attachment that is one too.
      const rid = idev.attachments.get(0);
      for (const [pasid, hwpt] of idev.attachments) {
        if (pasid !== 0 && (!hwpt.pasidCompat || (rid !== undefined && !rid.pasidCompat))) {
          inconsistent(`device ${o.id}: PASID ${pasid} is attached beside a HWPT that is not PASID-compatible`);
        }
      }
    }
  } catch (e) {
    // A quota is a quota and an allocation failure (ENOMEM) is one too;
    // anything else the rebuild trips over (overlapping areas, an aperture,
    // a driver refusing its data) means the state does not hang together.
    if (e instanceof IommuError && (e.errno === "EDQUOT" || e.errno === "EINVAL" || e.errno === "ENOMEM")) throw e;
    inconsistent((e as Error).message);
  }
  Object.assign(ctx.stats, state.stats);
}

/**
 * An import in progress: the header prepares an unpublished VM under the
 * importer's tenant (and quotas) and rebuilds its objects, pages fill its
 * RAM, commit() publishes it. Until then nobody can see it, and abort()
 * leaves no trace, so a failed import changes nothing.
 */
export class VmImport {
  private vm: Vm | undefined;

  constructor(
    private readonly registry: VmRegistry,
    /** The new VM's tenant; undefined = the snapshot's (restoring one's own state). */
    private readonly tenant: string | undefined,
    /** The new VM's id; empty = the snapshot's. */
    private readonly vmId: string,
  ) {
    // A bad id fails the import before a byte of the snapshot is read.
    if (vmId !== "") checkVmId(vmId);
  }

  header(state: VmState): void {
    const vm = this.registry.prepare(this.tenant ?? state.tenant, {
      vmId: this.vmId || state.vmId,
      model: state.model,
      guestMemoryBytes: state.guestMemoryBytes,
      options: state.options,
    });
    this.vm = vm;
    restoreObjects(vm, state);
  }

  pages(pages: readonly GuestPageState[]): void {
    const memory = this.vm!.ctx.memory;
    for (const p of pages) {
      if (!memory.contains(p.gpa, PAGE_SIZE)) inconsistent(`page ${p.gpa} is beyond guest RAM (${memory.size} bytes)`);
      memory.write(p.gpa, p.data);
    }
  }

  commit(): Vm {
    const vm = this.vm;
    if (vm === undefined) inconsistent("no header");
    this.registry.adopt(vm);
    // Published: from now on it is the registry's, and abort() must not discard it.
    this.vm = undefined;
    return vm;
  }

  abort(): void {
    if (this.vm !== undefined) this.registry.discard(this.vm);
    this.vm = undefined;
  }
}
