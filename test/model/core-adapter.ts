/**
 * The system under test for the model test: one VM of the real core, driven
 * in-process through the functions server/rpc/service.ts calls (no gRPC), and
 * read back as plain data for the comparisons with the reference model.
 */
import { deviceAttach, deviceBind, deviceDetach, deviceHwInfo, deviceUnbind } from "../../server/core/device.js";
import { IommuError } from "../../server/core/errno.js";
import { guestMemoryRead, guestMemoryWrite } from "../../server/core/guest-memory.js";
import { hwptAlloc, hwptDumpIotlb, hwptInvalidate, iommufdDestroy } from "../../server/core/hwpt.js";
import { ioasAlloc, ioasAllowIovas, ioasCopy, ioasIovaRanges, ioasMap, ioasUnmap, iommuOption } from "../../server/core/ioas.js";
import { DEFAULT_LIMITS } from "../../server/core/limits.js";
import { Device, HwptNested, HwptPaging, Ioas } from "../../server/core/objects.js";
import { DmaBatch } from "../../server/core/translate/dma-batch.js";
import { translate } from "../../server/core/translate/translate.js";
import type { HwptData, Invalidations } from "../../server/core/uapi.js";
import { type Vm, VmRegistry } from "../../server/core/vm.js";
import { exportVmSnapshot, VmSnapshotImport } from "../../server/rpc/snapshot.js";
import type { IommufdContext } from "../../server/core/context.js";
import type { CopyArgs, ErrnoName, HwInfoResult, HwptFlags, MapArgs, Profile, Range, TranslateResult } from "./reference-model.js";

export type Outcome<T> = { ok: true; value: T } | { ok: false; errno: ErrnoName; entriesHandled?: number; why: string };

/**
 * Runs a core call: an IommuError is an outcome; anything else escaping the
 * core would be an INTERNAL error at the gRPC edge (api.md: "No input may
 * produce INTERNAL or UNKNOWN"), so it is rethrown and fails the test.
 */
export function coreOutcome<T>(f: () => T): Outcome<T> {
  try {
    return { ok: true, value: f() };
  } catch (e) {
    if (e instanceof IommuError) return { ok: false, errno: e.errno as ErrnoName, entriesHandled: e.entriesHandled, why: e.message };
    throw new Error(`core threw a non-IommuError (would be INTERNAL at the edge): ${(e as Error)?.stack ?? String(e)}`);
  }
}

export class CoreVm {
  ctx: IommufdContext;
  private vm: Vm;
  private readonly registry: VmRegistry;
  private generation = 0;

  constructor(readonly profile: Profile) {
    const registry = new VmRegistry({
      ...DEFAULT_LIMITS,
      mappedBytesPerIoas: Number(profile.mappedBytesPerIoas),
      invalidateEntries: profile.invalidateEntries,
    });
    const vm = registry.create("", {
      vmId: "model",
      model: profile.driver,
      guestMemoryBytes: profile.guestMemoryBytes,
      options: { iotlbEntries: profile.iotlbEntries },
    });
    this.registry = registry;
    this.vm = vm;
    this.ctx = vm.ctx;
  }

  /**
   * ExportVm + ImportVm through the snapshot byte stream (rpc/snapshot.ts),
   * into a new VM that replaces this one: nothing observable may change.
   * Returns the bytes the snapshot took.
   */
  snapshotRestore(): number {
    const chunks = exportVmSnapshot(this.vm);
    const importing = new VmSnapshotImport(this.registry, "", `model-${++this.generation}`);
    for (const chunk of chunks) importing.push(chunk);
    const restored = importing.end();
    this.registry.destroy("", this.vm.id);
    this.vm = restored;
    this.ctx = restored.ctx;
    return chunks.reduce((n, c) => n + c.length, 0);
  }

  allocIoas(): number {
    return ioasAlloc(this.ctx);
  }
  map(a: MapArgs): bigint {
    return ioasMap(this.ctx, a);
  }
  unmap(ioasId: number, iova: bigint, length: bigint): bigint {
    return ioasUnmap(this.ctx, { ioasId, iova, length });
  }
  copy(a: CopyArgs): bigint {
    return ioasCopy(this.ctx, a);
  }
  allowIovas(ioasId: number, ranges: readonly Range[]): void {
    ioasAllowIovas(this.ctx, ioasId, ranges.map((r) => ({ start: r.start, last: r.last })));
  }
  option(option: "huge_pages" | undefined, ioasId: number, set: bigint | undefined): bigint {
    return iommuOption(this.ctx, { option, op: set === undefined ? "get" : "set", objectId: ioasId, value: set ?? 0n });
  }
  bind(name: string, pasidCapable: boolean, dirtyCapable: boolean): number {
    return deviceBind(this.ctx, { name, pasidCapable, dirtyTrackingCapable: dirtyCapable });
  }
  unbind(devId: number): void {
    deviceUnbind(this.ctx, devId);
  }
  hwInfo(devId: number, type: number | undefined): HwInfoResult {
    const info = deviceHwInfo(this.ctx, devId, type);
    return { type: info.type, data: info.data, capabilities: info.capabilities, maxPasidLog2: info.maxPasidLog2 };
  }
  hwptAlloc(devId: number, ptId: number, flags: HwptFlags, data: HwptData | undefined): number {
    return hwptAlloc(this.ctx, { devId, ptId, flags: { ...flags }, data });
  }
  attach(devId: number, ptId: number, pasid: number | undefined, replace: boolean): number {
    // As AttachDeviceRequest: an absent pasid is IOMMU_NO_PASID.
    return deviceAttach(this.ctx, { devId, ptId, pasid: pasid ?? 0, replace });
  }
  detach(devId: number, pasid: number | undefined): void {
    deviceDetach(this.ctx, devId, pasid ?? 0);
  }
  destroy(id: number): void {
    iommufdDestroy(this.ctx, id);
  }
  invalidate(hwptId: number, requests: Invalidations): number {
    return hwptInvalidate(this.ctx, hwptId, requests);
  }
  dumpIotlb(hwptId: number): readonly number[] {
    return [...hwptDumpIotlb(this.ctx, hwptId).selftestIotlb];
  }
  /** DumpIotlb's VT-d entries: what the IOTLB caches for the HWPT. */
  iotlbEntries(hwptId: number): readonly { iova: bigint; pageSize: bigint; address: bigint; readable: boolean; writeable: boolean; pasid: number | undefined }[] {
    return hwptDumpIotlb(this.ctx, hwptId).entries;
  }
  translate(devId: number, pasid: number | undefined, iovas: readonly bigint[], write: boolean): TranslateResult {
    const batch = DmaBatch.fromIovas(iovas, write);
    translate(this.ctx, devId, pasid, batch);
    return { results: iovas.map((_, i) => (batch.fault[i] !== 0 ? { fault: batch.fault[i] } : { addr: BigInt(batch.addr[i]) })) };
  }
  writeGuestMemory(gpa: bigint, len: number, data: Uint8Array = new Uint8Array(len).fill(0xa5)): void {
    guestMemoryWrite(this.ctx.memory, this.ctx.limits, gpa, data);
  }
  /** ReadGuestMemory */
  readGuestMemory(gpa: bigint, length: number): Uint8Array {
    return guestMemoryRead(this.ctx.memory, this.ctx.limits, gpa, length);
  }
}

// ---------------------------------------------------------------------------
// Reading the core back

const hex = (x: bigint | number): string => `0x${x.toString(16)}`;
const rangesText = (rs: readonly Range[]): string => rs.map((r) => `${hex(r.start)}-${hex(r.last)}`).join(",");

/**
 * The observable state of the core, one line per object in id order, in the
 * same format snapshotModel() (vm.model.test.ts) renders the model.
 */
export function snapshotCore(core: CoreVm): string[] {
  const ctx = core.ctx;
  const lines: string[] = [];
  for (const o of [...ctx.objects()].sort((a, b) => a.id - b.id)) {
    if (o instanceof Ioas) {
      const { ranges, alignment } = ioasIovaRanges(ctx, o.id);
      const areas = o.iopt
        .allAreas()
        .map((a) => `${hex(a.iova)}-${hex(a.last)}@${hex(a.hostAddr)}:${a.prot.read ? "r" : "-"}${a.prot.write ? "w" : "-"}${a.pagesWritable ? "W" : "R"}`)
        .join(",");
      lines.push(
        `${o.id} ioas users=${o.users} hwpts=[${o.hwpts.map((h) => h.id).join(",")}] huge=${o.iopt.disableLargePages ? 0 : 1} align=${hex(alignment)} ranges=[${rangesText(ranges)}] allowed=[${rangesText(o.iopt.allowedRanges())}] areas=[${areas}]`,
      );
    } else if (o instanceof HwptPaging) {
      lines.push(
        `${o.id} paging users=${o.users} ioas=${o.ioas.id} auto=${+o.autoDomain} nest_parent=${+o.nestParent} dirty=${+o.domain.dirtyTracking} pasid=${+o.pasidCompat}`,
      );
    } else if (o instanceof HwptNested) {
      const iotlb = core.profile.driver === "mock" ? hwptDumpIotlb(ctx, o.id).selftestIotlb.map(hex).join(",") : "";
      lines.push(`${o.id} nested users=${o.users} parent=${o.parent.id} pasid=${+o.pasidCompat} iotlb=[${iotlb}]`);
    } else if (o instanceof Device) {
      const att = [...o.attachments].sort((a, b) => a[0] - b[0]).map(([p, h]) => `${p}:${h.id}`);
      lines.push(`${o.id} device users=${o.users} name=${o.name} pasid_cap=${+o.pasidCapable} dirty_cap=${+o.dirtyTrackingCapable} att=[${att.join(",")}]`);
    } else {
      lines.push(`${o.id} unknown object type ${(o as { type: string }).type}`);
    }
  }
  return lines;
}

/**
 * Object-graph invariants of the core that hold whatever the model says
 * (iommufd-semantics.md §1.1, §1.2, §4): every reference points at a live
 * object, every users count equals 1 + the references held on the object,
 * auto domains have a device attached, the IOAS's domains are its HWPTs',
 * the name index matches the devices, and the id allocator accounts for
 * every id below its high-water mark exactly once (no leaked reservation).
 * Returns the problems found.
 */
export function coreInvariantViolations(core: CoreVm): string[] {
  const ctx = core.ctx;
  const bad: string[] = [];
  const objs = [...ctx.objects()];
  const live = new Set(objs);
  const liveId = (o: object & { id: number }) => {
    try {
      return live.has(o as never) && ctx.getObject(o.id) === o;
    } catch {
      return false;
    }
  };
  const refs = new Map<object, number>();
  const ref = (o: object) => refs.set(o, (refs.get(o) ?? 0) + 1);
  const names = new Map<string, Device>();
  for (const o of objs) {
    if (o.id <= 0 || o.id > 0x7fffffff) bad.push(`object with id ${o.id}`);
    if (o instanceof HwptPaging) {
      ref(o.ioas);
      if (!liveId(o.ioas)) bad.push(`paging HWPT ${o.id} refers to dead IOAS ${o.ioas.id}`);
      if (o.ioas.hwpts.filter((h) => h === o).length !== 1) bad.push(`paging HWPT ${o.id} is not listed once by IOAS ${o.ioas.id}`);
    } else if (o instanceof HwptNested) {
      ref(o.parent);
      if (!liveId(o.parent)) bad.push(`nested HWPT ${o.id} refers to dead parent ${o.parent.id}`);
    } else if (o instanceof Device) {
      names.set(o.name, o);
      for (const [pasid, h] of o.attachments) {
        ref(h);
        if (!liveId(h)) bad.push(`device ${o.id} pasid ${pasid} attached to dead HWPT ${h.id}`);
      }
    } else if (o instanceof Ioas) {
      for (const h of o.hwpts) if (!liveId(h) || h.ioas !== o) bad.push(`IOAS ${o.id} lists HWPT ${h.id}, which is dead or not its own`);
      const domains = new Set(o.iopt.domains);
      if (domains.size !== o.hwpts.length || o.hwpts.some((h) => !domains.has(h.domain))) bad.push(`IOAS ${o.id}: iopt.domains differ from its HWPTs' domains`);
    }
  }
  for (const o of objs) {
    // A device's users: the table, the binding driver, one per attachment.
    const expected = o instanceof Device ? 2 + o.attachments.size : 1 + (refs.get(o) ?? 0);
    if (o.users !== expected) bad.push(`object ${o.id} (${o.type}) has users=${o.users}, references imply ${expected}`);
    if (o instanceof HwptPaging && o.autoDomain && o.users < 2) bad.push(`auto domain ${o.id} has no device attached`);
  }
  const devices = objs.filter((o): o is Device => o instanceof Device);
  if (ctx.devicesByName.size !== devices.length || devices.some((d) => ctx.devicesByName.get(d.name) !== d)) bad.push("devicesByName does not match the devices");
  for (const [name, d] of names) if (ctx.devicesByName.get(name) !== d) bad.push(`device name ${name} indexed wrongly`);
  // The id allocator (test-only peek at its private state): live ids and
  // freed ids partition [1, next).
  const ids = allocatorOf(core);
  const seen = new Set<number>();
  for (const id of [...objs.map((o) => o.id), ...ids.freed]) {
    if (seen.has(id)) bad.push(`id ${id} is both live and free, or freed twice`);
    seen.add(id);
    if (id >= ids.next) bad.push(`id ${id} at or above the allocator's next ${ids.next}`);
  }
  if (seen.size !== ids.next - 1) bad.push(`ids below ${ids.next}: ${seen.size} accounted for, ${ids.next - 1 - seen.size} leaked`);
  // Caches hold nothing of a destroyed domain: every IOTLB entry is one a live HWPT lists (DumpIotlb).
  if (core.profile.driver === "intel_vtd") {
    let listed = 0;
    for (const o of objs) if (o instanceof HwptPaging || o instanceof HwptNested) listed += hwptDumpIotlb(ctx, o.id).entries.length;
    if (ctx.driver.iotlbOccupancy !== listed) bad.push(`IOTLB holds ${ctx.driver.iotlbOccupancy} entries, live HWPTs list ${listed}`);
  }
  return bad;
}

/** The context's IdAllocator (private: a test-only peek at `freed` and `next`). */
function allocatorOf(core: CoreVm): { freed: number[]; next: number } {
  const ids = (core.ctx as unknown as { ids?: { freed?: unknown; next?: unknown } }).ids;
  if (!Array.isArray(ids?.freed) || typeof ids?.next !== "number") {
    throw new Error("IommufdContext.ids (IdAllocator.freed/next) changed shape: update allocatorOf() in test/model/core-adapter.ts");
  }
  return ids as { freed: number[]; next: number };
}

/** The id the core's allocator would hand out next (lowest free). */
export function coreNextId(core: CoreVm): number {
  const ids = allocatorOf(core);
  return ids.freed.length > 0 ? Math.min(...ids.freed) : ids.next;
}
