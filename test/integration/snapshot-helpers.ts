import { createHash } from "node:crypto";
import { create, fromBinary } from "@bufbuild/protobuf";
import { sizeDelimitedEncode, sizeDelimitedPeek } from "@bufbuild/protobuf/wire";
import type { IommufdClient, IommufdError } from "../../client/client.js";
import { FS_P, FS_RW, FS_US, SZ_2M, SZ_4K, Stage1PageTable } from "../../client/pagetable.js";
import { IommuOption } from "../../gen/iommufd/v1/ioas_pb.js";
import { type VmSnapshotRecord, VmSnapshotRecordSchema } from "../../gen/iommufd/v1/snapshot_pb.js";
import { IommuModel } from "../../gen/iommufd/v1/vm_pb.js";
import type { TestServer } from "../helpers/server.js";
import { bind, dumpIotlb, ioas, MIB, nextId, objectCount, pagingHwpt, ranges, selftestInv, type Vm } from "./helpers.js";
import { createNestedVm, mapArea, TABLE_BASE } from "./translate-helpers.js";

/**
 * ExportVm/ImportVm fixtures shared by the in-process snapshot tests and the
 * process/restart e2e tests: two rich VMs (MOCK and nested VT-d) built
 * through the API, an observation of everything a client can see of a VM
 * (through the RPCs only), a fixed sequence of further operations, and the
 * record framing of snapshot.proto for hand-built streams.
 */

/** A VM handle on any client (helpers.ts's Vm). */
export function vmOn(client: IommufdClient, id: string, model: IommuModel): Vm {
  return { id, v: client.vm(id), client, model };
}

/** A call's result, or "error ERRNO": lets failures be compared as data. */
export async function outcome<T>(p: Promise<T>): Promise<T | string> {
  return p.then(
    (x) => x,
    (e: IommufdError) => `error ${e.errno ?? e.message}`,
  );
}

/** What observe() looks at and further() works on; ids come from the original build. */
export interface Probe {
  model: IommuModel;
  /** Every id up to here is probed (holes included). */
  maxId: number;
  /** The (device, PASID) paths to translate through; pasid undefined = RID. */
  paths: { devId: number; pasid?: number }[];
  iovas: bigint[];
  /** Guest RAM to compare: [gpa, length]. */
  ram: [bigint, number][];
  /** Model-specific ids for further(). */
  ids: Record<string, number>;
  /** VT-d: guest addresses of stage-1 leaf entries further() rewrites. */
  entries?: Record<string, bigint>;
}

export interface Built {
  vm: Vm;
  probe: Probe;
}

// ---------------------------------------------------------------------------
// Rich VMs

/** A deterministic byte pattern. */
export function pattern(length: number, seed: number): Uint8Array {
  const b = new Uint8Array(length);
  for (let i = 0; i < length; i++) b[i] = (i * 131 + seed * 7 + (i >> 8)) & 0xff;
  return b;
}

/**
 * A MOCK VM with three IOASes (fixed, automatic and copied areas, AllowIovas,
 * HUGE_PAGES off on one), destroyed objects leaving id holes, devices with
 * RID and PASID attachments, a nest-parent/PASID paging HWPT, a dirty-
 * tracking one, two automatic domains, two nested HWPTs whose selftest iotlb
 * values were changed by Invalidate, some touched RAM and translations.
 */
export async function buildMockVm(client: IommufdClient, vmId: string): Promise<Built> {
  await client.createVm({ vmId, model: IommuModel.MOCK, guestMemoryBytes: 64n * MIB });
  const vm = vmOn(client, vmId, IommuModel.MOCK);
  const v = vm.v;
  const A = await ioas(vm); // 1
  const B = await ioas(vm); // 2
  const tmpIoas = await ioas(vm); // 3
  const C = await ioas(vm); // 4
  await v.setOption({ option: IommuOption.HUGE_PAGES, objectId: B, value: 0n });
  const dev1 = await bind(vm, { name: "mock-dev1", pasid: true, dirty: true });
  const dev2 = await bind(vm, { name: "mock-dev2", pasid: false, dirty: false });
  const tmpDev = await bind(vm, { name: "mock-tmp", pasid: true });
  const dev3 = await bind(vm, { name: "mock-dev3", pasid: true, dirty: true });
  const dev4 = await bind(vm, { name: "mock-dev4", pasid: false, dirty: true });
  const parent = await pagingHwpt(vm, dev1, A, { nestParent: true, pasid: true });
  const dirty = await pagingHwpt(vm, dev1, B, { dirtyTracking: true });
  const tmpHwpt = await pagingHwpt(vm, dev1, C);
  const selftest = (iotlb: number) => ({ case: "selftest" as const, value: { iotlb } });
  const { hwptId: nested1 } = await v.allocHwpt({ devId: dev1, ptId: parent, pasid: true, data: selftest(0x1234) });
  const { hwptId: nested2 } = await v.allocHwpt({ devId: dev1, ptId: parent, pasid: true, data: selftest(0xbadbeef) });
  const { hwptId: nested3 } = await v.allocHwpt({ devId: dev3, ptId: parent, data: selftest(0x77) });
  await v.destroy({ id: tmpIoas });
  await v.unbindDevice({ devId: tmpDev });
  await v.destroy({ id: tmpHwpt });

  // Touched RAM, some of it straddling pages.
  const writes: [bigint, number][] = [
    [0n, 4096],
    [0x101000n, 8192],
    [0x3ff800n, 4096],
    [64n * MIB - 4096n, 4096],
  ];
  for (const [i, [gpa, len]] of writes.entries()) await v.writeGuestMemory({ gpa, data: pattern(len, i + 1) });

  // Areas: fixed (read-write, read-only), automatic, within allowed ranges, copies.
  const rw = { readable: true, writeable: true };
  await v.mapIoas({ ioasId: A, iova: 0x1000000n, userVa: 0n, length: 0x200000n, ...rw });
  await v.mapIoas({ ioasId: A, iova: 0x2000000n, userVa: 0x100000n, length: 0x10000n, readable: true, writeable: false });
  const { iova: autoA } = await v.mapIoas({ ioasId: A, userVa: 0x300000n, length: 0x100000n, ...rw });
  await v.mapIoas({ ioasId: B, iova: 0x1800000n, userVa: 0x3ff000n, length: 0x2000n, ...rw });
  await v.allowIovas({ ioasId: C, ranges: [{ start: 0x1000000n, last: 0x10fffffn }, { start: 0x5000000n, last: 0x50fffffn }] });
  const { iova: autoC1 } = await v.mapIoas({ ioasId: C, userVa: 0n, length: 0x80000n, ...rw });
  const { iova: autoC2 } = await v.mapIoas({ ioasId: C, userVa: 0x3fe000n, length: 0x100000n, ...rw });
  await v.copyIoas({ dstIoasId: B, srcIoasId: A, srcIova: 0x1000000n, length: 0x100000n, dstIova: 0x3000000n, ...rw });
  const { dstIova: copyAuto } = await v.copyIoas({ dstIoasId: B, srcIoasId: A, srcIova: autoA, length: 0x100000n, readable: true, writeable: false });

  // Attachments: nested RID and PASIDs, PASID on the parent, automatic domains.
  await v.attachDevice({ devId: dev1, ptId: nested1 });
  await v.attachDevice({ devId: dev1, ptId: nested1, pasid: 5 });
  await v.attachDevice({ devId: dev1, ptId: parent, pasid: 9 });
  const { hwptId: autoC } = await v.attachDevice({ devId: dev2, ptId: C });
  const { hwptId: autoA_ } = await v.attachDevice({ devId: dev4, ptId: A });
  await v.attachDevice({ devId: dev3, ptId: nested2, pasid: 3 });

  // Changed selftest iotlb values.
  await v.invalidate({ hwptId: nested1, requests: selftestInv([{ iotlbId: 0 }, { iotlbId: 3 }]) });
  await v.invalidate({ hwptId: nested2, requests: selftestInv([{ iotlbId: 1 }]) });

  // One more hole in the middle: an IOAS with an area, destroyed.
  const D = await ioas(vm);
  await v.mapIoas({ ioasId: D, iova: 0x1000000n, userVa: 0n, length: 0x1000n, ...rw });
  await v.destroy({ id: D });

  const probe: Probe = {
    model: IommuModel.MOCK,
    maxId: 0,
    paths: [{ devId: dev1 }, { devId: dev1, pasid: 5 }, { devId: dev1, pasid: 9 }, { devId: dev2 }, { devId: dev3 }, { devId: dev3, pasid: 3 }, { devId: dev4 }],
    iovas: [
      0n,
      0x1000000n,
      0x1000801n,
      0x10ff7ffn,
      0x11fffffn,
      0x1200000n,
      0x1800000n,
      0x1801fffn,
      0x2000000n,
      0x200f000n,
      0x2010000n,
      autoA,
      autoA + 0xfffffn,
      autoC1,
      autoC2 + 0x1234n,
      0x3000000n,
      0x30fffffn,
      copyAuto + 0x800n,
      0x7fffffffn,
      1n << 40n,
    ],
    ram: [
      [0n, 0x402000],
      [64n * MIB - 0x2000n, 0x2000],
    ],
    ids: { A, B, C, D, dev1, dev2, dev3, dev4, parent, dirty, nested1, nested2, nested3, autoC, autoA: autoA_ },
  };
  probe.maxId = Math.max(...Object.values(probe.ids)) + 2;
  // Some DMA, so that the counters have something to continue from.
  for (const p of probe.paths) await v.translate({ ...p, iovas: probe.iovas.slice(0, 12), write: p.devId === dev1 });
  return { vm, probe };
}

/**
 * A nested VT-d VM: IOAS 1 (2 MiB stage-2 pages) with the first 64 MiB
 * identity-mapped and a hole, stage-1 tables built with Stage1PageTable,
 * two nested HWPTs (one EAFE) with RID and PASID attachments, a device on
 * the nest parent alone (stage 2 only), a second IOAS with an automatic
 * domain, an id hole, touched RAM and translations (A/D set in the tables).
 * At the end every IOTLB has been invalidated, so that the original, like an
 * import, starts from empty caches.
 */
export async function buildVtdVm(client: IommufdClient, vmId: string): Promise<Built> {
  // createNestedVm uses only the client of the TestServer.
  const nv = await createNestedVm({ client } as TestServer, vmId, {
    pasid: true,
    hugePages: true,
    options: { iotlbEntries: 512 },
    areas: [
      { iova: 0n, userVa: 0n, length: 32n * MIB },
      { iova: 34n * MIB, userVa: 34n * MIB, length: 30n * MIB },
      { iova: 0x4000_0000n, userVa: 0x800000n, length: 2n * MIB, writeable: true },
    ],
  });
  const vm = vmOn(client, vmId, IommuModel.INTEL_VTD);
  const v = vm.v;
  const { ioasId, devId: dev0, parentId, nestedId, s1 } = nv;
  // Stage 1: 4 KiB and 2 MiB leaves, read-only, supervisor-only, into the stage-2 hole.
  await s1.map(0x1000n, 0x800000n, SZ_4K);
  await s1.map(0x2000n, 0x801000n, SZ_4K, { writeable: false });
  await s1.map(0x3000n, 0x802000n, SZ_4K, { user: false });
  await s1.map(0x400000n, 0xa00000n, SZ_2M);
  await s1.map(0x5000n, 0x2000000n + 0x5000n, SZ_4K); // GPA in the stage-2 hole [32, 34) MiB
  await s1.map(0x7000_0000n, 0x4000_0000n, SZ_4K); // GPA only stage 2 maps: not host-mapped 1:1
  const s1b = new Stage1PageTable(v, { tableBase: 0x300000n, tableBytes: 0x100000n });
  await s1b.map(0x1000n, 0x900000n, SZ_4K);
  await s1b.map(0x10_0000_0000n, 0xc00000n, SZ_2M);
  const tmp = await bind(vm, { name: "vtd-tmp" });
  const { devId: dev1 } = await v.bindDevice({ name: "vtd-dev1", pasidCapable: true, dirtyTrackingCapable: false });
  const { devId: dev2 } = await v.bindDevice({ name: "vtd-dev2", pasidCapable: false, dirtyTrackingCapable: true });
  const { hwptId: nested2 } = await v.allocHwpt({ devId: dev1, ptId: parentId, pasid: true, data: { case: "vtdS1", value: { pgtblAddr: s1b.root, addrWidth: 48, eafe: true } } });
  await v.attachDevice({ devId: dev1, ptId: nested2 });
  await v.attachDevice({ devId: dev1, ptId: nestedId, pasid: 5 });
  await v.attachDevice({ devId: dev0, ptId: nested2, pasid: 7 });
  await v.attachDevice({ devId: dev2, ptId: parentId });
  await v.unbindDevice({ devId: tmp });
  const ioas2 = await ioas(vm);
  await mapArea(v, ioas2, { iova: 0x10000n, userVa: 0x800000n, length: 0x10000n, writeable: false });
  const { devId: dev3 } = await v.bindDevice({ name: "vtd-dev3", pasidCapable: false, dirtyTrackingCapable: false });
  const { hwptId: auto2 } = await v.attachDevice({ devId: dev3, ptId: ioas2 });
  await v.writeGuestMemory({ gpa: 0x800000n, data: pattern(0x3000, 9) });
  await v.writeGuestMemory({ gpa: 0xa12000n, data: pattern(0x800, 10) });
  await v.writeGuestMemory({ gpa: 0x900ff0n, data: pattern(0x20, 11) });

  const probe: Probe = {
    model: IommuModel.INTEL_VTD,
    maxId: 0,
    paths: [{ devId: dev0 }, { devId: dev0, pasid: 7 }, { devId: dev1 }, { devId: dev1, pasid: 5 }, { devId: dev1, pasid: 6 }, { devId: dev2 }, { devId: dev3 }],
    iovas: [0x1234n, 0x1234n, 0x2008n, 0x3010n, 0x412345n, 0x5000n, 0x6000n, 0x7000_0010n, 0x10_0000_0000n + 0x1234n, 0x10000n + 0x10n, 0x4000_0000n + 0x18n, 0x0000_8000_0000_0000n],
    ram: [
      [TABLE_BASE, 0x100000],
      [0x300000n, 0x100000],
      [0x800000n, 0x3000],
      [0x900000n, 0x1000],
      [0xa00000n, 0x20000],
    ],
    ids: { ioasId, dev0, parentId, nestedId, nested2, dev1, dev2, dev3, ioas2, auto2 },
    entries: { leaf1000: await s1.entryAddress(0x1000n, 1), leaf2000: await s1.entryAddress(0x2000n, 1), leafB1000: await s1b.entryAddress(0x1000n, 1) },
  };
  probe.maxId = Math.max(...Object.values(probe.ids)) + 2;
  // Nested DMA only (stage-2-only entries could not be invalidated), reads and writes: A/D go to the tables.
  for (const p of [{ devId: dev0 }, { devId: dev0, pasid: 7 }, { devId: dev1 }, { devId: dev1, pasid: 5 }]) {
    await v.translate({ ...p, iovas: probe.iovas });
    await v.translate({ ...p, iovas: probe.iovas.slice(0, 5), write: true });
  }
  for (const hwptId of [nestedId, nested2]) await v.invalidate({ hwptId, requests: { case: "vtdS1", value: { entries: [Stage1PageTable.invalidateAll()] } } });
  return { vm, probe };
}

// ---------------------------------------------------------------------------
// Observation

/** The ListVms entry of a VM, without its id. */
export async function listed(vm: Vm) {
  let pageToken = "";
  for (;;) {
    const page = await vm.client.listVms({ pageSize: 1000, pageToken });
    const found = page.vms.find((x) => x.vmId === vm.id);
    if (found) return { model: found.model, guestMemoryBytes: found.guestMemoryBytes, options: found.options, objectCount: found.objectCount, tenant: found.tenant };
    if (page.nextPageToken === "") throw new Error(`VM ${vm.id} is not listed`);
    pageToken = page.nextPageToken;
  }
}

/** Every vm_id the client's tenant has, sorted. */
export async function vmIds(client: IommufdClient): Promise<string[]> {
  const ids: string[] = [];
  let pageToken = "";
  do {
    const page = await client.listVms({ pageSize: 1000, pageToken });
    ids.push(...page.vms.map((x) => x.vmId));
    pageToken = page.nextPageToken;
  } while (pageToken !== "");
  return ids.sort();
}

/**
 * Everything a client can see of a VM, through the RPCs only: its listing
 * and counters; for every id (holes included) what GetIovaRanges,
 * GetOption(HUGE_PAGES), DumpIotlb and HwInfo answer; Translate of every
 * probed IOVA, read and write, through every (device, PASID); the guest RAM
 * regions; and the id the next object gets. Translating changes counters,
 * caches and A/D bits: two VMs in the same state stay in the same state.
 */
export async function observe(vm: Vm, probe: Probe) {
  const v = vm.v;
  const ids: Record<number, { ranges: unknown; hugePages: unknown; iotlb: unknown; hwInfo: unknown }> = {};
  for (let id = 1; id <= probe.maxId; id++) {
    ids[id] = {
      ranges: await outcome(ranges(vm, id)),
      hugePages: await outcome(v.getOption({ option: IommuOption.HUGE_PAGES, objectId: id }).then((r) => r.value)),
      iotlb: await outcome(dumpIotlb(vm, id)),
      hwInfo: await outcome(v.hwInfo({ devId: id })),
    };
  }
  const listing = await listed(vm);
  const statsBefore = (await v.getStats()).stats;
  const translations: unknown[] = [];
  for (const p of probe.paths) {
    for (const write of [false, true]) translations.push(await outcome(v.translate({ ...p, iovas: probe.iovas, write })));
  }
  const ram: string[] = [];
  for (const [gpa, length] of probe.ram) {
    const { data } = await v.readGuestMemory({ gpa, length });
    ram.push(createHash("sha256").update(data).digest("hex"));
  }
  return { listing, statsBefore, ids, translations, ram, statsAfter: (await v.getStats()).stats, objectCount: await objectCount(vm), nextId: await nextId(vm) };
}

/** Reads a VT-d stage-1 entry value for further(). */
function le64(value: bigint): Uint8Array {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(value);
  return new Uint8Array(b);
}

/**
 * The same further operations, whatever VM they run on, with every result
 * (or errno) recorded: new objects fill the id holes, automatic IOVAs and
 * domains are picked, attachments change, and at the end every id is
 * destroyed in order (twice), which only succeeds where the references
 * allow it.
 */
export async function further(vm: Vm, probe: Probe): Promise<unknown[]> {
  const v = vm.v;
  const log: unknown[] = [];
  const rec = async (what: string, p: Promise<unknown>) => log.push([what, await outcome(p)]);
  const i = probe.ids;
  const rw = { readable: true, writeable: true };
  await rec("alloc ioas", v.allocIoas());
  await rec("alloc ioas", v.allocIoas());
  if (probe.model === IommuModel.MOCK) {
    for (const ioasId of [i.A, i.B, i.C]) await rec(`map auto ${ioasId}`, v.mapIoas({ ioasId, userVa: 0x200000n, length: 0x40000n, ...rw }));
    await rec("copy auto", v.copyIoas({ dstIoasId: i.B, srcIoasId: i.A, srcIova: 0x1000000n, length: 0x100000n, ...rw }));
    await rec("copy unmapped", v.copyIoas({ dstIoasId: i.B, srcIoasId: i.A, srcIova: 0x1200000n, length: 0x1000n, ...rw }));
    await rec("map over", v.mapIoas({ ioasId: i.B, iova: 0x3000000n, userVa: 0n, length: 0x1000n, ...rw }));
    await rec("replace dev2 -> A (auto domain reuse)", v.attachDevice({ devId: i.dev2, ptId: i.A, replace: true }));
    await rec("alloc ioas", v.allocIoas());
    await rec("attach dev3 RID -> dirty", v.attachDevice({ devId: i.dev3, ptId: i.dirty }));
    await rec("invalidate nested2 all", v.invalidate({ hwptId: i.nested2, requests: selftestInv([{ iotlbId: 0, all: true }]) }));
    await rec("dump nested1", dumpIotlb(vm, i.nested1));
    await rec("dump nested2", dumpIotlb(vm, i.nested2));
    await rec("unmap A", v.unmapIoas({ ioasId: i.A, iova: 0x1000000n, length: 0x200000n }));
    await rec("unmap B partial", v.unmapIoas({ ioasId: i.B, iova: 0x3000000n, length: 0x1000n }));
    await rec("set huge pages A", v.setOption({ option: IommuOption.HUGE_PAGES, objectId: i.A, value: 0n }));
    await rec("detach dev1 pasid 5", v.detachDevice({ devId: i.dev1, pasid: 5 }));
    await rec("detach dev1 pasid 9", v.detachDevice({ devId: i.dev1, pasid: 9 }));
    await rec("detach dev4", v.detachDevice({ devId: i.dev4 }));
  } else {
    const e = probe.entries!;
    // A stage-1 change the IOTLB hides until invalidated, then shows.
    await rec("rewrite leaf 0x1000", v.writeGuestMemory({ gpa: e.leaf1000, data: le64(0x805000n | FS_P | FS_RW | FS_US) }));
    await rec("translate stale", v.translate({ devId: i.dev0, iovas: [0x1010n, 0x2010n] }));
    await rec("invalidate leaf", v.invalidate({ hwptId: i.nestedId, requests: { case: "vtdS1", value: { entries: [Stage1PageTable.invalidation(0x1000n, SZ_4K)] } } }));
    await rec("translate fresh", v.translate({ devId: i.dev0, iovas: [0x1010n, 0x2010n] }));
    await rec("rewrite leaf B", v.writeGuestMemory({ gpa: e.leafB1000, data: le64(0n) }));
    await rec("translate B stale", v.translate({ devId: i.dev1, iovas: [0x1010n] }));
    await rec("unmap stage 2", v.unmapIoas({ ioasId: i.ioasId, iova: 34n * MIB, length: 30n * MIB }));
    await rec("translate after unmap", v.translate({ devId: i.dev0, iovas: [0x1010n, 0x412345n, 0x7000_0010n] }));
    await rec("map auto", v.mapIoas({ ioasId: i.ioas2, userVa: 0x900000n, length: 0x4000n, ...rw }));
    await rec("map nest parent read-only", v.mapIoas({ ioasId: i.ioasId, iova: 34n * MIB, userVa: 0n, length: 0x1000n, readable: true, writeable: false }));
    await rec("attach dev2 -> ioas2 (auto domain reuse)", v.attachDevice({ devId: i.dev2, ptId: i.ioas2, replace: true }));
    await rec("translate dev2", v.translate({ devId: i.dev2, iovas: [0x10010n, 0x1234n] }));
    await rec("dump nested", dumpIotlb(vm, i.nestedId));
    await rec("detach dev0", v.detachDevice({ devId: i.dev0 }));
    await rec("detach dev0 pasid 7", v.detachDevice({ devId: i.dev0, pasid: 7 }));
  }
  for (let round = 0; round < 2; round++) {
    for (let id = 1; id <= probe.maxId + 3; id++) await rec(`destroy ${id}`, v.destroy({ id }));
  }
  await rec("listing", listed(vm).then((l) => ({ ...l, tenant: undefined })));
  await rec("stats", v.getStats());
  await rec("next id", nextId(vm));
  return log;
}

// ---------------------------------------------------------------------------
// The byte stream of snapshot.proto

export interface RecordSpan {
  /** Offset of the length prefix. */
  start: number;
  /** Offset of the message. */
  body: number;
  /** Offset after the message. */
  end: number;
  record: VmSnapshotRecord;
}

/** Splits a snapshot stream into its length-delimited records. */
export function parseRecords(stream: Uint8Array): RecordSpan[] {
  const spans: RecordSpan[] = [];
  for (let start = 0; start < stream.length; ) {
    const peek = sizeDelimitedPeek(stream.subarray(start));
    if (peek.eof) throw new Error(`truncated length prefix at ${start}`);
    const body = start + peek.offset;
    const end = body + peek.size;
    if (end > stream.length) throw new Error(`truncated record at ${start}`);
    spans.push({ start, body, end, record: fromBinary(VmSnapshotRecordSchema, stream.subarray(body, end)) });
    start = end;
  }
  return spans;
}

/** Encodes header and pages records and appends a valid trailer (length, SHA-256, page count). */
export function encodeRecords(records: readonly VmSnapshotRecord[]): Buffer {
  const body = Buffer.concat(records.map((r) => sizeDelimitedEncode(VmSnapshotRecordSchema, r)));
  let pageCount = 0;
  for (const r of records) if (r.record.case === "pages") pageCount += r.record.value.pages.length;
  const trailer = create(VmSnapshotRecordSchema, {
    record: { case: "trailer", value: { length: BigInt(body.length), sha256: createHash("sha256").update(body).digest(), pageCount: BigInt(pageCount) } },
  });
  return Buffer.concat([body, sizeDelimitedEncode(VmSnapshotRecordSchema, trailer)]);
}

/** The records of a stream without its trailer, for editing and encodeRecords(). */
export function recordsOf(stream: Uint8Array): VmSnapshotRecord[] {
  return parseRecords(stream)
    .map((s) => s.record)
    .filter((r) => r.record.case !== "trailer");
}
