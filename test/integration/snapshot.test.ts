/**
 * ExportVm / ImportVm against real servers on loopback, with real clients.
 *
 * Round trips: a rich MOCK VM and a nested VT-d VM are exported, imported on
 * the same server under another vm_id and into a second server, and the
 * copies are compared with the original through the RPCs only (observe():
 * every id's kind and contents, every translation, the touched RAM, the
 * counters, the next id), then driven through the same further operations
 * (further()), which must give the same results on every copy.
 *
 * Refusals: every corruption of the stream (flipped bytes in header, pages
 * and trailer, truncations, trailing garbage, an empty stream), an unknown
 * format, streams with a valid checksum whose objects do not hang together,
 * EEXIST, bad vm_ids, ENOENT, quotas, and a client that gives up mid-stream:
 * each leaves no VM and no quota usage behind.
 */
import { create } from "@bufbuild/protobuf";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import type { IommufdClient } from "../../client/client.js";
import { SZ_4K, Stage1PageTable } from "../../client/pagetable.js";
import { SnapshotFormat, SnapshotObjectSchema, type VmSnapshotRecord } from "../../gen/iommufd/v1/snapshot_pb.js";
import { IommuModel } from "../../gen/iommufd/v1/vm_pb.js";
import { DEFAULT_CONFIG } from "../../server/config.js";
import type { Limits } from "../../server/core/limits.js";
import { startTestServer, type TestServer } from "../helpers/server.js";
import { expectFail, MIB, objectCount } from "./helpers.js";
import {
  type Built,
  buildMockVm,
  buildVtdVm,
  encodeRecords,
  further,
  observe,
  listed,
  outcome,
  parseRecords,
  pattern,
  recordsOf,
  vmIds,
  vmOn,
} from "./snapshot-helpers.js";
import { createNestedVm, dump, stats } from "./translate-helpers.js";

const PAGE_BYTES = 4096;

const servers: TestServer[] = [];
async function server(limits: Partial<Limits> = {}): Promise<TestServer> {
  const t = await startTestServer({ limits: { ...DEFAULT_CONFIG.limits, ...limits } });
  servers.push(t);
  return t;
}
afterAll(async () => {
  for (const t of servers) await t.close();
});

/** Pages a snapshot stream carries (its trailer's page_count). */
function pageCount(stream: Uint8Array): number {
  const last = parseRecords(stream).at(-1)!.record;
  if (last.record.case !== "trailer") throw new Error("no trailer");
  return Number(last.record.value.pageCount);
}

/** A copy of `stream` with the byte at `offset` XORed with `mask`. */
function flip(stream: Uint8Array, offset: number, mask = 0xff): Buffer {
  const b = Buffer.from(stream);
  b[offset] ^= mask;
  return b;
}

/** The header record of a stream's records (to edit). */
function headerOf(records: VmSnapshotRecord[]) {
  const r = records[0].record;
  if (r.case !== "header") throw new Error("first record is not the header");
  return r.value;
}

type Header = ReturnType<typeof headerOf>;

/** Edits of a header's objects (for the valid-checksum refusals). */
function setNested(h: Header, id: number, edit: (n: { parentId: number; data?: { data: Uint8Array } }) => void) {
  const o = h.objects.find((x) => x.id === id)!.object;
  if (o.case !== "hwptNested") throw new Error(`${id} is not nested`);
  edit(o.value);
}
function setDevice(h: Header, id: number, edit: (d: { name: string; attachments: { pasid: number; hwptId: number }[] }) => void) {
  const o = h.objects.find((x) => x.id === id)!.object;
  if (o.case !== "device" || o.value.attachments.length === 0) throw new Error(`${id} is not an attached device`);
  edit(o.value);
}
function setIoas(h: Header, id: number, edit: (i: { hwptIds: number[]; areas: { iova: bigint; userVa: bigint; length: bigint }[] }) => void) {
  const o = h.objects.find((x) => x.id === id)!.object;
  if (o.case !== "ioas") throw new Error(`${id} is not an IOAS`);
  edit(o.value);
}
/** The pages of the last pages record. */
function lastPages(records: VmSnapshotRecord[]) {
  const r = records.findLast((x) => x.record.case === "pages")?.record;
  if (r?.case !== "pages") throw new Error("no pages");
  return r.value.pages;
}
function setPage(records: VmSnapshotRecord[], edit: (p: { gpa: bigint; data: Uint8Array }) => void) {
  edit(lastPages(records).at(-1)!);
}

describe("round trip: export, import here under another vm_id and into a second server", () => {
  let t1: TestServer;
  let t2: TestServer;
  beforeAll(async () => {
    t1 = await server();
    t2 = await server();
  });

  const builders: [string, (c: IommufdClient, id: string) => Promise<Built>][] = [
    ["MOCK", buildMockVm],
    ["INTEL_VTD nested", buildVtdVm],
  ];

  it.each(builders)(
    "%s: same ids, attachments, mappings, RAM and counters; the same further operations give the same results",
    async (kind, build) => {
      const name = kind === "MOCK" ? "rt-mock" : "rt-vtd";
      const { vm: orig, probe } = await build(t1.client, name);
      const atExport = (await orig.v.getStats()).stats!;
      // The original's caches are empty (VT-d: everything invalidated), as an import's are.
      expect(atExport.iotlbEntries).toBe(0n);
      expect(atExport.translations).toBeGreaterThan(0n);

      const stream = await orig.v.exportVm();
      const chunks: Uint8Array[] = [];
      for await (const c of orig.v.exportVmChunks()) chunks.push(c);
      expect(Buffer.concat(chunks)).toEqual(stream);

      const here = await t1.client.importVm({ vmId: `${name}-copy`, snapshot: stream });
      expect(here.vm).toMatchObject({ vmId: `${name}-copy`, model: probe.model, objectCount: await objectCount(orig) });
      // vm_id absent: the exported one.
      const there = await t2.client.importVm({ snapshot: chunks });
      expect(there.vm?.vmId).toBe(name);
      const copy = vmOn(t1.client, `${name}-copy`, probe.model);
      const copy2 = vmOn(t2.client, name, probe.model);
      expect(await vmIds(t2.client)).toContain(name);

      // Counters continue; the IOTLB is empty.
      expect((await copy.v.getStats()).stats).toEqual(atExport);
      expect((await copy2.v.getStats()).stats).toEqual(atExport);
      // Re-exporting the import gives the very same stream.
      expect(await copy2.v.exportVm()).toEqual(stream);

      const o = await observe(orig, probe);
      expect(await observe(copy, probe)).toEqual(o);
      expect(await observe(copy2, probe)).toEqual(o);

      // The observation is not vacuous: holes, kinds, selftest values, faults and hits.
      expect(Object.values(o.ids).filter((x) => x.ranges === "error ENOENT" && x.iotlb === "error ENOENT" && x.hwInfo === "error ENOENT").length).toBeGreaterThan(1);
      const translated = JSON.stringify(o.translations, (_k, v) => (typeof v === "bigint" ? v.toString() : v));
      expect(translated).toContain('"reasonName":"S2_NOT_PRESENT"');
      expect(translated).toContain('"reasonName":"BLOCKED"');
      if (kind === "MOCK") {
        // Lowest free id: the last destroyed IOAS's id is the lowest hole left.
        expect(o.nextId).toBe(probe.ids.D);
        expect(o.ids[probe.ids.nested1]).toMatchObject({ iotlb: { selftestIotlb: [0, 0x1234, 0x1234, 0] } });
        expect(o.ids[probe.ids.nested2]).toMatchObject({ iotlb: { selftestIotlb: [0xbadbeef, 0, 0xbadbeef, 0xbadbeef] } });
        expect(o.ids[probe.ids.B]).toMatchObject({ hugePages: 0n });
        expect(o.ids[probe.ids.A]).toMatchObject({ hugePages: 1n });
      } else {
        expect(translated).toContain('"reasonName":"S1_NOT_PRESENT"');
        expect(translated).toContain('"reasonName":"NO_WRITE"');
        expect(o.statsAfter!.iotlbHits).toBeGreaterThan(atExport.iotlbHits);
      }

      const f = await further(orig, probe);
      expect(await further(copy, probe)).toEqual(f);
      expect(await further(copy2, probe)).toEqual(f);
    },
    120_000,
  );

  it("the IOTLB is not exported: an import translates what the tables say, where the original still uses a stale entry", async () => {
    const nv = await createNestedVm(t1, "cache-orig", { options: { pagingStructureCaches: true } });
    await nv.s1.map(0x1000n, 0x800000n, SZ_4K);
    const cold = await nv.vm.translate({ devId: nv.devId, iovas: [0x1234n] });
    expect(cold.memoryReferences).toEqual([24]);
    expect((await nv.vm.translate({ devId: nv.devId, iovas: [0x1234n] })).memoryReferences).toEqual([0]);
    // The guest changes the leaf and does not invalidate: the original keeps translating to the old page.
    await nv.s1.map(0x1000n, 0x900000n, SZ_4K);
    expect((await nv.vm.translate({ devId: nv.devId, iovas: [0x1234n] })).addresses).toEqual([0x800234n]);
    const before = await stats(nv.vm);
    expect(before.iotlbEntries).toBeGreaterThan(0);
    expect(await dump(nv.vm, nv.nestedId)).not.toEqual([]);

    await t1.client.importVm({ vmId: "cache-copy", snapshot: await nv.vm.exportVm() });
    const copy = t1.client.vm("cache-copy");
    expect(await dump(copy, nv.nestedId)).toEqual([]);
    expect(await stats(copy)).toEqual({ ...before, iotlbEntries: 0 });
    const r = await copy.translate({ devId: nv.devId, iovas: [0x1234n, 0x1238n] });
    expect(r.addresses).toEqual([0x900234n, 0x900238n]);
    expect(r.memoryReferences).toEqual([24, 0]);
    expect(r.iotlbHits).toBe(1);
    // After an Invalidate the original agrees.
    await nv.vm.invalidate({ hwptId: nv.nestedId, requests: { case: "vtdS1", value: { entries: [Stage1PageTable.invalidateAll()] } } });
    expect((await nv.vm.translate({ devId: nv.devId, iovas: [0x1234n] })).addresses).toEqual([0x900234n]);
  });

  it("MOCK: the selftest's PASID 1024 fault injection continues where it was (mdev->pasid_1024_fake_error)", async () => {
    const vm = vmOn(t1.client, "fake-orig", IommuModel.MOCK);
    await t1.client.createVm({ vmId: vm.id, model: IommuModel.MOCK, guestMemoryBytes: MIB });
    const ioasId = (await vm.v.allocIoas()).ioasId;
    const { devId } = await vm.v.bindDevice({ name: "fake", pasidCapable: true });
    const { hwptId: a } = await vm.v.allocHwpt({ devId, ptId: ioasId, pasid: true });
    const { hwptId: b } = await vm.v.allocHwpt({ devId, ptId: ioasId, pasid: true });
    // The first attach of PASID 1024 arms a fake error that the next replace consumes.
    await vm.v.attachDevice({ devId, ptId: a, pasid: 1024 });
    await expectFail(vm.v.attachDevice({ devId, ptId: b, pasid: 1024, replace: true }), "ENOMEM");
    await t1.client.importVm({ vmId: "fake-copy", snapshot: await vm.v.exportVm() });
    const copy = vmOn(t1.client, "fake-copy", IommuModel.MOCK);
    const next = async (x: typeof vm) => [
      await outcome(x.v.attachDevice({ devId, ptId: b, pasid: 1024, replace: true })),
      await outcome(x.v.attachDevice({ devId, ptId: a, pasid: 1024, replace: true })),
    ];
    expect(await next(copy)).toEqual(await next(vm));
  });

  it("a VM with nothing in it, and one with a single touched page at the end of RAM, round-trip", async () => {
    await t1.client.createVm({ vmId: "empty-orig", model: IommuModel.INTEL_VTD, guestMemoryBytes: 1n << 40n, options: { fiveLevel: true, iotlbEntries: 0 } });
    const empty = await t1.client.vm("empty-orig").exportVm();
    expect(pageCount(empty)).toBe(0);
    const { vm } = await t1.client.importVm({ vmId: "empty-copy", snapshot: empty });
    expect(vm).toMatchObject({ vmId: "empty-copy", model: IommuModel.INTEL_VTD, guestMemoryBytes: 1n << 40n, objectCount: 0, options: { fiveLevel: true, iotlbEntries: 0 } });
    const last = (1n << 40n) - 4096n;
    await t1.client.vm("empty-copy").writeGuestMemory({ gpa: last, data: pattern(4096, 3) });
    await t2.client.importVm({ vmId: "end-copy", snapshot: await t1.client.vm("empty-copy").exportVm() });
    expect(Buffer.from((await t2.client.vm("end-copy").readGuestMemory({ gpa: last, length: 4096 })).data)).toEqual(Buffer.from(pattern(4096, 3)));
    expect(await t2.client.vm("end-copy").allocIoas()).toMatchObject({ ioasId: 1 });
  });
});

describe("refusals leave no VM and no quota usage behind", () => {
  let source: TestServer;
  let t: TestServer;
  let stream: Buffer;
  let pages: number;
  let ids: Record<string, number>;
  const VMS = 2;
  let seq = 0;
  const fresh = () => `bad-${++seq}`;
  // A wrongly accepted import must not make the next tests fail too.
  afterEach(async () => {
    for (const vmId of await vmIds(t.client)) await t.client.destroyVm({ vmId });
  });

  beforeAll(async () => {
    source = await server();
    const built = await buildMockVm(source.client, "src");
    ids = built.probe.ids;
    stream = await built.vm.v.exportVm();
    pages = pageCount(stream);
    expect(pages).toBeGreaterThan(2);
    // Room for exactly one import's pages (and two VMs): a leaked page or VM shows at the end.
    t = await server({ vmsPerTenant: VMS, touchedBytesPerTenant: (pages + 1) * PAGE_BYTES });
  });

  /** An import's outcome ("imported" or "error ERRNO"); a wrongly imported VM is destroyed at once. */
  async function attempt(snapshot: Uint8Array): Promise<string> {
    const vmId = fresh();
    const r = await outcome(t.client.importVm({ vmId, snapshot }));
    if (typeof r === "string") return r;
    await t.client.destroyVm({ vmId });
    return "imported";
  }

  /** The import fails with `errno` and the server's tenant still has no VM. */
  async function refused(snapshot: Uint8Array | Uint8Array[], errno: "EINVAL" | "EOPNOTSUPP" | "EEXIST", vmId = fresh()) {
    await expectFail(t.client.importVm({ vmId, snapshot }), errno);
    expect(await vmIds(t.client)).toEqual([]);
  }

  it("our own re-encoding of the stream is byte-identical and imports (the edits below change only what they say)", async () => {
    const again = encodeRecords(recordsOf(stream));
    expect(again).toEqual(stream);
    await source.client.importVm({ vmId: "control", snapshot: again });
    await source.client.destroyVm({ vmId: "control" });
  });

  it("every byte of the header flipped (two ways): EINVAL", async () => {
    const [header] = parseRecords(stream);
    const got = new Map<string, number[]>();
    for (let offset = header.start; offset < header.end; offset++) {
      for (const mask of [0xff, 0x01]) {
        const key = await attempt(flip(stream, offset, mask));
        got.set(key, [...(got.get(key) ?? []), offset]);
      }
    }
    expect(await vmIds(t.client)).toEqual([]);
    const wrong = Object.fromEntries([...got].filter(([k]) => k !== "error EINVAL").map(([k, offsets]) => [k, offsets.map((o) => o - header.body)]));
    expect(wrong, "outcome -> offsets into the header message").toEqual({});
  }, 120_000);

  it("flipped bytes in the pages records and in every byte of the trailer: EINVAL", async () => {
    const spans = parseRecords(stream);
    const pageSpans = spans.filter((s) => s.record.record.case === "pages");
    const trailer = spans.at(-1)!;
    const offsets = [
      ...pageSpans.flatMap((s) => [s.start, s.body, s.body + 1, s.body + 5, s.body + 6, Math.floor((s.body + s.end) / 2), s.end - 1]),
      ...Array.from({ length: trailer.end - trailer.start }, (_, i) => trailer.start + i),
    ];
    const wrong: string[] = [];
    for (const offset of offsets) {
      for (const mask of [0xff, 0x01, 0x80]) {
        const r = await attempt(flip(stream, offset, mask));
        if (r !== "error EINVAL") wrong.push(`byte ${offset} (trailer at ${trailer.start}) ^ 0x${mask.toString(16)}: ${r}`);
      }
    }
    expect(wrong).toEqual([]);
    expect(await vmIds(t.client)).toEqual([]);
  }, 120_000);

  it("truncated anywhere, empty, or with anything after the trailer: EINVAL", async () => {
    const spans = parseRecords(stream);
    const cuts = [0, 1, 2, spans[0].body + 10, spans[0].end - 1, spans[0].end, spans[1].end - 100, spans.at(-1)!.start, spans.at(-1)!.start + 1, stream.length - 1];
    for (const cut of cuts) await refused(stream.subarray(0, cut), "EINVAL");
    await refused([], "EINVAL");
    const trailer = stream.subarray(spans.at(-1)!.start);
    for (const extra of [Buffer.from([0]), Buffer.from([0xff]), Buffer.from(pattern(100, 5)), trailer, stream]) {
      await refused(Buffer.concat([stream, extra]), "EINVAL");
    }
    // The same bytes, split into many small chunks, still import: the refusals were about the bytes.
    const pieces = Array.from({ length: Math.ceil(stream.length / 777) }, (_, i) => stream.subarray(i * 777, (i + 1) * 777));
    await t.client.importVm({ vmId: "split", snapshot: pieces });
    await t.client.destroyVm({ vmId: "split" });
  }, 60_000);

  it("a well-formed stream of an unknown format version: EOPNOTSUPP", async () => {
    for (const format of [2, 99]) {
      const records = recordsOf(stream);
      headerOf(records).format = format as SnapshotFormat;
      await refused(encodeRecords(records), "EOPNOTSUPP");
    }
    // Unspecified is not a version at all: a broken header.
    const records = recordsOf(stream);
    headerOf(records).format = SnapshotFormat.UNSPECIFIED;
    await refused(encodeRecords(records), "EINVAL");
  });

  it("a model this server does not implement (ARM SMMUv3): EOPNOTSUPP, as CreateVm answers", async () => {
    const records = recordsOf(stream);
    headerOf(records).model = IommuModel.ARM_SMMUV3;
    await refused(encodeRecords(records), "EOPNOTSUPP");
  });

  /** Valid framing and checksum, objects that do not hang together. */
  const inconsistent: [string, (h: Header, records: VmSnapshotRecord[]) => void][] = [
    ["a nested HWPT whose parent does not exist", (h) => setNested(h, ids.nested1, (n) => (n.parentId = 999))],
    ["a nested HWPT whose parent is an IOAS", (h) => setNested(h, ids.nested1, (n) => (n.parentId = ids.A))],
    ["a nested HWPT whose parent is a nested HWPT", (h) => setNested(h, ids.nested3, (n) => (n.parentId = ids.nested1))],
    ["a nested HWPT whose parent is not a nest parent", (h) => setNested(h, ids.nested3, (n) => (n.parentId = ids.dirty))],
    ["a nested HWPT whose parent is an automatic domain", (h) => setNested(h, ids.nested3, (n) => (n.parentId = ids.autoA))],
    ["a nested HWPT with malformed selftest data", (h) => setNested(h, ids.nested3, (n) => (n.data!.data = new Uint8Array(3)))],
    ["two objects with the same id", (h) => h.objects.push(create(SnapshotObjectSchema, h.objects.find((o) => o.id === ids.dev2)!))],
    ["an object with id 0", (h) => (h.objects.find((o) => o.id === ids.nested3)!.id = 0)],
    ["an object of no kind", (h) => (h.objects.find((o) => o.id === ids.nested3)!.object = { case: undefined })],
    ["a device attached to a missing HWPT", (h) => setDevice(h, ids.dev4, (d) => (d.attachments[0].hwptId = 999))],
    ["a device attached to an IOAS", (h) => setDevice(h, ids.dev4, (d) => (d.attachments[0].hwptId = ids.A))],
    ["a PASID attachment of a device that is not PASID-capable", (h) => setDevice(h, ids.dev2, (d) => (d.attachments[0].pasid = 3))],
    ["a PASID attachment of a HWPT without the PASID flag", (h) => setDevice(h, ids.dev3, (d) => (d.attachments[0].hwptId = ids.nested3))],
    ["a device without dirty tracking on a dirty-tracking HWPT", (h) => setDevice(h, ids.dev2, (d) => (d.attachments[0].hwptId = ids.dirty))],
    ["two devices with the same name", (h) => setDevice(h, ids.dev2, (d) => (d.name = "mock-dev1"))],
    ["an IOAS listing another IOAS's HWPT", (h) => setIoas(h, ids.B, (i) => i.hwptIds.push(ids.parent))],
    ["a paging HWPT its IOAS does not list", (h) => setIoas(h, ids.B, (i) => (i.hwptIds = []))],
    ["overlapping areas", (h) => setIoas(h, ids.A, (i) => i.areas.push({ ...i.areas[0], userVa: 0x10000n }))],
    ["an area beyond guest RAM", (h) => setIoas(h, ids.A, (i) => (i.areas[0].userVa = 64n * MIB - 0x1000n))],
    ["an area of length 0", (h) => setIoas(h, ids.A, (i) => (i.areas[0].length = 0n))],
    ["an area outside the mock aperture of its domains", (h) => setIoas(h, ids.A, (i) => (i.areas[0].iova = 0n))],
    ["an unknown IOMMU model", (h) => (h.model = 99 as IommuModel)],
    ["the INTEL_VTD model for MOCK objects", (h) => (h.model = IommuModel.INTEL_VTD)],
    ["no options", (h) => (h.options = undefined)],
    ["no stats", (h) => (h.stats = undefined)],
    ["guest RAM of 0 bytes", (h) => (h.guestMemoryBytes = 0n)],
    ["guest RAM not a multiple of 4096", (h) => (h.guestMemoryBytes = 64n * MIB + 1n)],
    ["a malformed vm_id (imported under its own)", (h) => (h.vmId = "Not_A_Label")],
    ["a page beyond guest RAM", (_h, r) => setPage(r, (p) => (p.gpa = 64n * MIB))],
    ["a page not 4 KiB aligned", (_h, r) => setPage(r, (p) => (p.gpa += 8n))],
    ["a page of 4095 bytes", (_h, r) => setPage(r, (p) => (p.data = p.data.subarray(1)))],
    ["a second header", (_h, r) => r.push(r[0])],
    ["pages before the header", (_h, r) => r.push(r.shift()!)],
    ["no header", (_h, r) => r.splice(0, 1)],
  ];

  it.each(inconsistent)("a valid checksum over %s: EINVAL", async (_what, edit) => {
    const records = recordsOf(stream);
    edit(headerOf(records), records);
    const edited = encodeRecords(records);
    parseRecords(edited); // still well framed
    await expectFail(t.client.importVm({ snapshot: edited }), "EINVAL");
    expect(await vmIds(t.client)).toEqual([]);
  });

  it("after all of that the tenant can still import once and create up to its VM quota", async () => {
    await t.client.importVm({ vmId: "fits", snapshot: stream });
    // Exactly one import's pages fit: a second one is over the touched-RAM quota.
    const e = await expectFail(t.client.importVm({ vmId: "over", snapshot: stream }), "EDQUOT");
    expect(e.quotaFailure?.violations.map((v) => v.description).join()).toContain("touchedBytesPerTenant");
    for (let i = 1; i < VMS; i++) await t.client.createVm({ vmId: `vm-${i}`, model: IommuModel.MOCK, guestMemoryBytes: MIB });
    await expectFail(t.client.createVm({ vmId: "one-too-many", model: IommuModel.MOCK, guestMemoryBytes: MIB }), "EDQUOT");
    await expectFail(t.client.importVm({ vmId: "one-too-many", snapshot: encodeRecords(recordsOf(stream).slice(0, 1)) }), "EDQUOT");
    expect(await vmIds(t.client)).toEqual(["fits", ...Array.from({ length: VMS - 1 }, (_, i) => `vm-${i + 1}`)]);
    for (const id of await vmIds(t.client)) await t.client.destroyVm({ vmId: id });
  });
});

describe("ids, existence and quotas", () => {
  let t: TestServer;
  let stream: Buffer;
  let pages: number;
  beforeAll(async () => {
    t = await server();
    await buildMockVm(t.client, "orig");
    stream = await t.client.vm("orig").exportVm();
    pages = pageCount(stream);
  });

  it("onto an existing vm_id (named, or the exported one): EEXIST, the existing VM untouched", async () => {
    const before = await t.client.vm("orig").exportVm();
    await t.client.createVm({ vmId: "taken", model: IommuModel.INTEL_VTD, guestMemoryBytes: MIB });
    await expectFail(t.client.importVm({ vmId: "taken", snapshot: stream }), "EEXIST");
    await expectFail(t.client.importVm({ snapshot: stream }), "EEXIST");
    await expectFail(t.client.importVm({ vmId: "", snapshot: stream }), "EEXIST");
    expect(await vmIds(t.client)).toEqual(["orig", "taken"]);
    expect(await t.client.vm("orig").exportVm()).toEqual(before);
    expect(await listed(vmOn(t.client, "taken", IommuModel.INTEL_VTD))).toMatchObject({ model: IommuModel.INTEL_VTD, objectCount: 0 });
    // Once the name is free again, the import takes it.
    await t.client.destroyVm({ vmId: "taken" });
    expect((await t.client.importVm({ vmId: "taken", snapshot: stream })).vm).toMatchObject({ vmId: "taken", model: IommuModel.MOCK });
    await t.client.destroyVm({ vmId: "taken" });
  });

  it("an imported VM's touched RAM counts against the tenant until it is destroyed", async () => {
    // Room for one copy of the pages, not two.
    const small = await server({ touchedBytesPerTenant: (pages + 1) * PAGE_BYTES });
    await small.client.importVm({ vmId: "one", snapshot: stream });
    const e = await expectFail(small.client.importVm({ vmId: "two", snapshot: stream }), "EDQUOT");
    expect(e.quotaFailure?.violations.map((v) => v.description).join()).toContain("touchedBytesPerTenant");
    await small.client.createVm({ vmId: "writer", model: IommuModel.MOCK, guestMemoryBytes: MIB });
    await expectFail(small.client.vm("writer").writeGuestMemory({ gpa: 0n, data: new Uint8Array(2 * PAGE_BYTES) }), "EDQUOT");
    await small.client.vm("writer").writeGuestMemory({ gpa: 0n, data: new Uint8Array(PAGE_BYTES) });
    // Destroying it gives exactly its pages back: one more import fits, and no more.
    await small.client.destroyVm({ vmId: "one" });
    await expectFail(small.client.vm("writer").writeGuestMemory({ gpa: 0n, data: new Uint8Array((pages + 2) * PAGE_BYTES) }), "EDQUOT");
    await small.client.importVm({ vmId: "two", snapshot: stream });
    await expectFail(small.client.importVm({ vmId: "three", snapshot: stream }), "EDQUOT");
    expect(await vmIds(small.client)).toEqual(["two", "writer"]);
  });

  it("a malformed vm_id: EINVAL, before the snapshot is read (even an unknown format)", async () => {
    const records = recordsOf(stream);
    headerOf(records).format = 2 as SnapshotFormat;
    const future = encodeRecords(records);
    for (const vmId of ["Bad_Id", "-x", "x-", "a".repeat(64), "ä", " orig"]) {
      await expectFail(t.client.importVm({ vmId, snapshot: stream }), "EINVAL");
      await expectFail(t.client.importVm({ vmId, snapshot: future }), "EINVAL");
      await expectFail(t.client.exportVm({ vmId }), "EINVAL");
    }
    expect(await vmIds(t.client)).toEqual(["orig"]);
  });

  it("exporting a VM that does not exist: ENOENT (also through vm().exportVm and exportVmChunks)", async () => {
    await expectFail(t.client.exportVm({ vmId: "nope" }), "ENOENT");
    await expectFail(t.client.vm("nope").exportVm(), "ENOENT");
    await expectFail((async () => {
      for await (const _ of t.client.exportVmChunks({ vmId: "nope" })) void _;
    })(), "ENOENT");
    await t.client.createVm({ vmId: "gone", model: IommuModel.MOCK, guestMemoryBytes: MIB });
    await t.client.destroyVm({ vmId: "gone" });
    await expectFail(t.client.vm("gone").exportVm(), "ENOENT");
  });

  const limitCases: [keyof Limits, (p: number) => number, string][] = [
    ["touchedBytesPerVm", (p) => (p - 1) * PAGE_BYTES, "fewer touched pages than the snapshot has"],
    ["touchedBytesPerTenant", (p) => (p - 1) * PAGE_BYTES, "fewer touched pages than the snapshot has"],
    ["objectsPerVm", () => 8, "fewer objects than the snapshot has"],
    ["guestMemoryBytesPerVm", () => 32 * 2 ** 20, "less guest RAM than the snapshot declares"],
    ["guestMemoryBytesPerTenant", () => 32 * 2 ** 20, "less guest RAM than the snapshot declares"],
    ["mappedBytesPerIoas", () => 0x100000, "fewer mapped bytes than an IOAS of the snapshot has"],
  ];

  it.each(limitCases)("a server whose %s is too small (%#: %s) refuses with EDQUOT and leaves nothing", async (limit, value) => {
    const small = await server({ [limit]: value(pages) });
    const e = await expectFail(small.client.importVm({ snapshot: stream }), "EDQUOT");
    expect(e.quotaFailure?.violations.map((v) => v.description).join()).toContain(limit);
    expect(await vmIds(small.client)).toEqual([]);
    // Nothing was kept: a VM can use the whole quota.
    await small.client.createVm({ vmId: "after", model: IommuModel.MOCK, guestMemoryBytes: 32n * MIB });
    const room = Math.min(value(pages), 8 * PAGE_BYTES);
    if (limit.startsWith("touched")) await small.client.vm("after").writeGuestMemory({ gpa: 0n, data: new Uint8Array(room) });
    expect(await vmIds(small.client)).toEqual(["after"]);
  });

  it("an IOTLB larger than the server allows: EDQUOT", async () => {
    const src = await buildVtdVm(t.client, "vtd-big-iotlb");
    const small = await server({ iotlbEntriesPerVm: 256 });
    const e = await expectFail(small.client.importVm({ snapshot: await src.vm.v.exportVm() }), "EDQUOT");
    expect(e.quotaFailure?.violations.map((v) => v.description).join()).toContain("iotlbEntriesPerVm");
    expect(await vmIds(small.client)).toEqual([]);
  });
});

describe("a client that gives up mid-stream", () => {
  it("leaves no VM and gives the touched RAM back", async () => {
    const source = await server();
    const { vm } = await buildMockVm(source.client, "half");
    const stream = await vm.v.exportVm();
    const pages = pageCount(stream);
    // Room for one import's pages plus pages - 1: a second copy of the pages fits only while the first is not held.
    const t = await server({ touchedBytesPerTenant: (2 * pages - 1) * PAGE_BYTES });
    const trailerAt = parseRecords(stream).at(-1)!.start;
    // A probe that never creates anything: the same pages, then one beyond
    // guest RAM (valid checksum). Writing the pages is EDQUOT while another
    // import holds its pages, else the last page is EINVAL.
    const records = recordsOf(stream);
    const pagesOf = lastPages(records);
    pagesOf.push({ ...pagesOf.at(-1)!, gpa: 64n * MIB });
    const probe = encodeRecords(records);
    const probeSays = async () => {
      const r = await outcome(t.client.importVm({ vmId: "probe", snapshot: probe }));
      return r === "error EDQUOT" || r === "error EINVAL" ? r : `unexpected: ${String(r)}`;
    };
    expect(await probeSays()).toBe("error EINVAL");

    let giveUp!: (e: Error) => void;
    const gaveUp = new Promise<never>((_, reject) => (giveUp = reject));
    gaveUp.catch(() => undefined);
    async function* everythingButTheTrailer() {
      yield stream.subarray(0, trailerAt);
      await gaveUp;
    }
    const importing = t.client.importVm({ vmId: "half", snapshot: everythingButTheTrailer() });
    importing.catch(() => undefined);
    // Wait (bounded) until the server holds the half import's pages.
    let said = "";
    for (let i = 0; i < 200 && said !== "error EDQUOT"; i++) {
      said = await probeSays();
      if (said !== "error EDQUOT") await new Promise((r) => setTimeout(r, 25));
    }
    expect(said, "the server never held the half-sent import's pages").toBe("error EDQUOT");
    expect(await vmIds(t.client)).toEqual([]);

    giveUp(new Error("client gave up"));
    await expect(importing).rejects.toThrow("client gave up");
    for (let i = 0; i < 200 && said !== "error EINVAL"; i++) {
      said = await probeSays();
      if (said !== "error EINVAL") await new Promise((r) => setTimeout(r, 25));
    }
    expect(said, "the cancelled import's pages were never given back").toBe("error EINVAL");
    expect(await vmIds(t.client)).toEqual([]);
    // And the name is free.
    await t.client.importVm({ vmId: "half", snapshot: stream });
    expect(await vmIds(t.client)).toEqual(["half"]);
  });
});
