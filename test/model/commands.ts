/**
 * The commands of the VM model test: plain-data specs (what fast-check
 * generates and shrinks), resolved against the model's state when they run
 * (ids "the k-th live IOAS", IOVAs "the end of the k-th area", or raw wrong
 * ids), then executed on the reference model and on the real core, whose
 * outcomes must agree; after each command the whole observable state must
 * agree too (checkAfter()).
 */
import fc from "fast-check";
import type { HwptData, Invalidations } from "../../server/core/uapi.js";
import { RefRam, RefStage2, translateNested } from "../reference/reference-walker.js";
import { CoreVm, coreInvariantViolations, coreNextId, coreOutcome, type Outcome, snapshotCore } from "./core-adapter.js";
import {
  HWPT_DATA_SELFTEST,
  HWPT_DATA_VTD_S1,
  INVALIDATE_DATA_SELFTEST,
  INVALIDATE_DATA_VTD_S1,
  type InvalidateArray,
  type MNested,
  type MObject,
  ModelFail,
  type Profile,
  type Range,
  ReferenceModel,
  type UserData,
  U64_MAX,
} from "./reference-model.js";

// ---------------------------------------------------------------------------
// Specs

export type Kind = MObject["kind"] | "hwpt" | "any";
/**
 * An id: the i-th live object of a kind (when there is none: another live
 * object, of the wrong kind, or the lowest free id), or a raw number.
 */
export type IdRef = { k: Kind; i: number } | { raw: number };

/** An IOVA: absolute, or relative to the i-th area of the IOAS concerned. */
export type IovaRef = { abs: bigint } | { area: number; at: "start" | "after" | "before" | "mid" };

/** An IOVA range [iova, iova + length): absolute or relative to areas. */
export type RangeRef =
  | { abs: bigint; len: bigint }
  | { area: number; mode: "exact" | "half" | "cover" | "pair" | "inner" | "tail" }
  | { all: true };

export type DataSpec =
  | { kind: "none" }
  | { kind: "selftest"; iotlb: number }
  | { kind: "vtd_s1"; sre: boolean; eafe: boolean; wpe: boolean; pgtblAddr: bigint; addrWidth: number }
  | { kind: "raw"; type: number; len: number; fill: number };

export type InvSpec =
  | { kind: "selftest"; entries: { iotlbId: number; all: boolean }[] }
  | { kind: "vtd_s1"; entries: { addr: bigint; npages: bigint; leaf: boolean }[] }
  | { kind: "raw"; type: number; entryLen: number; entries: { flags: number; id: number }[]; numDelta: number; truncate: number };

export type Spec =
  | { t: "allocIoas" }
  | { t: "map"; ioas: IdRef; userVa: bigint; length: bigint; iova?: IovaRef; r: boolean; w: boolean }
  | { t: "unmap"; ioas: IdRef; range: RangeRef }
  | { t: "copy"; dst: IdRef; src: IdRef; range: RangeRef; dstIova?: IovaRef; r: boolean; w: boolean }
  | { t: "allow"; ioas: IdRef; ranges: Range[] }
  | { t: "option"; ioas: IdRef; set?: bigint; unknown: boolean }
  | { t: "bind"; name: string; pasid: boolean; dirty: boolean }
  | { t: "unbind"; dev: IdRef }
  | { t: "hwInfo"; dev: IdRef; type?: number }
  | { t: "hwptAlloc"; dev: IdRef; pt: IdRef; nestParent: boolean; dirty: boolean; pasid: boolean; data: DataSpec }
  | { t: "attach"; dev: IdRef; pt: IdRef; pasid?: number; replace: boolean }
  | { t: "detach"; dev: IdRef; pasid?: number }
  | { t: "destroy"; id: IdRef }
  | { t: "invalidate"; hwpt: IdRef; req: InvSpec }
  | { t: "dumpIotlb"; hwpt: IdRef }
  | { t: "translate"; dev: IdRef; pasid?: number; iovas: IovaRef[]; write: boolean }
  | { t: "writeGuest"; gpa: bigint; len: number }
  | { t: "s1map"; iova: bigint; gpa: IovaRef; big: boolean; rw: boolean; us: boolean; accessed: boolean }
  | { t: "snapshot" };

// ---------------------------------------------------------------------------
// The guest's VT-d stage-1 tables (vtd.md §1), at fixed GPAs: the PML4 at
// S1_ROOT (the pgtbl_addr nested HWPTs are allocated with), one PDPT, one PD,
// and one PT per PD index (IOVAs below 32 MiB).

export const S1_ROOT = 0x10_0000n;
const S1_PDPT = 0x10_1000n;
const S1_PD = 0x10_2000n;
const s1Pt = (pdIndex: bigint): bigint => 0x10_3000n + pdIndex * 0x1000n;
/** The GPAs the tables occupy (an identity area over them makes them walkable). */
export const S1_TABLES: Range = { start: S1_ROOT, last: s1Pt(15n) + 0xfffn };
const FS_P = 1n;
const FS_RW = 2n;
const FS_US = 4n;
const FS_A = 1n << 5n;
const FS_PS = 1n << 7n;
/** IOVAs stage-1 maps and nested probes use (PML4/PDPT index 0, PD index < 16). */
const S1_IOVAS = [0x1000n, 0x2000n, 0x3000n, 0x20_1000n, 0x40_0000n, 0x40_1000n, 0x100_0000n, 0x100_1000n, 0x120_0000n, 0x1ff_f000n];

/** The entries (gpa, value) an s1map writes: the path to the IOVA and its leaf. */
function s1Entries(iova: bigint, gpa: bigint, spec: Extract<Spec, { t: "s1map" }>): [bigint, bigint][] {
  const table = FS_P | FS_RW | FS_US | (spec.accessed ? FS_A : 0n);
  const perm = FS_P | (spec.rw ? FS_RW : 0n) | (spec.us ? FS_US : 0n) | (spec.accessed ? FS_A : 0n);
  const pd = (iova >> 21n) & 511n;
  const out: [bigint, bigint][] = [
    [S1_ROOT, S1_PDPT | table],
    [S1_PDPT, S1_PD | table],
  ];
  if (spec.big) {
    out.push([S1_PD + pd * 8n, (gpa & ~0x1f_ffffn) | perm | FS_PS]);
  } else {
    out.push([S1_PD + pd * 8n, s1Pt(pd) | table]);
    out.push([s1Pt(pd) + ((iova >> 12n) & 511n) * 8n, (gpa & ~0xfffn) | perm]);
  }
  return out;
}

const le64 = (v: bigint): Uint8Array => {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, v, true);
  return b;
};

// ---------------------------------------------------------------------------
// Resolution against the model

const hex = (x: bigint | number): string => `0x${x.toString(16)}`;

export function resolveId(ref: IdRef, m: ReferenceModel): number {
  if ("raw" in ref) return ref.raw;
  const ids = m.idsOf(ref.k);
  if (ids.length > 0) return ids[ref.i % ids.length];
  // None of that kind: half the time another live object (a wrong type), else a free id.
  const any = m.idsOf("any");
  return ref.i % 2 === 0 && any.length > 0 ? any[(ref.i >> 1) % any.length] : m.lowestFreeId();
}

function areasOf(m: ReferenceModel, ioasId: number | undefined) {
  if (ioasId !== undefined) {
    const o = m.objects.get(ioasId);
    return o?.kind === "ioas" ? o.areas : [];
  }
  return [...m.objects.values()].flatMap((o) => (o.kind === "ioas" ? o.areas : []));
}

/** Where area-relative references fall back to when there is no area. */
const baseIova = (m: ReferenceModel): bigint => (m.profile.driver === "mock" ? m.profile.aperture.start : 0x100_0000n);

function resolveIova(ref: IovaRef, m: ReferenceModel, ioasId: number | undefined, length: bigint): bigint {
  if ("abs" in ref) return ref.abs;
  const areas = areasOf(m, ioasId);
  if (areas.length === 0) return baseIova(m);
  const a = areas[ref.area % areas.length];
  switch (ref.at) {
    case "start":
      return a.iova;
    case "after":
      return a.last + 1n <= U64_MAX - 1n ? a.last + 1n : a.iova;
    case "before":
      return a.iova >= length ? a.iova - length : 0n;
    case "mid":
      return a.iova + 0x800n <= a.last ? a.iova + 0x800n : a.iova;
  }
}

function resolveRange(ref: RangeRef, m: ReferenceModel, ioasId: number): { iova: bigint; length: bigint } {
  if ("all" in ref) return { iova: 0n, length: U64_MAX };
  if ("abs" in ref) return { iova: ref.abs, length: ref.len };
  const areas = areasOf(m, ioasId);
  if (areas.length === 0) return { iova: baseIova(m), length: 0x1000n };
  const k = ref.area % areas.length;
  const a = areas[k];
  const len = a.last - a.iova + 1n;
  switch (ref.mode) {
    case "exact":
      return { iova: a.iova, length: len };
    case "half":
      return { iova: a.iova, length: len / 2n || 1n };
    case "cover":
      return { iova: a.iova >= 0x1000n ? a.iova - 0x1000n : 0n, length: len + 0x2000n };
    case "pair": {
      const next = areas[k + 1];
      return next === undefined ? { iova: a.iova, length: len } : { iova: a.iova, length: next.last - a.iova + 1n };
    }
    case "inner":
      return { iova: a.iova + 0x800n, length: 0x800n };
    case "tail":
      return { iova: a.iova + len / 2n, length: len - len / 2n };
  }
}

// ---- encodings written from the uAPI structs (iommufd-semantics.md §2, §5), not from server/core/uapi.ts

function u32le(x: number): Uint8Array {
  const b = new Uint8Array(4);
  new DataView(b.buffer).setUint32(0, x >>> 0, true);
  return b;
}

/** iommu_hwpt_vtd_s1: flags u64 @0, pgtbl_addr u64 @8, addr_width u32 @16, __reserved u32 @20. */
function vtdS1Bytes(d: Extract<DataSpec, { kind: "vtd_s1" }>): Uint8Array {
  const b = new Uint8Array(24);
  const v = new DataView(b.buffer);
  v.setBigUint64(0, (d.sre ? 1n : 0n) | (d.eafe ? 2n : 0n) | (d.wpe ? 4n : 0n), true);
  v.setBigUint64(8, d.pgtblAddr, true);
  v.setUint32(16, d.addrWidth, true);
  return b;
}

function modelData(d: DataSpec): UserData | undefined {
  switch (d.kind) {
    case "none":
      return undefined;
    case "selftest":
      return { type: HWPT_DATA_SELFTEST, bytes: u32le(d.iotlb) };
    case "vtd_s1":
      return { type: HWPT_DATA_VTD_S1, bytes: vtdS1Bytes(d) };
    case "raw":
      return { type: d.type, bytes: new Uint8Array(d.len).fill(d.fill) };
  }
}

function coreData(d: DataSpec): HwptData | undefined {
  switch (d.kind) {
    case "none":
      return undefined;
    case "selftest":
      return { kind: "selftest", iotlb: d.iotlb };
    case "vtd_s1":
      return { kind: "vtd_s1", sre: d.sre, eafe: d.eafe, wpe: d.wpe, pgtblAddr: d.pgtblAddr, addrWidth: d.addrWidth };
    case "raw":
      return { kind: "raw", dataType: d.type, data: new Uint8Array(d.len).fill(d.fill) };
  }
}

/** The raw array of a raw spec: entry i at i * entry_len ({flags u32, iotlb_id u32} truncated/zero-padded to entry_len). */
function rawArray(req: Extract<InvSpec, { kind: "raw" }>): InvalidateArray {
  const bytes = new Uint8Array(req.entryLen * req.entries.length);
  req.entries.forEach((e, i) => {
    const entry = new Uint8Array(8);
    const v = new DataView(entry.buffer);
    v.setUint32(0, e.flags, true);
    v.setUint32(4, e.id, true);
    bytes.set(entry.subarray(0, Math.min(8, req.entryLen)), i * req.entryLen);
  });
  return { type: req.type, entryLen: req.entryLen, entryNum: Math.max(0, req.entries.length + req.numDelta), bytes: bytes.subarray(0, Math.max(0, bytes.length - req.truncate)) };
}

function modelInvalidations(req: InvSpec): InvalidateArray {
  switch (req.kind) {
    case "selftest": {
      // iommu_hwpt_invalidate_selftest: flags u32 @0 (FLAG_ALL = 1), iotlb_id u32 @4
      const bytes = new Uint8Array(8 * req.entries.length);
      const v = new DataView(bytes.buffer);
      req.entries.forEach((e, i) => {
        v.setUint32(8 * i, e.all ? 1 : 0, true);
        v.setUint32(8 * i + 4, e.iotlbId, true);
      });
      return { type: INVALIDATE_DATA_SELFTEST, entryLen: 8, entryNum: req.entries.length, bytes };
    }
    case "vtd_s1": {
      // iommu_hwpt_vtd_s1_invalidate: addr u64 @0, npages u64 @8, flags u32 @16 (LEAF = 1), __reserved u32 @20
      const bytes = new Uint8Array(24 * req.entries.length);
      const v = new DataView(bytes.buffer);
      req.entries.forEach((e, i) => {
        v.setBigUint64(24 * i, e.addr, true);
        v.setBigUint64(24 * i + 8, e.npages, true);
        v.setUint32(24 * i + 16, e.leaf ? 1 : 0, true);
      });
      return { type: INVALIDATE_DATA_VTD_S1, entryLen: 24, entryNum: req.entries.length, bytes };
    }
    case "raw":
      return rawArray(req);
  }
}

function coreInvalidations(req: InvSpec): Invalidations {
  switch (req.kind) {
    case "selftest":
      return { kind: "selftest", entries: req.entries.map((e) => ({ ...e })) };
    case "vtd_s1":
      return { kind: "vtd_s1", entries: req.entries.map((e) => ({ ...e })) };
    case "raw": {
      const a = rawArray(req);
      return { kind: "raw", dataType: a.type, entryLen: a.entryLen, entryNum: a.entryNum, data: a.bytes };
    }
  }
}

// ---------------------------------------------------------------------------
// Execution

function modelOutcome<T>(f: () => T): Outcome<T> {
  try {
    return { ok: true, value: f() };
  } catch (e) {
    if (e instanceof ModelFail) return { ok: false, errno: e.errno, entriesHandled: e.entriesHandled, why: e.why };
    throw e;
  }
}

function show(v: unknown): string {
  if (typeof v === "bigint") return hex(v);
  if (v === undefined) return "";
  if (v instanceof Uint8Array) return `bytes[${[...v].map((b) => b.toString(16).padStart(2, "0")).join("")}]`;
  return JSON.stringify(v, (_k, x: unknown) => (typeof x === "bigint" ? hex(x) : x instanceof Uint8Array ? show(x) : x));
}

const outcomeText = (o: Outcome<unknown>): string =>
  o.ok ? `ok ${show(o.value)}`.trimEnd() : `${o.errno}${o.entriesHandled !== undefined ? ` (entries_handled ${o.entriesHandled})` : ""}`;

export class Divergence extends Error {
  override readonly name = "Divergence";
}

/** Run one call on both sides; they must agree. Returns "call -> outcome". */
function both<T>(call: string, onModel: () => T, onCore: () => T, normalize: (v: T) => unknown = (v) => v): string {
  const expected = modelOutcome(onModel);
  const actual = coreOutcome(onCore);
  const e = expected.ok ? { ...expected, value: normalize(expected.value) } : expected;
  const a = actual.ok ? { ...actual, value: normalize(actual.value) } : actual;
  if (outcomeText(e) !== outcomeText(a)) {
    throw new Divergence(
      `${call}\n  model: ${outcomeText(e)}${e.ok ? "" : ` — ${e.why}`}\n  core:  ${outcomeText(a)}${a.ok ? "" : ` — ${a.why}`}`,
    );
  }
  return `${call} -> ${outcomeText(e)}`;
}

const prot = (r: boolean, w: boolean): string => `${r ? "r" : "-"}${w ? "w" : "-"}`;
const pasidText = (p: number | undefined): string => (p === undefined ? "" : `, pasid=${p}`);

/** Execute one spec on both sides; returns the resolved call and its outcome. */
export function execute(spec: Spec, m: ReferenceModel, r: CoreVm): string {
  switch (spec.t) {
    case "allocIoas":
      return both("AllocIoas()", () => m.allocIoas(), () => r.allocIoas());
    case "map": {
      const ioasId = resolveId(spec.ioas, m);
      const iova = spec.iova === undefined ? undefined : resolveIova(spec.iova, m, ioasId, spec.length);
      const a = { ioasId, userVa: spec.userVa, length: spec.length, iova, readable: spec.r, writeable: spec.w };
      const call = `MapIoas(ioas=${ioasId}, user_va=${hex(spec.userVa)}, length=${hex(spec.length)}, iova=${iova === undefined ? "auto" : hex(iova)}, ${prot(spec.r, spec.w)})`;
      return both(call, () => m.map(a), () => r.map(a));
    }
    case "unmap": {
      const ioasId = resolveId(spec.ioas, m);
      const { iova, length } = resolveRange(spec.range, m, ioasId);
      return both(`UnmapIoas(ioas=${ioasId}, iova=${hex(iova)}, length=${hex(length)})`, () => m.unmap(ioasId, iova, length), () => r.unmap(ioasId, iova, length));
    }
    case "copy": {
      const dstIoasId = resolveId(spec.dst, m);
      const srcIoasId = resolveId(spec.src, m);
      const { iova: srcIova, length } = resolveRange(spec.range, m, srcIoasId);
      const dstIova = spec.dstIova === undefined ? undefined : resolveIova(spec.dstIova, m, dstIoasId, length);
      const a = { dstIoasId, srcIoasId, srcIova, length, dstIova, readable: spec.r, writeable: spec.w };
      const call = `CopyIoas(dst=${dstIoasId}, src=${srcIoasId}, src_iova=${hex(srcIova)}, length=${hex(length)}, dst_iova=${dstIova === undefined ? "auto" : hex(dstIova)}, ${prot(spec.r, spec.w)})`;
      return both(call, () => m.copy(a), () => r.copy(a));
    }
    case "allow": {
      const ioasId = resolveId(spec.ioas, m);
      const call = `AllowIovas(ioas=${ioasId}, [${spec.ranges.map((x) => `${hex(x.start)}-${hex(x.last)}`).join(", ")}])`;
      return both(call, () => m.allowIovas(ioasId, spec.ranges), () => r.allowIovas(ioasId, spec.ranges));
    }
    case "option": {
      const ioasId = resolveId(spec.ioas, m);
      const option = spec.unknown ? undefined : ("huge_pages" as const);
      const call = `${spec.set === undefined ? "GetOption" : "SetOption"}(${option ?? "UNSPECIFIED"}, object=${ioasId}${spec.set === undefined ? "" : `, value=${spec.set}`})`;
      return both(call, () => m.option(option, ioasId, spec.set), () => r.option(option, ioasId, spec.set));
    }
    case "bind":
      return both(
        `BindDevice(name="${spec.name}", pasid_capable=${spec.pasid}, dirty_tracking_capable=${spec.dirty})`,
        () => m.bind(spec.name, spec.pasid, spec.dirty),
        () => r.bind(spec.name, spec.pasid, spec.dirty),
      );
    case "unbind": {
      const devId = resolveId(spec.dev, m);
      return both(`UnbindDevice(dev=${devId})`, () => m.unbind(devId), () => r.unbind(devId));
    }
    case "hwInfo": {
      const devId = resolveId(spec.dev, m);
      // The VT-d registers are not modelled: compare their length only.
      const norm = (h: { type: number; data: Uint8Array; capabilities: bigint; maxPasidLog2: number }) => ({
        ...h,
        data: m.profile.driver === "mock" ? h.data : undefined,
      });
      return both(`HwInfo(dev=${devId}${spec.type === undefined ? "" : `, data_type=${hex(spec.type)}`})`, () => m.hwInfo(devId, spec.type), () => r.hwInfo(devId, spec.type), norm);
    }
    case "hwptAlloc": {
      const devId = resolveId(spec.dev, m);
      const ptId = resolveId(spec.pt, m);
      const flags = { nestParent: spec.nestParent, dirtyTracking: spec.dirty, pasid: spec.pasid };
      const flagText = [spec.nestParent && "nest_parent", spec.dirty && "dirty_tracking", spec.pasid && "pasid"].filter(Boolean).join("|") || "0";
      const call = `AllocHwpt(dev=${devId}, pt=${ptId}, flags=${flagText}, data=${show(spec.data)})`;
      return both(call, () => m.hwptAlloc(devId, ptId, flags, modelData(spec.data)), () => r.hwptAlloc(devId, ptId, flags, coreData(spec.data)));
    }
    case "attach": {
      const devId = resolveId(spec.dev, m);
      const ptId = resolveId(spec.pt, m);
      return both(
        `AttachDevice(dev=${devId}, pt=${ptId}${pasidText(spec.pasid)}${spec.replace ? ", replace" : ""})`,
        () => m.attach(devId, ptId, spec.pasid ?? 0, spec.replace),
        () => r.attach(devId, ptId, spec.pasid, spec.replace),
      );
    }
    case "detach": {
      const devId = resolveId(spec.dev, m);
      return both(`DetachDevice(dev=${devId}${pasidText(spec.pasid)})`, () => m.detach(devId, spec.pasid ?? 0), () => r.detach(devId, spec.pasid));
    }
    case "destroy": {
      const id = resolveId(spec.id, m);
      return both(`Destroy(${id})`, () => m.destroy(id), () => r.destroy(id));
    }
    case "invalidate": {
      const hwptId = resolveId(spec.hwpt, m);
      return both(`Invalidate(hwpt=${hwptId}, ${show(spec.req)})`, () => m.invalidate(hwptId, modelInvalidations(spec.req)), () => r.invalidate(hwptId, coreInvalidations(spec.req)));
    }
    case "dumpIotlb": {
      const hwptId = resolveId(spec.hwpt, m);
      // VT-d IOTLB contents are not modelled: compare the outcome only.
      const norm = (v: readonly number[]) => (m.profile.driver === "mock" ? v : undefined);
      return both(`DumpIotlb(hwpt=${hwptId})`, () => m.dumpIotlb(hwptId), () => r.dumpIotlb(hwptId), norm);
    }
    case "translate": {
      const devId = resolveId(spec.dev, m);
      const iovas = spec.iovas.map((x) => resolveIova(x, m, undefined, 0x1000n));
      return compareTranslations(m, r, devId, spec.pasid ?? 0, iovas, spec.write, "");
    }
    case "s1map": {
      const gpa = resolveIova(spec.gpa, m, undefined, 0x1000n);
      const entries = s1Entries(spec.iova, gpa, spec);
      const call = `S1Map(iova=${hex(spec.iova)} -> gpa=${hex(gpa)}, ${spec.big ? "2M" : "4K"}, ${spec.rw ? "rw" : "ro"}${spec.us ? ",user" : ",supervisor"}${spec.accessed ? ",A" : ""}) = WriteGuestMemory of ${entries.length} entries`;
      return both(
        call,
        () => entries.forEach(([at]) => m.writeGuestMemory(at, 8)),
        () => entries.forEach(([at, v]) => r.writeGuestMemory(at, 8, le64(v))),
      );
    }
    case "snapshot":
      return both("ExportVm+ImportVm (snapshot round trip)", () => m.snapshot(), () => void r.snapshotRestore());
    case "writeGuest":
      return both(`WriteGuestMemory(gpa=${hex(spec.gpa)}, ${spec.len} bytes)`, () => m.writeGuestMemory(spec.gpa, spec.len), () => r.writeGuestMemory(spec.gpa, spec.len));
  }
}

const translationText = (t: { results: readonly ({ addr: bigint } | { fault: number })[] }): string =>
  t.results.map((x) => ("addr" in x ? hex(x.addr) : `fault:${hex(x.fault)}`)).join(" ");

/** The VT-d nested HWPT the device (PASID) is attached to, if any. */
function vtdNested(m: ReferenceModel, devId: number, pasid: number): MNested | undefined {
  const dev = m.objects.get(devId);
  if (dev?.kind !== "device" || m.profile.driver !== "intel_vtd") return undefined;
  const h = m.objects.get(dev.attachments.get(pasid) ?? 0);
  return h?.kind === "hwpt_nested" ? h : undefined;
}

/** Guest RAM as the VM holds it now: the input of a guest stage-1 walk. */
class VmRam extends RefRam {
  constructor(private readonly core: CoreVm) {
    super(BigInt(core.ctx.memory.size));
  }

  override read(addr: bigint, length: number): Uint8Array {
    return this.core.readGuestMemory(addr, length);
  }
}

/**
 * The reference walker's nested translation (test/reference/reference-walker.ts,
 * from vtd.md) over the model's stage 2 (the parent IOAS's areas) and the
 * guest's tables as they are in RAM right now.
 */
function walkNested(m: ReferenceModel, r: CoreVm, nested: MNested, iova: bigint, write: boolean) {
  const parent = m.objects.get(nested.parentId);
  const ioas = parent?.kind === "hwpt_paging" ? m.objects.get(parent.ioasId) : undefined;
  const s2 = parent?.kind === "hwpt_paging" && ioas?.kind === "ioas" ? stage2Of(ioas, parent) : new RefStage2(4);
  const s1 = { levels: 4 as const, root: nested.vtd!.pgtblAddr, eafe: (nested.vtd!.flags & 2n) !== 0n };
  return translateNested(new VmRam(r), s2, s1, iova, write);
}

/**
 * A device's DMA on both sides. Through a VT-d nested HWPT the IOVAs go one
 * at a time, the reference walk reading RAM just before the core's walk (whose
 * A/D write-backs change RAM); a translated walk's A/D updates must then be
 * in RAM. With an IOTLB, a nested translation may legitimately be a stale
 * cached one once the guest wrote RAM without invalidating everything
 * (MNested.mayBeStale): only then is it not compared. Otherwise a cached one
 * must equal the walk — in particular after stage-2 unmaps.
 */
function compareTranslations(m: ReferenceModel, r: CoreVm, devId: number, pasid: number, iovas: readonly bigint[], write: boolean, after: string): string {
  const p = pasid === 0 ? undefined : pasid;
  const call = `${after}Translate(dev=${devId}${pasidText(p)}, [${iovas.map(hex).join(", ")}], ${write ? "write" : "read"})`;
  const nested = vtdNested(m, devId, pasid);
  if (nested === undefined) {
    return both(call, () => m.translate(devId, pasid, iovas, write), () => r.translate(devId, p, iovas, write), translationText);
  }
  if (m.profile.iotlbEntries !== 0 && nested.mayBeStale) return `${call} not compared (the guest wrote RAM since HWPT ${nested.id}'s IOTLB was last invalidated)`;
  const texts: string[] = [];
  for (const iova of iovas) {
    let updates: { hpa: bigint; bits: bigint }[] = [];
    texts.push(
      both(
        `${call}: IOVA ${hex(iova)} (nested, stage-1 at ${hex(nested.vtd!.pgtblAddr)})`,
        () => {
          const o = walkNested(m, r, nested, iova, write);
          updates = o.fault === 0 ? o.updates : [];
          if (statsOn) count(`nested-dma ${write ? "write" : "read"}`, ` -> ${o.fault === 0 ? "ok" : `fault:0x${o.fault.toString(16)}`}`);
          return { results: [o.fault === 0 ? { addr: o.address } : { fault: o.fault }] };
        },
        () => r.translate(devId, p, [iova], write),
        translationText,
      ),
    );
    for (const u of updates) {
      const v = new DataView(r.readGuestMemory(u.hpa, 8).buffer).getBigUint64(0, true);
      if ((v & u.bits) !== u.bits) throw new Divergence(`${call}: IOVA ${hex(iova)} translated but the stage-1 entry at host ${hex(u.hpa)} lacks A/D bits ${hex(u.bits)} (${hex(v)})`);
    }
  }
  return texts.join("; ");
}

// ---------------------------------------------------------------------------
// Checks after every command

/** The model rendered exactly as snapshotCore() renders the core. */
export function snapshotModel(m: ReferenceModel): string[] {
  const ranges = (rs: readonly Range[]) => rs.map((x) => `${hex(x.start)}-${hex(x.last)}`).join(",");
  const lines: string[] = [];
  for (const id of m.idsOf("any")) {
    const o = m.objects.get(id)!;
    const users = m.users(id);
    switch (o.kind) {
      case "ioas": {
        const areas = o.areas.map((a) => `${hex(a.iova)}-${hex(a.last)}@${hex(a.hostAddr)}:${prot(a.read, a.write)}${a.pagesWritable ? "W" : "R"}`).join(",");
        lines.push(
          `${id} ioas users=${users} hwpts=[${o.hwpts.join(",")}] huge=${o.hugePages ? 1 : 0} align=${hex(m.alignment(o))} ranges=[${ranges(m.iovaRanges(o))}] allowed=[${ranges(o.allowed)}] areas=[${areas}]`,
        );
        break;
      }
      case "hwpt_paging":
        lines.push(`${id} paging users=${users} ioas=${o.ioasId} auto=${+o.auto} nest_parent=${+o.nestParent} dirty=${+o.dirty} pasid=${+o.pasidCompat}`);
        break;
      case "hwpt_nested":
        lines.push(`${id} nested users=${users} parent=${o.parentId} pasid=${+o.pasidCompat} iotlb=[${o.iotlb.map(hex).join(",")}]`);
        break;
      case "device": {
        const att = [...o.attachments].sort((a, b) => a[0] - b[0]).map(([p, h]) => `${p}:${h}`);
        lines.push(`${id} device users=${users} name=${o.name} pasid_cap=${+o.pasidCapable} dirty_cap=${+o.dirtyCapable} att=[${att.join(",")}]`);
        break;
      }
    }
  }
  return lines;
}

/** A few IOVAs worth translating for an attachment: around the IOAS's first areas. */
function probeIovas(m: ReferenceModel, devId: number, pasid: number): bigint[] {
  const dev = m.objects.get(devId);
  const out = new Set<bigint>([m.profile.aperture.start, 0x100_0000n]);
  const h = dev?.kind === "device" ? dev.attachments.get(pasid) : undefined;
  if (h !== undefined) {
    const hw = m.objects.get(h);
    if (hw?.kind === "hwpt_paging" || hw?.kind === "hwpt_nested") {
      const ioas = m.objects.get(m.pagingOf(hw).ioasId);
      if (ioas?.kind === "ioas") {
        for (const a of ioas.areas.slice(0, 3)) {
          out.add(a.iova).add(a.last).add(a.iova + (a.last - a.iova + 1n) / 2n);
          if (a.last < U64_MAX) out.add(a.last + 1n);
          if (a.iova > 0n) out.add(a.iova - 1n);
        }
      }
    }
  }
  if (vtdNested(m, devId, pasid) !== undefined) for (const x of [...S1_IOVAS, 1n << 47n, U64_MAX]) out.add(x);
  return [...out];
}

/**
 * After every command: the core's own graph invariants, then the whole
 * observable state equal to the model's (objects, users counts, areas,
 * allowed ranges, IOVA ranges and alignment, attachments, mock iotlb
 * values), the next id equal to the model's lowest free id, and every
 * device's DMA (RID, each attached PASID) equal to the model's for a few
 * IOVAs, reads and writes.
 */
export function checkAfter(m: ReferenceModel, r: CoreVm, last: string): void {
  const problems = coreInvariantViolations(r);
  if (problems.length > 0) throw new Divergence(`after ${last}: core invariants broken:\n  ${problems.join("\n  ")}`);
  const expected = snapshotModel(m);
  const actual = snapshotCore(r);
  if (expected.join("\n") !== actual.join("\n")) {
    const n = Math.max(expected.length, actual.length);
    const diff: string[] = [];
    for (let i = 0; i < n; i++) {
      if (expected[i] !== actual[i]) diff.push(`  model: ${expected[i] ?? "(none)"}\n  core:  ${actual[i] ?? "(none)"}`);
    }
    throw new Divergence(`after ${last}: state differs\n${diff.join("\n")}`);
  }
  if (m.profile.driver === "intel_vtd" && m.profile.iotlbEntries !== 0) checkIotlbCoherent(m, r, last);
  const next = coreNextId(r);
  if (next !== m.lowestFreeId()) throw new Divergence(`after ${last}: next id: model ${m.lowestFreeId()}, core ${next}`);
  for (const devId of m.idsOf("device")) {
    const dev = m.objects.get(devId);
    if (dev?.kind !== "device") continue;
    for (const pasid of new Set([0, ...dev.attachments.keys()])) {
      const iovas = probeIovas(m, devId, pasid);
      for (const write of [false, true]) compareTranslations(m, r, devId, pasid, iovas, write, `(after ${last}) `);
    }
  }
}

const statsOn = process.env.MODEL_STATS === "1";

/** Outcome counts per command path (MODEL_STATS=1): "map/fixed ok", "attach/replace->ioas EINVAL", ... */
export const coverage = new Map<string, number>();

/** The command's name with what distinguishes its paths (target kind, replace, PASID, ...). */
export function classify(spec: Spec, m: ReferenceModel): string {
  const kindOf = (ref: IdRef) => m.objects.get(resolveId(ref, m))?.kind.replace("hwpt_", "") ?? "missing";
  switch (spec.t) {
    case "attach":
      return `attach${spec.replace ? "/replace" : ""}${spec.pasid ? `/pasid${spec.pasid === 1024 ? "1024" : ""}` : ""}->${kindOf(spec.pt)}`;
    case "detach":
      return `detach${spec.pasid ? "/pasid" : ""}`;
    case "hwptAlloc":
      return `hwptAlloc->${kindOf(spec.pt)}${spec.nestParent ? "/np" : ""}`;
    case "map":
      return `map/${spec.iova === undefined ? "auto" : "fixed"}`;
    case "copy":
      return `copy/${spec.dstIova === undefined ? "auto" : "fixed"}${"mode" in spec.range && spec.range.mode === "pair" ? "/pair" : ""}`;
    case "destroy":
      return `destroy->${kindOf(spec.id)}`;
    case "invalidate":
      return `invalidate/${spec.req.kind}`;
    case "option":
      return `option/${spec.set === undefined ? "get" : "set"}`;
    default:
      return spec.t;
  }
}

function count(key: string, text: string): void {
  const outcome = text.includes(" -> ") ? text.slice(text.lastIndexOf(" -> ") + 4).split(" ")[0] : "skipped";
  const k = `${key} ${outcome}`;
  coverage.set(k, (coverage.get(k) ?? 0) + 1);
}

/**
 * The IOTLB is coherent (vtd.md §4): every entry a live HWPT lists
 * (DumpIotlb) is what a walk of the current tables gives for its IOVA —
 * address, effective page size (api.md Fine points: the largest page both
 * stages allow), combined rights — except for a nested HWPT whose guest
 * may have changed its tables without invalidating (MNested.mayBeStale).
 * Catches entries a flush missed, and entries inherited through a recycled
 * cache tag.
 */
function checkIotlbCoherent(m: ReferenceModel, r: CoreVm, last: string): void {
  for (const id of m.idsOf("hwpt")) {
    const h = m.objects.get(id)!;
    if (h.kind === "hwpt_nested" && h.mayBeStale) continue;
    for (const e of r.iotlbEntries(id)) {
      let expected: { address: bigint; pageSize: bigint; readable: boolean; writeable: boolean } | undefined;
      if (h.kind === "hwpt_paging") {
        const ioas = m.objects.get(h.ioasId);
        const hit = ioas?.kind === "ioas" ? stage2Of(ioas, h).lookup(e.iova) : undefined;
        expected = hit === undefined ? undefined : { ...hit, address: hit.hpa };
      } else if (h.kind === "hwpt_nested") {
        const o = walkNested(m, r, h, e.iova, !e.readable);
        expected = o.fault === 0 ? o : undefined;
      }
      const got = `${hex(e.address)}/${hex(e.pageSize)}/${prot(e.readable, e.writeable)}`;
      const want = expected === undefined ? "no translation" : `${hex(expected.address)}/${hex(expected.pageSize)}/${prot(expected.readable, expected.writeable)}`;
      if (got !== want) {
        throw new Divergence(`after ${last}: IOTLB entry of HWPT ${id}${e.pasid === undefined ? "" : ` pasid ${e.pasid}`} for IOVA ${hex(e.iova)} is ${got}, a walk now gives ${want}`);
      }
    }
  }
}

/** A paging domain of the model as the reference walker's stage 2: its IOAS's areas, each with the page sizes it was mapped with. */
function stage2Of(ioas: Extract<MObject, { kind: "ioas" }>, domain: Extract<MObject, { kind: "hwpt_paging" }>): RefStage2 {
  const s2 = new RefStage2(4);
  for (const a of ioas.areas) {
    s2.add({ iova: a.iova, userVa: a.hostAddr, length: a.last - a.iova + 1n, readable: a.read, writeable: a.write, hugePages: domain.largePages.get(a.iova) ?? ioas.hugePages });
  }
  return s2;
}

/** A fast-check command wrapping one spec; its text is the resolved call once it ran. */
export class Step implements fc.Command<ReferenceModel, CoreVm> {
  private ran: string | undefined;

  constructor(readonly spec: Spec) {}

  check(): boolean {
    return true;
  }

  run(m: ReferenceModel, r: CoreVm): void {
    this.ran = undefined;
    const key = statsOn ? classify(this.spec, m) : "";
    const text = execute(this.spec, m, r);
    this.ran = text;
    if (statsOn) count(key, text);
    checkAfter(m, r, text);
  }

  toString(): string {
    return this.ran ?? show(this.spec);
  }
}

/** Run specs from a fresh VM with every check; returns the transcript. */
export function replay(profile: Profile, specs: readonly Spec[]): string[] {
  const m = new ReferenceModel(profile);
  const r = new CoreVm(profile);
  const log: string[] = [];
  for (const spec of specs) {
    const text = execute(spec, m, r);
    log.push(text);
    checkAfter(m, r, text);
  }
  return log;
}

// ---------------------------------------------------------------------------
// Arbitraries

const raw = fc.constantFrom(0, 1, 2, 3, 4, 6, 9, 1000, 0x7fffffff, 0xffffffff).map((n): IdRef => ({ raw: n }));

/** An id: mostly a live object of the given kinds (weights), sometimes a raw (often wrong) id. */
export function idRef(kinds: [Kind, number][], rawWeight = 1): fc.Arbitrary<IdRef> {
  return fc.oneof(...kinds.map(([k, weight]) => ({ weight, arbitrary: fc.nat(7).map((i): IdRef => ({ k, i })) })), { weight: rawWeight, arbitrary: raw });
}

const U64 = U64_MAX;

export interface Pools {
  readonly userVas: readonly bigint[];
  readonly lengths: readonly bigint[];
  readonly iovas: readonly bigint[];
  readonly allowed: readonly Range[];
  readonly gpas: readonly bigint[];
}

/** The values commands draw from, for both drivers: plausible, edge and wrong ones. */
export function valuePools(guest: bigint): Pools {
  return {
    userVas: [0n, 0x800n, 0x1000n, 0x2000n, 0x3000n, 0x20_0000n, 0x20_1000n, guest - 0x1000n, guest, 3n, 1n << 40n, U64 - 0xfffn],
    lengths: [0x800n, 0x1000n, 0x1000n, 0x2000n, 0x3000n, 0x1_0000n, 0x20_0000n, 0x40_0000n, 1n, 0x7ffn, 0n, U64, U64 - 1n, 1n << 40n],
    iovas: [0n, 0x800n, 0x1000n, 0x100_0000n, 0x100_0800n, 0x100_1000n, 0x100_2000n, 0x120_0000n, 0x7fff_f000n, 0x7fff_f800n, 0x8000_0000n, 3n, 0xff_f000n, 1n << 48n, U64 - 0xfffn, U64],
    allowed: [
      { start: 0x100_0000n, last: 0x7fff_ffffn },
      { start: 0x100_0000n, last: 0x1ff_ffffn },
      { start: 0x200_0000n, last: 0x3ff_ffffn },
      { start: 0x120_0000n, last: 0x12f_ffffn },
      { start: 0n, last: 0xfffn },
      { start: 0x1_0000n, last: 0x1_0000n },
      { start: 0x5000n, last: 0x4000n },
      { start: 0x8000_0000n, last: 0xffff_ffffn },
      { start: 0x1000n, last: U64 - 1n },
    ],
    gpas: [0n, 0x1000n, guest - 8n, guest - 1n, guest, guest + 0x1000n, U64 - 7n],
  };
}

const iovaRef = (p: Pools): fc.Arbitrary<IovaRef> =>
  fc.oneof(
    { weight: 3, arbitrary: fc.constantFrom(...p.iovas).map((abs): IovaRef => ({ abs })) },
    { weight: 2, arbitrary: fc.record({ area: fc.nat(7), at: fc.constantFrom("start" as const, "after" as const, "before" as const, "mid" as const) }) },
  );

const rangeRef = (p: Pools, all: boolean): fc.Arbitrary<RangeRef> =>
  fc.oneof(
    { weight: 2, arbitrary: fc.record({ abs: fc.constantFrom(...p.iovas), len: fc.constantFrom(...p.lengths) }) },
    {
      weight: 5,
      arbitrary: fc.record({
        area: fc.nat(7),
        mode: fc.constantFrom("exact" as const, "exact" as const, "half" as const, "cover" as const, "pair" as const, "inner" as const, "tail" as const),
      }),
    },
    { weight: all ? 1 : 0, arbitrary: fc.constant<RangeRef>({ all: true }) },
  );

/** READABLE/WRITEABLE: mostly both, sometimes one, rarely none. */
const protArb = fc.constantFrom([true, true], [true, true], [true, true], [true, false], [true, false], [false, true], [false, false]);

const pasidArb = fc.oneof(
  { weight: 6, arbitrary: fc.constant(undefined) },
  { weight: 3, arbitrary: fc.constantFrom(1, 7) },
  { weight: 2, arbitrary: fc.constant(1024) },
  { weight: 1, arbitrary: fc.constantFrom(0, 1 << 20) },
);

const mockData: fc.Arbitrary<DataSpec> = fc.oneof(
  { weight: 5, arbitrary: fc.constant<DataSpec>({ kind: "none" }) },
  { weight: 4, arbitrary: fc.constantFrom(0, 0xbadbeef, 0xffffffff).map((iotlb): DataSpec => ({ kind: "selftest", iotlb })) },
  {
    weight: 1,
    arbitrary: fc.record({ kind: fc.constant("raw" as const), type: fc.constantFrom(0xdead, 0, 1, 2), len: fc.constantFrom(0, 3, 4, 5, 24), fill: fc.constantFrom(0, 0x5a) }),
  },
);

const mockInv: fc.Arbitrary<InvSpec> = fc.oneof(
  {
    weight: 3,
    arbitrary: fc.record({
      kind: fc.constant("selftest" as const),
      entries: fc.array(fc.record({ iotlbId: fc.nat(4), all: fc.boolean() }), { maxLength: 4 }),
    }),
  },
  {
    weight: 2,
    arbitrary: fc.record({
      kind: fc.constant("raw" as const),
      type: fc.constantFrom(INVALIDATE_DATA_SELFTEST, INVALIDATE_DATA_SELFTEST, 0xdadbeef, 0),
      entryLen: fc.constantFrom(8, 8, 8, 0, 7, 9),
      entries: fc.array(fc.record({ flags: fc.constantFrom(0, 0, 1, 2), id: fc.nat(5) }), { maxLength: 4 }),
      numDelta: fc.constantFrom(0, 0, 0, 1, -1, 8),
      truncate: fc.constantFrom(0, 0, 0, 3, 8),
    }),
  },
);

const vtdInv: fc.Arbitrary<InvSpec> = fc.oneof(
  {
    weight: 3,
    arbitrary: fc.record({
      kind: fc.constant("vtd_s1" as const),
      entries: fc.array(
        fc.record({ addr: fc.constantFrom(0n, 0x1000n, 0x100_0000n, 0x800n), npages: fc.constantFrom(1n, 16n, 0n, U64), leaf: fc.boolean() }),
        { maxLength: 4 },
      ),
    }),
  },
  {
    weight: 1,
    arbitrary: fc.record({
      kind: fc.constant("raw" as const),
      type: fc.constantFrom(INVALIDATE_DATA_VTD_S1, INVALIDATE_DATA_SELFTEST),
      entryLen: fc.constantFrom(24, 8, 0),
      entries: fc.array(fc.record({ flags: fc.constantFrom(0, 2), id: fc.nat(5) }), { maxLength: 3 }),
      numDelta: fc.constantFrom(0, 0, 1, -1),
      truncate: fc.constantFrom(0, 0, 5),
    }),
  },
);

/** Every command, weighted; `vtd` switches the driver-specific data. */
export function specArb(profile: Profile): fc.Arbitrary<Spec> {
  const p = valuePools(profile.guestMemoryBytes);
  const vtd = profile.driver === "intel_vtd";
  const ioas = idRef([["ioas", 12]]);
  const dev = idRef([["device", 12]]);
  const bool = (truePercent: number) => fc.integer({ min: 1, max: 100 }).map((x) => x <= truePercent);
  const s = <T extends Spec>(a: fc.Arbitrary<T>) => a as fc.Arbitrary<Spec>;
  return fc.oneof(
    { weight: 5, arbitrary: s(fc.constant({ t: "allocIoas" as const })) },
    {
      weight: 9,
      arbitrary: s(
        fc
          .record({
            ioas,
            userVa: fc.constantFrom(...p.userVas),
            length: fc.constantFrom(...p.lengths),
            iova: fc.option(iovaRef(p), { nil: undefined, freq: 3 }),
            prot: protArb,
          })
          .map(({ prot: [r, w], ...x }) => ({ t: "map" as const, ...x, r, w })),
      ),
    },
    { weight: 5, arbitrary: s(fc.record({ t: fc.constant("unmap" as const), ioas, range: rangeRef(p, true) })) },
    {
      weight: 4,
      arbitrary: s(
        fc
          .record({ dst: ioas, src: ioas, range: rangeRef(p, false), dstIova: fc.option(iovaRef(p), { nil: undefined, freq: 3 }), prot: protArb })
          .map(({ prot: [r, w], ...x }) => ({ t: "copy" as const, ...x, r, w })),
      ),
    },
    { weight: 2, arbitrary: s(fc.record({ t: fc.constant("allow" as const), ioas, ranges: fc.array(fc.constantFrom(...p.allowed), { maxLength: 3 }) })) },
    {
      weight: 2,
      arbitrary: s(
        fc.record({ t: fc.constant("option" as const), ioas, set: fc.option(fc.constantFrom(0n, 1n, 1n, 2n), { nil: undefined }), unknown: bool(10) }),
      ),
    },
    {
      weight: 6,
      arbitrary: s(
        fc.record({
          t: fc.constant("bind" as const),
          name: fc.oneof({ weight: 12, arbitrary: fc.nat(5).map((n) => `0000:00:0${n}.0`) }, { weight: 1, arbitrary: fc.constant("") }),
          pasid: bool(60),
          dirty: bool(75),
        }),
      ),
    },
    { weight: 2, arbitrary: s(fc.record({ t: fc.constant("unbind" as const), dev })) },
    {
      weight: 1,
      arbitrary: s(fc.record({ t: fc.constant("hwInfo" as const), dev, type: fc.option(fc.constantFrom(0, 1, 2, 0xfeedbeef), { nil: undefined }) })),
    },
    {
      weight: 9,
      arbitrary: s(
        fc.record({
          t: fc.constant("hwptAlloc" as const),
          dev: idRef([["device", 12], ["any", 1]]),
          pt: idRef([["ioas", 6], ["hwpt_paging", 5], ["hwpt_nested", 1], ["device", 1]]),
          nestParent: bool(45),
          dirty: bool(20),
          pasid: bool(35),
          data: vtd ? vtdDataArb : mockData,
        }),
      ),
    },
    {
      weight: 11,
      arbitrary: s(
        fc.record({
          t: fc.constant("attach" as const),
          dev,
          pt: idRef([["ioas", 4], ["hwpt_paging", 4], ["hwpt_nested", 3], ["device", 1]]),
          pasid: pasidArb,
          replace: bool(30),
        }),
      ),
    },
    { weight: 4, arbitrary: s(fc.record({ t: fc.constant("detach" as const), dev, pasid: pasidArb })) },
    {
      weight: 5,
      arbitrary: s(fc.record({ t: fc.constant("destroy" as const), id: idRef([["ioas", 2], ["hwpt_paging", 2], ["hwpt_nested", 2], ["device", 1], ["any", 2]]) })),
    },
    {
      weight: 4,
      arbitrary: s(
        fc.record({ t: fc.constant("invalidate" as const), hwpt: idRef([["hwpt_nested", 6], ["hwpt_paging", 1], ["any", 1]]), req: vtd ? vtdInv : mockInv }),
      ),
    },
    { weight: 1, arbitrary: s(fc.record({ t: fc.constant("dumpIotlb" as const), hwpt: idRef([["hwpt", 4], ["any", 1]]) })) },
    {
      weight: 3,
      arbitrary: s(
        fc.record({
          t: fc.constant("translate" as const),
          dev,
          pasid: pasidArb,
          iovas: fc.array(iovaRef(p), { minLength: 1, maxLength: 4 }),
          write: fc.boolean(),
        }),
      ),
    },
    { weight: 2, arbitrary: s(fc.constant({ t: "snapshot" as const })) },
    { weight: vtd ? 4 : 0, arbitrary: s(s1MapArb(p)) },
    {
      weight: 1,
      arbitrary: s(
        fc.record({
          t: fc.constant("writeGuest" as const),
          gpa: fc.constantFrom(...p.gpas, ...(vtd ? [S1_ROOT, S1_PD + 8n, s1Pt(0n) + 8n] : [])),
          len: fc.constantFrom(0, 1, 8, 4096),
        }),
      ),
    },
  );
}

/** VT-d stage-1 data: SRE is rare (the unit lacks ECAP.SRS, so attach fails). */
const vtdDataArb: fc.Arbitrary<DataSpec> = fc.oneof(
  { weight: 5, arbitrary: fc.constant<DataSpec>({ kind: "none" }) },
  {
    weight: 4,
    arbitrary: fc.record({
      kind: fc.constant("vtd_s1" as const),
      sre: fc.integer({ min: 0, max: 9 }).map((x) => x === 0),
      eafe: fc.boolean(),
      wpe: fc.boolean(),
      pgtblAddr: fc.constantFrom(0n, 0x10_0000n, 0x3f_f000n),
      addrWidth: fc.constantFrom(48, 48, 48, 57, 39),
    }),
  },
  {
    weight: 1,
    arbitrary: fc.record({ kind: fc.constant("raw" as const), type: fc.constantFrom(1, 0, 0xdead), len: fc.constantFrom(0, 4, 23, 24, 25), fill: fc.constantFrom(0, 0x5a) }),
  },
);

/**
 * A prologue of mostly-valid constructive commands (IOASes, devices, maps in
 * the aperture, paging/nest-parent/nested HWPTs, attachments) so that the
 * random commands after it start from a populated VM more often than not.
 */
export function prologueArb(profile: Profile): fc.Arbitrary<Spec[]> {
  const vtd = profile.driver === "intel_vtd";
  const start = vtd ? 0x100_0000n : profile.aperture.start;
  const first = { k: "ioas" as const, i: 0 };
  const spec = fc.oneof(
    { weight: 3, arbitrary: fc.constant<Spec>({ t: "allocIoas" }) },
    {
      weight: 3,
      arbitrary: fc.record({ n: fc.nat(5), pasid: fc.boolean(), dirty: fc.boolean() }).map(({ n, pasid, dirty }): Spec => ({ t: "bind", name: `0000:00:0${n}.0`, pasid, dirty })),
    },
    {
      weight: 3,
      arbitrary: fc
        .record({ page: fc.nat(15), pages: fc.integer({ min: 1, max: 4 }), va: fc.nat(15), ro: fc.nat(4), auto: fc.nat(3) })
        .map(({ page, pages, va, ro, auto }): Spec => ({
          t: "map",
          ioas: first,
          userVa: BigInt(va) * 0x1000n,
          length: BigInt(pages) * 0x1000n,
          iova: auto === 0 ? undefined : { abs: start + BigInt(page) * 0x1000n },
          r: true,
          w: ro !== 0,
        })),
    },
    {
      weight: 2,
      arbitrary: fc
        .record({ d: fc.nat(3), np: fc.boolean(), pasid: fc.boolean() })
        .map(({ d, np, pasid }): Spec => ({ t: "hwptAlloc", dev: { k: "device", i: d }, pt: { k: "ioas", i: 0 }, nestParent: np, dirty: false, pasid, data: { kind: "none" } })),
    },
    {
      weight: 2,
      arbitrary: fc.record({ d: fc.nat(3), h: fc.nat(3), pasid: fc.boolean() }).map(
        ({ d, h, pasid }): Spec => ({
          t: "hwptAlloc",
          dev: { k: "device", i: d },
          pt: { k: "hwpt_paging", i: h },
          nestParent: false,
          dirty: false,
          pasid,
          data: vtd ? { kind: "vtd_s1", sre: false, eafe: false, wpe: false, pgtblAddr: 0x10_0000n, addrWidth: 48 } : { kind: "selftest", iotlb: 0xbadbeef },
        }),
      ),
    },
    {
      weight: 3,
      arbitrary: fc
        .record({ d: fc.nat(3), kind: fc.constantFrom<Kind>("ioas", "ioas", "hwpt_paging", "hwpt_nested"), h: fc.nat(3), pasid: fc.constantFrom(undefined, undefined, 1, 1024) })
        .map(({ d, kind, h, pasid }): Spec => ({ t: "attach", dev: { k: "device", i: d }, pt: { k: kind, i: h }, pasid, replace: false })),
    },
  );
  const random = fc.array(spec, { maxLength: 10 });
  return fc.oneof({ weight: 3, arbitrary: random }, { weight: 2, arbitrary: fixtureArb(profile) });
}

/**
 * A kernel-selftest-like fixture (mock_domain / two_mock_domain / nesting):
 * one or two IOASes with areas in the aperture, two or three devices, a
 * nest parent with a nested HWPT, devices attached to the IOAS (auto domain),
 * the parent, the nested HWPT, and PASIDs.
 */
function fixtureArb(profile: Profile): fc.Arbitrary<Spec[]> {
  const vtd = profile.driver === "intel_vtd";
  const start = vtd ? 0x100_0000n : profile.aperture.start;
  const nestedData = (iotlb: number): DataSpec =>
    vtd ? { kind: "vtd_s1", sre: false, eafe: false, wpe: false, pgtblAddr: 0x10_0000n, addrWidth: 48 } : { kind: "selftest", iotlb };
  return fc
    .record({
      ioases: fc.integer({ min: 1, max: 2 }),
      devices: fc.array(fc.record({ pasid: fc.boolean(), dirty: fc.boolean() }), { minLength: 1, maxLength: 3 }),
      areas: fc.array(fc.record({ page: fc.nat(31), pages: fc.constantFrom(1, 2, 3, 512), ro: fc.nat(5), ioas: fc.nat(1) }), { maxLength: 4 }),
      parentPasid: fc.boolean(),
      nestedPasid: fc.boolean(),
      iotlb: fc.constantFrom(0xbadbeef, 0),
      hugeOff: fc.integer({ min: 0, max: 4 }).map((x) => x === 0),
      hugeBackOn: fc.boolean(),
      tables: fc.constantFrom("all", "all", "all", "all", "all", "all", "all", "all", "root", "none"),
      s1: fc.array(fc.record({ iova: fc.nat(9), area: fc.nat(5), big: fc.boolean(), accessed: fc.boolean() }), { maxLength: vtd ? 4 : 0 }),
      attach: fc.array(
        fc.record({ d: fc.nat(2), to: fc.constantFrom<Kind>("ioas", "hwpt_paging", "hwpt_nested"), h: fc.nat(3), pasid: fc.constantFrom(undefined, undefined, 1, 1024) }),
        { maxLength: 4 },
      ),
    })
    .map((f) => {
      const out: Spec[] = [];
      for (let i = 0; i < f.ioases; i++) out.push({ t: "allocIoas" });
      // Now and then the VMM asks for 4 KiB stage-2 pages first (IOMMU_OPTION_HUGE_PAGES = 0).
      if (f.hugeOff) out.push({ t: "option", ioas: { k: "ioas", i: 0 }, set: 0n, unknown: false });
      f.devices.forEach((d, i) => out.push({ t: "bind", name: `0000:00:0${i}.0`, pasid: d.pasid, dirty: d.dirty }));
      for (const a of f.areas) {
        // 512 pages: a 2 MiB area, 2 MiB aligned on both sides (a large-page candidate).
        const page = a.pages === 512 ? 512n * BigInt(a.page % 3) : BigInt(a.page);
        out.push({ t: "map", ioas: { k: "ioas", i: a.ioas }, userVa: page * 0x1000n, length: BigInt(a.pages) * 0x1000n, iova: { abs: start + page * 0x1000n }, r: true, w: a.ro !== 0 });
      }
      if (vtd) {
        // The root page, then the lower tables; now and then write-only, so
        // that stage 2 does not let the walk read them (0x75 root, 0x76 below).
        const below = S1_TABLES.start + 0x1000n;
        out.push({ t: "map", ioas: { k: "ioas", i: 0 }, userVa: S1_TABLES.start, length: 0x1000n, iova: { abs: S1_TABLES.start }, r: f.tables !== "none", w: true });
        out.push({ t: "map", ioas: { k: "ioas", i: 0 }, userVa: below, length: S1_TABLES.last - below + 1n, iova: { abs: below }, r: f.tables === "all", w: true });
        for (const x of f.s1) out.push({ t: "s1map", iova: S1_IOVAS[x.iova % S1_IOVAS.length], gpa: { area: x.area, at: "start" }, big: x.big, rw: true, us: true, accessed: x.accessed });
      }
      out.push({ t: "hwptAlloc", dev: { k: "device", i: 0 }, pt: { k: "ioas", i: 0 }, nestParent: true, dirty: false, pasid: f.parentPasid, data: { kind: "none" } });
      out.push({ t: "hwptAlloc", dev: { k: "device", i: 0 }, pt: { k: "hwpt_paging", i: 0 }, nestParent: false, dirty: false, pasid: f.nestedPasid, data: nestedData(f.iotlb) });
      for (const a of f.attach) out.push({ t: "attach", dev: { k: "device", i: a.d }, pt: { k: a.to, i: a.h }, pasid: a.pasid, replace: false });
      // ... and back to large pages for what it maps from now on.
      if (f.hugeOff && f.hugeBackOn) out.push({ t: "option", ioas: { k: "ioas", i: 0 }, set: 1n, unknown: false });
      return out;
    });
}

/** A stage-1 mapping the guest writes into its tables (VT-d). */
function s1MapArb(p: Pools): fc.Arbitrary<Spec> {
  return fc.record({
    t: fc.constant("s1map" as const),
    iova: fc.constantFrom(...S1_IOVAS),
    gpa: iovaRef(p),
    big: fc.integer({ min: 0, max: 4 }).map((x) => x === 0),
    rw: fc.integer({ min: 0, max: 4 }).map((x) => x !== 0),
    us: fc.integer({ min: 0, max: 6 }).map((x) => x !== 0),
    accessed: fc.boolean(),
  });
}
