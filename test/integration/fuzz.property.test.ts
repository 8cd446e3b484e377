/**
 * Random requests of every RPC (issue 6 items 5 and 6; api.md Errors: "No
 * input may produce INTERNAL or UNKNOWN, or crash the process").
 *
 * Half of the requests are generated from the protobuf-es descriptors of the
 * service (gen/iommufd/v1/*_pb.js), so every RPC and every field is covered,
 * with values drawn by field name from pools that mix plausible ones (the
 * ids, IOVAs, GPAs and table addresses of the pre-populated VMs) with
 * garbage (U64_MAX, random 64-bit values, malformed vm_ids, unknown enum
 * values, random bytes). The other half are hand-written plausible requests
 * per RPC aimed at the populated VMs, so that every RPC also reaches its
 * state-changing paths. Some encodings are then mutated at the byte level
 * (truncated, bit-flipped, padded with unknown fields or invalid wire types,
 * or replaced by random bytes). Streaming RPCs are called as such: ExportVm
 * reads its stream; ImportVm sends 0–3 random messages, or a real snapshot
 * of a populated VM (taken at each reset), whole or mutated, in chunks.
 *
 * Each run resets the server to two populated VMs — MOCK (IOAS, two devices,
 * a nest parent, a selftest nested HWPT, an auto domain) and INTEL_VTD (IOAS,
 * a stage-1 table with mappings, nest parent, nested HWPT attached on the RID
 * and a PASID) — then sends its requests, 32 in flight. Every answer must be
 * OK with responses that decode, or an error that is neither INTERNAL nor
 * UNKNOWN and carries the ErrorInfo of api.md (reason and errno matching the
 * gRPC code, domain iommufd.v1, QuotaFailure only with EDQUOT). Every RPC
 * must have succeeded at least once. At the end the server must still answer
 * Health/Check SERVING and serve a new VM.
 *
 * IOMMUFD_FUZZ_SEED (default fixed) and IOMMUFD_FUZZ_REQUESTS (default
 * 10240) override the run, IOMMUFD_FUZZ_RPCS=CreateVm,MapIoas,... limits it
 * to some RPCs, and IOMMUFD_FUZZ_STATS=1 prints the outcomes per RPC.
 */
import { create, type DescField, type DescMessage, type DescOneof, fromBinary, ScalarType, toBinary } from "@bufbuild/protobuf";
import { anyUnpack } from "@bufbuild/protobuf/wkt";
import * as grpc from "@grpc/grpc-js";
import fc from "fast-check";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { IommufdClient } from "../../client/client.js";
import { SZ_2M, SZ_4K } from "../../client/pagetable.js";
import { ErrorInfoSchema, QuotaFailureSchema } from "../../gen/google/rpc/error_details_pb.js";
import { StatusSchema } from "../../gen/google/rpc/status_pb.js";
import { HealthCheckRequestSchema, HealthCheckResponse_ServingStatus, HealthCheckResponseSchema } from "../../gen/grpc/health/v1/health_pb.js";
import { IommufdService } from "../../gen/iommufd/v1/service_pb.js";
import { IommuModel } from "../../gen/iommufd/v1/vm_pb.js";
import { startTestServer, type TestServer } from "../helpers/server.js";
import { type Errno, ERRNO, GRPC_CODE, MOCK_APERTURE_START } from "./helpers.js";
import { createNestedVm, TABLE_BASE } from "./translate-helpers.js";

const SEED = Number(process.env.IOMMUFD_FUZZ_SEED ?? 0x10_6f_6d_66);
const TOTAL = Number(process.env.IOMMUFD_FUZZ_REQUESTS ?? 10_240);
const PER_RUN = 256;
const IN_FLIGHT = 32;

const U64_MAX = (1n << 64n) - 1n;
const U32_MAX = 0xffff_ffff;
const MIB = 1n << 20n;
const GUEST_BYTES = 64n * MIB;

// ---------------------------------------------------------------------------
// The world each run starts from

const MOCK_VM = "fz-mock";
const VTD_VM = "fz-vtd";
/** vm_ids that CreateVm/DestroyVm may come and go with. */
const SCRATCH_VMS = ["fz-new-0", "fz-new-1", "fz-new-2"];

let t: TestServer;

async function destroyAllVms(client: IommufdClient): Promise<void> {
  const { vms } = await client.listVms({ pageSize: 1000 });
  for (const vm of vms) await client.destroyVm({ vmId: vm.vmId });
}

/**
 * MOCK: device 1 (PASID-capable), IOAS 2 with 1 MiB at the aperture start,
 * nest parent 3, selftest nested HWPT 4 (device 1 attached), device 5
 * attached to IOAS 2 through auto domain 6.
 */
async function populateMock(): Promise<void> {
  await t.client.createVm({ vmId: MOCK_VM, model: IommuModel.MOCK, guestMemoryBytes: GUEST_BYTES });
  const vm = t.client.vm(MOCK_VM);
  const { devId } = await vm.bindDevice({ name: "0000:00:01.0", pasidCapable: true, dirtyTrackingCapable: true });
  const { ioasId } = await vm.allocIoas();
  await vm.mapIoas({ ioasId, iova: MOCK_APERTURE_START, userVa: 0n, length: MIB, readable: true, writeable: true });
  const { hwptId: parent } = await vm.allocHwpt({ devId, ptId: ioasId, nestParent: true });
  const { hwptId: nested } = await vm.allocHwpt({ devId, ptId: parent, data: { case: "selftest", value: { iotlb: 0xbadbeef } } });
  await vm.attachDevice({ devId, ptId: nested });
  const { devId: second } = await vm.bindDevice({ name: "0000:00:02.0" });
  await vm.attachDevice({ devId: second, ptId: ioasId });
}

/**
 * INTEL_VTD: IOAS 1 identity-mapping 64 MiB, PASID-capable device 2, nest
 * parent 3, nested HWPT 4 (stage 1 at TABLE_BASE: 0x1000 -> 0x800000 4 KiB,
 * 0x200000 -> 0x400000 2 MiB) attached on the RID and on PASID 9.
 */
async function populateVtd(): Promise<void> {
  const nv = await createNestedVm(t, VTD_VM, { guestBytes: GUEST_BYTES, pasid: true });
  await nv.s1.map(0x1000n, 0x800000n, SZ_4K);
  await nv.s1.map(0x200000n, 0x400000n, SZ_2M);
  await nv.vm.attachDevice({ devId: nv.devId, ptId: nv.nestedId, pasid: 9 });
}

async function resetWorld(): Promise<void> {
  await destroyAllVms(t.client);
  await populateMock();
  await populateVtd();
  await captureSnapshots();
}

/** What ExportVm streams for each populated VM, for ImportVm to import (nothing if it fails). */
async function captureSnapshots(): Promise<void> {
  snapshots.clear();
  const exportVm = IommufdService.methods.find((m) => m.name === "ExportVm");
  if (!exportVm) return;
  for (const vm of [MOCK_VM, VTD_VM]) {
    const outcome = await send(t.client.grpc, { method: exportVm, messages: [{ init: {}, mutation: { kind: "none" }, bytes: Buffer.from(toBinary(exportVm.input, create(exportVm.input, { vmId: vm } as never))) }] });
    if (!outcome.ok) continue;
    const chunks = outcome.responses.map((r) => (fromBinary(exportVm.output, r) as unknown as { chunk: Uint8Array }).chunk);
    snapshots.set(vm, Buffer.concat(chunks));
  }
}

// ---------------------------------------------------------------------------
// Value pools, by field name: plausible values first, then garbage

const u32 = fc.integer({ min: 0, max: U32_MAX });
const u64 = fc.bigInt({ min: 0n, max: U64_MAX });
const pick = <T>(...values: T[]) => fc.constantFrom(...values);
/** Mostly `plausible`, sometimes `garbage`. */
const mix = <T>(plausible: fc.Arbitrary<T>, garbage: fc.Arbitrary<T>) =>
  fc.oneof({ weight: 4, arbitrary: plausible }, { weight: 1, arbitrary: garbage });

const vmId = fc.oneof(
  { weight: 8, arbitrary: pick(MOCK_VM, VTD_VM) },
  { weight: 2, arbitrary: pick(...SCRATCH_VMS) },
  { weight: 1, arbitrary: pick("", "FZ-MOCK", "fz_mock", "-fz", "fz-", "a".repeat(64), "ü", "fz-mock\u0000", "never-created") },
  { weight: 1, arbitrary: fc.string({ maxLength: 80, unit: "binary" }) },
);

/** vm_ids for CreateVm and DestroyVm: mostly the scratch ones, so that the populated VMs live through most of a run. */
const scratchVmId = fc.oneof({ weight: 12, arbitrary: pick(...SCRATCH_VMS) }, { weight: 1, arbitrary: pick(MOCK_VM, VTD_VM) }, { weight: 1, arbitrary: vmId });

const objectId = mix(fc.integer({ min: 0, max: 9 }), fc.oneof(pick(U32_MAX, 0x8000_0000, 65536), u32));

const ADDRESSES = [
  0n, 0x10n, 0x1000n, 0x1234n, 0x10000n, TABLE_BASE, 0x200000n, 0x212345n, 0x400000n, 0x800000n,
  MOCK_APERTURE_START, MOCK_APERTURE_START + 0x800n, MOCK_APERTURE_START + MIB, GUEST_BYTES - SZ_4K, GUEST_BYTES,
];
const address = mix(
  fc.oneof(pick(...ADDRESSES), fc.integer({ min: 0, max: 16383 }).map((page) => BigInt(page) * SZ_4K)),
  fc.oneof(pick(U64_MAX, U64_MAX - 0xfffn, 1n << 63n, 1n << 48n, 1n << 57n, 0x7fff_ffffn, 1n << 31n, 0xfffn), u64),
);

const length64 = mix(
  fc.oneof(pick(0x800n, SZ_4K, 2n * SZ_4K, SZ_2M, MIB, 16n * MIB), fc.integer({ min: 1, max: 64 }).map((pages) => BigInt(pages) * SZ_4K)),
  fc.oneof(pick(0n, 1n, 0xfffn, U64_MAX, U64_MAX - 0xfffn, 1n << 63n, GUEST_BYTES + SZ_4K), u64),
);

const length32 = mix(
  fc.oneof(pick(1, 8, 64, 4096, 4097), fc.integer({ min: 0, max: 8192 })),
  fc.oneof(pick(0, 8 << 20, (8 << 20) + 1, U32_MAX, 0x8000_0000), u32),
);

const guestMemoryBytes = fc.oneof(
  pick(SZ_4K, MIB, 64n * MIB, 1n << 30n),
  pick(0n, 1n, 4097n, 1n << 40n, (1n << 40n) + SZ_4K, U64_MAX, 1n << 63n),
  u64,
);

const pasid32 = mix(pick(0, 1, 9, 0xfffff), fc.oneof(pick(0x100000, U32_MAX), u32));

const deviceName = fc.oneof(
  { weight: 4, arbitrary: fc.integer({ min: 0, max: 8 }).map((n) => `0000:00:0${n}.0`) },
  { weight: 1, arbitrary: pick("", "x".repeat(300), "dev0", "\u{1F600}") },
  { weight: 1, arbitrary: fc.string({ maxLength: 40, unit: "binary" }) },
);

const pageToken = fc.oneof(
  pick("", "eyJ4Ijo"),
  fc.tuple(fc.string({ maxLength: 10 }), fc.string({ maxLength: 10 })).map((pair) => Buffer.from(JSON.stringify(pair)).toString("base64url")),
  fc.string({ maxLength: 40, unit: "binary" }),
);

const bytes = fc.oneof(
  { weight: 3, arbitrary: fc.uint8Array({ maxLength: 64 }) },
  // A kernel struct's size, with random contents (iommu_hwpt_vtd_s1, selftest, invalidation entries).
  { weight: 2, arbitrary: fc.integer({ min: 0, max: 3 }).chain((k) => fc.uint8Array({ minLength: [4, 8, 24, 48][k], maxLength: [4, 8, 24, 48][k] })) },
  { weight: 1, arbitrary: fc.constant(new Uint8Array(0)) },
);

const NAMED: Record<string, fc.Arbitrary<unknown>> = {
  vm_id: vmId,
  dev_id: objectId,
  pt_id: objectId,
  ioas_id: objectId,
  hwpt_id: objectId,
  id: objectId,
  object_id: objectId,
  dst_ioas_id: objectId,
  src_ioas_id: objectId,
  iotlb_id: mix(fc.integer({ min: 0, max: 4 }), u32),
  gpa: address,
  iova: address,
  iovas: address,
  user_va: address,
  src_iova: address,
  dst_iova: address,
  start: address,
  last: address,
  addr: address,
  pgtbl_addr: mix(pick(TABLE_BASE, 0x10000n), address),
  npages: mix(pick(1n, 2n, 16n, 512n, U64_MAX), u64),
  guest_memory_bytes: guestMemoryBytes,
  iotlb_entries: mix(pick(0, 1, 64, 4096), fc.oneof(pick(1 << 20, (1 << 20) + 1, U32_MAX), u32)),
  iotlb: mix(pick(0, 0xbadbeef), u32),
  addr_width: mix(pick(48, 57), fc.oneof(pick(0, 39, 47, 64), u32)),
  data_type: mix(pick(0, 1, 2, 0xdead, 0xdeadbeef, 0xfeedbeef), fc.oneof(pick(0xdadbeef, U32_MAX), u32)),
  entry_len: mix(pick(8, 24), fc.oneof(pick(0, 1, 4, 23, 25, 4096, U32_MAX), u32)),
  entry_num: mix(fc.integer({ min: 0, max: 4 }), fc.oneof(pick(65536, 65537, U32_MAX), u32)),
  page_size: mix(pick(0, 1, 2, 100, 1000), fc.oneof(pick(1001, U32_MAX), u32)),
  page_token: pageToken,
  value: mix(pick(0n, 1n), fc.oneof(pick(2n, U64_MAX), u64)),
  name: deviceName,
  data: bytes,
};

/** Per-RPC pools that replace NAMED. */
const NAMED_IN: Record<string, Record<string, fc.Arbitrary<unknown>>> = {
  CreateVmRequest: { vm_id: scratchVmId },
  DestroyVmRequest: { vm_id: scratchVmId },
};

/** Values by name that depend on the type (`pasid` is a u32 PASID or the AllocHwpt flag; `length` is u64 or u32). */
function namedByType(field: DescField, scalar: ScalarType): fc.Arbitrary<unknown> | undefined {
  if (field.name === "pasid" && scalar === ScalarType.UINT32) return pasid32;
  if (field.name === "length") return scalar === ScalarType.UINT32 ? length32 : length64;
  return undefined;
}

function scalarArb(field: DescField, scalar: ScalarType): fc.Arbitrary<unknown> {
  const named = namedByType(field, scalar) ?? NAMED_IN[field.parent.name]?.[field.name] ?? (scalar === ScalarType.BOOL ? undefined : NAMED[field.name]);
  if (named) return named;
  switch (scalar) {
    case ScalarType.BOOL:
      return fc.boolean();
    case ScalarType.STRING:
      return fc.string({ maxLength: 40, unit: "binary" });
    case ScalarType.BYTES:
      return bytes;
    case ScalarType.UINT32:
    case ScalarType.FIXED32:
      return objectId;
    case ScalarType.UINT64:
    case ScalarType.FIXED64:
      return address;
    case ScalarType.INT64:
    case ScalarType.SINT64:
    case ScalarType.SFIXED64:
      return fc.bigInt({ min: -(1n << 63n), max: (1n << 63n) - 1n });
    case ScalarType.DOUBLE:
    case ScalarType.FLOAT:
      return fc.double();
    default:
      return fc.integer();
  }
}

const enumArb = (values: number[]) => fc.oneof({ weight: 4, arbitrary: pick(...values) }, { weight: 1, arbitrary: fc.oneof(fc.integer({ min: -2, max: 16 }), fc.integer()) });

/** A random value of one field (list fields: a list). */
function fieldArb(field: DescField, depth: number): fc.Arbitrary<unknown> {
  switch (field.fieldKind) {
    case "scalar":
      return scalarArb(field, field.scalar);
    case "enum":
      return enumArb(field.enum.values.map((v) => v.number));
    case "message":
      return messageArb(field.message, depth + 1);
    case "list": {
      const maxLength = field.name === "iovas" ? 24 : 6;
      const element =
        field.listKind === "scalar" ? scalarArb(field, field.scalar) : field.listKind === "enum" ? enumArb(field.enum.values.map((v) => v.number)) : messageArb(field.message, depth + 1);
      return fc.array(element, { maxLength });
    }
    case "map":
      return fc.constant({});
  }
}

/** An init object for `message`: every field, oneof case and optional presence at random. */
function messageArb(message: DescMessage, depth = 0): fc.Arbitrary<Record<string, unknown>> {
  if (depth > 3) return fc.constant({});
  const parts: Record<string, fc.Arbitrary<unknown>> = {};
  for (const member of message.members) {
    if (member.kind === "oneof") parts[member.localName] = oneofArb(member, depth);
    else {
      const value = fieldArb(member, depth);
      // Fields with presence (proto3 optional, messages) are left unset now and then.
      const hasPresence = member.fieldKind === "message" || member.proto.proto3Optional;
      parts[member.localName] = hasPresence ? fc.option(value, { nil: undefined, freq: 3 }) : value;
    }
  }
  return fc.record(parts);
}

function oneofArb(oneof: DescOneof, depth: number): fc.Arbitrary<unknown> {
  return fc.oneof(
    { weight: 1, arbitrary: fc.constant(undefined) },
    ...oneof.fields.map((f) => ({ weight: 2, arbitrary: fieldArb(f, depth).map((value) => ({ case: f.localName, value })) })),
  );
}

// ---------------------------------------------------------------------------
// Plausible requests per RPC, aimed at the populated VMs: half of all calls
// (the other half comes from the descriptors), so that every RPC also gets
// past its argument checks and lookups into the state-changing paths.

const page = (max: number) => fc.integer({ min: 0, max }).map((n) => BigInt(n) * SZ_4K);
const offset = fc.integer({ min: 0, max: 0xfff }).map(BigInt);
const smallLength = fc.integer({ min: 1, max: 16 }).map((n) => BigInt(n) * SZ_4K);
const optional = <T>(arb: fc.Arbitrary<T>) => fc.option(arb, { nil: undefined });

/** The populated objects (see populateMock, populateVtd). */
const WORLD = {
  [MOCK_VM]: { devs: [1, 5], ioas: [2], hwpts: [3, 4, 6], nested: 4, parent: 3, ioasIova: MOCK_APERTURE_START, mapped: MIB },
  [VTD_VM]: { devs: [2], ioas: [1], hwpts: [3, 4], nested: 4, parent: 3, ioasIova: 0n, mapped: GUEST_BYTES },
} as const;
type World = (typeof WORLD)[keyof typeof WORLD];

const inWorld = <T>(f: (vm: typeof MOCK_VM | typeof VTD_VM, w: World) => fc.Arbitrary<T>) =>
  fc.oneof(f(MOCK_VM, WORLD[MOCK_VM]), f(VTD_VM, WORLD[VTD_VM])).map((x) => x as T);

const PLAUSIBLE: Record<string, fc.Arbitrary<Record<string, unknown>>> = {
  CreateVm: fc.record({
    vmId: pick(...SCRATCH_VMS),
    model: pick(IommuModel.MOCK, IommuModel.INTEL_VTD),
    guestMemoryBytes: pick(MIB, GUEST_BYTES, 1n << 30n),
    options: fc.record({ iotlbEntries: optional(pick(0, 16, 4096)), pagingStructureCaches: optional(fc.boolean()), fiveLevel: optional(fc.boolean()) }),
  }),
  DestroyVm: fc.record({ vmId: pick(...SCRATCH_VMS) }),
  ListVms: fc.record({ vmId: fc.constant(""), pageSize: fc.integer({ min: 0, max: 3 }) }),
  GetStats: inWorld((vmId) => fc.record({ vmId: fc.constant(vmId) })),
  ExportVm: inWorld((vmId) => fc.record({ vmId: fc.constant(vmId) })),
  BindDevice: inWorld((vmId) =>
    fc.record({ vmId: fc.constant(vmId), name: fc.integer({ min: 3, max: 8 }).map((n) => `0000:00:0${n}.0`), pasidCapable: fc.boolean(), dirtyTrackingCapable: fc.boolean() }),
  ),
  UnbindDevice: inWorld((vmId, w) => fc.record({ vmId: fc.constant(vmId), devId: pick(...w.devs) })),
  AttachDevice: inWorld((vmId, w) =>
    fc.record({ vmId: fc.constant(vmId), devId: pick(...w.devs), ptId: pick(...w.ioas, ...w.hwpts), pasid: optional(pick(9, 10)), replace: fc.boolean() }),
  ),
  DetachDevice: inWorld((vmId, w) => fc.record({ vmId: fc.constant(vmId), devId: pick(...w.devs), pasid: optional(pick(9, 10)) })),
  HwInfo: inWorld((vmId, w) => fc.record({ vmId: fc.constant(vmId), devId: pick(...w.devs), dataType: optional(pick(0, 1, 0xfeedbeef)) })),
  AllocIoas: inWorld((vmId) => fc.record({ vmId: fc.constant(vmId) })),
  MapIoas: inWorld((vmId, w) =>
    fc.record({
      vmId: fc.constant(vmId),
      ioasId: pick(...w.ioas),
      userVa: page(255),
      length: smallLength,
      iova: optional(page(255).map((p) => w.ioasIova + w.mapped + p)),
      readable: fc.constant(true),
      writeable: fc.boolean(),
    }),
  ),
  UnmapIoas: inWorld((vmId, w) =>
    fc.oneof(
      fc.record({ vmId: fc.constant(vmId), ioasId: pick(...w.ioas), iova: fc.constant(w.ioasIova), length: fc.constant(w.mapped) }),
      fc.record({ vmId: fc.constant(vmId), ioasId: pick(...w.ioas), iova: fc.constant(0n), length: fc.constant(U64_MAX) }),
      fc.record({ vmId: fc.constant(vmId), ioasId: pick(...w.ioas), iova: page(255).map((p) => w.ioasIova + w.mapped + p), length: smallLength }),
    ),
  ),
  CopyIoas: inWorld((vmId, w) =>
    fc.record({
      vmId: fc.constant(vmId),
      dstIoasId: pick(...w.ioas),
      srcIoasId: pick(...w.ioas),
      srcIova: page(15).map((p) => w.ioasIova + p),
      length: smallLength,
      dstIova: optional(page(255).map((p) => w.ioasIova + w.mapped + SZ_2M + p)),
      readable: fc.constant(true),
      writeable: fc.boolean(),
    }),
  ),
  GetIovaRanges: inWorld((vmId, w) => fc.record({ vmId: fc.constant(vmId), ioasId: pick(...w.ioas) })),
  AllowIovas: inWorld((vmId, w) =>
    fc.record({
      vmId: fc.constant(vmId),
      ioasId: pick(...w.ioas),
      ranges: fc.array(fc.tuple(page(1 << 20), page(255)).map(([start, size]) => ({ start, last: start + size + 0xfffn })), { maxLength: 2 }),
    }),
  ),
  SetOption: inWorld((vmId, w) => fc.record({ vmId: fc.constant(vmId), option: fc.constant(1), objectId: pick(...w.ioas), value: pick(0n, 1n) })),
  GetOption: inWorld((vmId, w) => fc.record({ vmId: fc.constant(vmId), option: fc.constant(1), objectId: pick(...w.ioas) })),
  AllocHwpt: fc.oneof(
    inWorld((vmId, w) => fc.record({ vmId: fc.constant(vmId), devId: pick(...w.devs), ptId: pick(...w.ioas), nestParent: fc.boolean(), dirtyTracking: fc.boolean() })),
    fc.record({
      vmId: fc.constant(MOCK_VM),
      devId: pick(1, 5),
      ptId: fc.constant(3),
      pasid: fc.boolean(),
      data: fc.record({ case: fc.constant("selftest"), value: fc.record({ iotlb: pick(0, 0xbadbeef) }) }),
    }),
    fc.record({
      vmId: fc.constant(VTD_VM),
      devId: fc.constant(2),
      ptId: fc.constant(3),
      pasid: fc.boolean(),
      data: fc.record({ case: fc.constant("vtdS1"), value: fc.record({ pgtblAddr: pick(TABLE_BASE, 0x200000n), addrWidth: pick(48, 57), eafe: fc.boolean() }) }),
    }),
  ),
  Invalidate: fc.oneof(
    fc.record({
      vmId: fc.constant(MOCK_VM),
      hwptId: fc.constant(4),
      requests: fc.record({
        case: fc.constant("selftest"),
        value: fc.record({ entries: fc.array(fc.record({ iotlbId: fc.integer({ min: 0, max: 3 }), all: fc.boolean() }), { maxLength: 4 }) }),
      }),
    }),
    fc.record({
      vmId: fc.constant(VTD_VM),
      hwptId: fc.constant(4),
      requests: fc.record({
        case: fc.constant("vtdS1"),
        value: fc.record({ entries: fc.array(fc.record({ addr: page(1023), npages: pick(1n, 2n, 512n, U64_MAX), leaf: fc.boolean() }), { maxLength: 4 }) }),
      }),
    }),
  ),
  Destroy: inWorld((vmId) => fc.record({ vmId: fc.constant(vmId), id: fc.integer({ min: 1, max: 8 }) })),
  DumpIotlb: inWorld((vmId, w) => fc.record({ vmId: fc.constant(vmId), hwptId: pick(...w.hwpts) })),
  WriteGuestMemory: inWorld((vmId) => fc.record({ vmId: fc.constant(vmId), gpa: fc.tuple(page(16383), offset).map(([p, o]) => p + o), data: fc.uint8Array({ maxLength: 64 }) })),
  ReadGuestMemory: inWorld((vmId) => fc.record({ vmId: fc.constant(vmId), gpa: fc.tuple(page(16383), offset).map(([p, o]) => p + o), length: fc.integer({ min: 0, max: 8192 }) })),
  Translate: fc.oneof(
    fc.record({
      vmId: fc.constant(MOCK_VM),
      devId: pick(1, 5),
      pasid: optional(fc.constant(9)),
      iovas: fc.array(fc.tuple(page(300), offset).map(([p, o]) => MOCK_APERTURE_START + p + o), { maxLength: 16 }),
      write: fc.boolean(),
    }),
    fc.record({
      vmId: fc.constant(VTD_VM),
      devId: fc.constant(2),
      pasid: optional(pick(9, 10)),
      iovas: fc.array(fc.tuple(pick(0x1000n, 0x2000n, 0x200000n, 0x300000n, 0x3ff000n), offset).map(([p, o]) => p + o), { maxLength: 16 }),
      write: fc.boolean(),
    }),
  ),
};

// ---------------------------------------------------------------------------
// Byte-level mutations of an encoded request

type Mutation =
  | { kind: "none" }
  | { kind: "truncate"; at: number }
  | { kind: "flip"; at: number; bit: number }
  | { kind: "append"; tail: Uint8Array }
  | { kind: "random"; bytes: Uint8Array }
  | { kind: "unknown field"; field: number; body: Uint8Array }
  | { kind: "bad wire type"; wire: number };

const mutation: fc.Arbitrary<Mutation> = fc.oneof(
  { weight: 30, arbitrary: fc.constant({ kind: "none" as const }) },
  { weight: 1, arbitrary: fc.nat().map((at) => ({ kind: "truncate" as const, at })) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant("flip" as const), at: fc.nat(), bit: fc.integer({ min: 0, max: 7 }) }) },
  { weight: 1, arbitrary: fc.uint8Array({ minLength: 1, maxLength: 16 }).map((tail) => ({ kind: "append" as const, tail })) },
  { weight: 1, arbitrary: fc.uint8Array({ maxLength: 48 }).map((b) => ({ kind: "random" as const, bytes: b })) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant("unknown field" as const), field: fc.integer({ min: 1, max: 536_870_911 }), body: fc.uint8Array({ maxLength: 16 }) }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant("bad wire type" as const), wire: pick(3, 4, 6, 7) }) },
);

function varint(n: number): number[] {
  const out: number[] = [];
  while (n >= 0x80) {
    out.push((n % 128) | 0x80);
    n = Math.floor(n / 128);
  }
  out.push(n);
  return out;
}

function mutate(encoded: Uint8Array, m: Mutation): Buffer {
  const b = Buffer.from(encoded);
  switch (m.kind) {
    case "none":
      return b;
    case "truncate":
      return b.subarray(0, b.length === 0 ? 0 : m.at % b.length);
    case "flip":
      if (b.length > 0) b[m.at % b.length] ^= 1 << m.bit;
      return b;
    case "append":
      return Buffer.concat([b, m.tail]);
    case "random":
      return Buffer.from(m.bytes);
    case "unknown field":
      return Buffer.concat([b, Buffer.from([...varint(m.field * 8 + 2), ...varint(m.body.length)]), m.body]);
    case "bad wire type":
      // Field 2 (an id in most requests) with a wire type it cannot have.
      return Buffer.concat([b, Buffer.from([(2 << 3) | m.wire, 0x01])]);
  }
}

// ---------------------------------------------------------------------------
// Requests and what the server must answer

type Method = (typeof IommufdService.methods)[number];

/** A generated call: its request messages as bytes (one, except for client streaming). */
interface FuzzCall {
  readonly method: Method;
  readonly messages: readonly FuzzMessage[];
  /** ImportVm of a snapshot ExportVm made of a populated VM (resolved when sent). */
  readonly snapshot?: SnapshotRecipe;
}

interface FuzzMessage {
  readonly init: Record<string, unknown>;
  readonly mutation: Mutation;
  readonly bytes: Buffer;
}

interface SnapshotRecipe {
  readonly of: string;
  readonly vmId: string;
  readonly mutation: Mutation;
  /** Where the stream is cut into chunks (fractions of its length). */
  readonly cuts: readonly number[];
}

const ONLY = process.env.IOMMUFD_FUZZ_RPCS?.split(",");
const METHODS = IommufdService.methods.filter((m) => ONLY === undefined || ONLY.includes(m.name));
const STREAMING_REQUESTS = (m: Method) => m.methodKind === "client_streaming" || m.methodKind === "bidi_streaming";
const STREAMING_RESPONSES = (m: Method) => m.methodKind === "server_streaming" || m.methodKind === "bidi_streaming";

/** A request message of `method` (from the descriptor, or from `init`), encoded and perhaps mutated. */
function messageOf(method: Method, init: fc.Arbitrary<Record<string, unknown>> = messageArb(method.input)): fc.Arbitrary<FuzzMessage> {
  return fc.tuple(init, mutation).map(([init, m]) => ({ init, mutation: m, bytes: mutate(toBinary(method.input, create(method.input, init as never)), m) }));
}

/**
 * Snapshots to import: what ExportVm streamed for each populated VM at the
 * last reset (empty while ExportVm does not work).
 */
const snapshots = new Map<string, Buffer>();

function callOf(method: Method): fc.Arbitrary<FuzzCall> {
  const message = PLAUSIBLE[method.name] ? fc.oneof(messageOf(method), messageOf(method, PLAUSIBLE[method.name])) : messageOf(method);
  const messages = STREAMING_REQUESTS(method) ? fc.array(message, { maxLength: 3 }) : message.map((m) => [m]);
  const generic = messages.map((ms) => ({ method, messages: ms }));
  if (method.name !== "ImportVm") return generic;
  const recipe: fc.Arbitrary<SnapshotRecipe> = fc.record({
    of: pick(MOCK_VM, VTD_VM),
    vmId: fc.oneof({ weight: 4, arbitrary: pick(...SCRATCH_VMS) }, { weight: 1, arbitrary: vmId }),
    mutation: fc.oneof({ weight: 2, arbitrary: fc.constant<Mutation>({ kind: "none" }) }, { weight: 3, arbitrary: mutation }),
    cuts: fc.array(fc.double({ min: 0, max: 1, noNaN: true }), { maxLength: 3 }),
  });
  return fc.oneof(generic, recipe.map((snapshot) => ({ method, messages: [], snapshot })));
}

/** The ImportVm messages of a recipe: the vm_id, then the (mutated) snapshot in chunks. */
function importMessages(method: Method, recipe: SnapshotRecipe): Buffer[] {
  const stream = mutate(snapshots.get(recipe.of) ?? Buffer.alloc(0), recipe.mutation);
  const cuts = [...new Set(recipe.cuts.map((c) => Math.floor(c * stream.length)))].sort((a, b) => a - b);
  const chunks = [0, ...cuts].map((from, i) => stream.subarray(from, [...cuts, stream.length][i]));
  return chunks.map((chunk, i) => Buffer.from(toBinary(method.input, create(method.input, { vmId: i === 0 ? recipe.vmId : "", chunk } as never))));
}

const call: fc.Arbitrary<FuzzCall> = fc.oneof(...METHODS.map(callOf));

type Outcome = { ok: true; responses: Buffer[] } | { ok: false; error: grpc.ServiceError };

const identity = (b: Buffer) => b;

/** Sends one call with its method's streaming kind; the outcome once its status arrives. */
function send(client: grpc.Client, c: FuzzCall): Promise<Outcome> {
  const path = `/${IommufdService.typeName}/${c.method.name}`;
  const messages = c.snapshot ? importMessages(c.method, c.snapshot) : c.messages.map((m) => m.bytes);
  const options = { deadline: Date.now() + 30_000 };
  return new Promise((resolve) => {
    const done = (error: grpc.ServiceError | null, responses: Buffer[]) => resolve(error ? { ok: false, error } : { ok: true, responses });
    if (STREAMING_RESPONSES(c.method)) {
      const responses: Buffer[] = [];
      const stream = STREAMING_REQUESTS(c.method)
        ? client.makeBidiStreamRequest(path, identity, identity, new grpc.Metadata(), options)
        : client.makeServerStreamRequest(path, identity, identity, messages[0], new grpc.Metadata(), options);
      stream.on("data", (b: Buffer) => responses.push(b));
      stream.on("error", (e: grpc.ServiceError) => done(e, responses));
      stream.on("status", (s: grpc.StatusObject) => s.code === grpc.status.OK && done(null, responses));
      if (STREAMING_REQUESTS(c.method)) {
        const writable = stream as grpc.ClientDuplexStream<Buffer, Buffer>;
        for (const m of messages) writable.write(m);
        writable.end();
      }
    } else if (STREAMING_REQUESTS(c.method)) {
      const stream = client.makeClientStreamRequest(path, identity, identity, new grpc.Metadata(), options, (e: grpc.ServiceError | null, r?: Buffer) => done(e, r ? [r] : []));
      for (const m of messages) stream.write(m);
      stream.end();
    } else {
      client.makeUnaryRequest(path, identity, identity, messages[0], new grpc.Metadata(), options, (e: grpc.ServiceError | null, r?: Buffer) => done(e, r ? [r] : []));
    }
  });
}

/** Sends every call, `IN_FLIGHT` at a time; outcomes in call order. */
async function sendAll(client: grpc.Client, calls: readonly FuzzCall[]): Promise<Outcome[]> {
  const outcomes: Outcome[] = new Array(calls.length);
  let next = 0;
  const worker = async () => {
    while (next < calls.length) {
      const i = next++;
      outcomes[i] = await send(client, calls[i]);
    }
  };
  await Promise.all(Array.from({ length: IN_FLIGHT }, worker));
  return outcomes;
}

const ERRNO_OF_NAME = new Map(Object.entries(ERRNO)) as Map<Errno, number>;

/** What is wrong with one answer per api.md Errors ("" if nothing). */
function problemWith(c: FuzzCall, outcome: Outcome): string {
  if (outcome.ok) {
    for (const response of outcome.responses) {
      try {
        fromBinary(c.method.output, response);
      } catch (e) {
        return `the response does not decode as ${c.method.output.typeName}: ${(e as Error).message}`;
      }
    }
    return "";
  }
  const e = outcome.error;
  if (e.code === grpc.status.INTERNAL || e.code === grpc.status.UNKNOWN) return `${grpc.status[e.code]}: ${e.details}`;
  const [bin] = e.metadata?.get("grpc-status-details-bin") ?? [];
  if (!(bin instanceof Buffer)) return `${grpc.status[e.code]} without grpc-status-details-bin: ${e.details}`;
  const status = fromBinary(StatusSchema, bin);
  const infos = status.details.map((d) => anyUnpack(d, ErrorInfoSchema)).filter((x) => x !== undefined);
  if (infos.length !== 1) return `${infos.length} ErrorInfos in ${grpc.status[e.code]}: ${e.details}`;
  const [info] = infos;
  const errno = info.reason as Errno;
  const quota = status.details.some((d) => anyUnpack(d, QuotaFailureSchema) !== undefined);
  if (info.domain !== "iommufd.v1") return `ErrorInfo.domain ${info.domain}`;
  if (!ERRNO_OF_NAME.has(errno)) return `ErrorInfo.reason ${info.reason} is not an errno of api.md`;
  if (GRPC_CODE[errno] !== e.code || status.code !== e.code) return `${info.reason} sent as ${grpc.status[e.code]} (Status.code ${status.code})`;
  if (info.metadata.errno !== String(ERRNO_OF_NAME.get(errno))) return `${info.reason} with metadata.errno ${info.metadata.errno}`;
  if (quota !== (errno === "EDQUOT")) return `${info.reason} ${quota ? "with" : "without"} a QuotaFailure`;
  if (c.method.name !== "Invalidate" && info.metadata.entries_handled !== undefined) return `entries_handled on ${c.method.name}`;
  return "";
}

const show = (value: unknown) =>
  JSON.stringify(value, (_k, v) => (typeof v === "bigint" ? `0x${v.toString(16)}` : v instanceof Uint8Array ? `bytes:${Buffer.from(v).toString("hex")}` : v));

function describeCall(c: FuzzCall): string {
  if (c.snapshot) return `${c.method.name} of the snapshot of ${c.snapshot.of} ${show(c.snapshot)}`;
  return `${c.method.name} ${c.messages.map((m) => `${show(m.init)}${m.mutation.kind === "none" ? "" : ` mutated ${show(m.mutation)}`} (${m.bytes.toString("hex")})`).join(", ")}`;
}

/** Outcomes per RPC: "OK" or the errno (or gRPC code when there is none). */
const tally = new Map<string, Map<string, number>>();

function record(c: FuzzCall, outcome: Outcome): void {
  let label = "OK";
  if (!outcome.ok) {
    const [bin] = outcome.error.metadata?.get("grpc-status-details-bin") ?? [];
    const info = bin instanceof Buffer ? fromBinary(StatusSchema, bin).details.map((d) => anyUnpack(d, ErrorInfoSchema)).find((x) => x) : undefined;
    label = info?.reason ?? grpc.status[outcome.error.code];
  }
  const perRpc = tally.get(c.method.name) ?? new Map<string, number>();
  perRpc.set(label, (perRpc.get(label) ?? 0) + 1);
  tally.set(c.method.name, perRpc);
}

// ---------------------------------------------------------------------------

/** grpc.health.v1.Health/Check of `service`. */
function healthCheck(client: grpc.Client, service: string): Promise<HealthCheckResponse_ServingStatus> {
  return new Promise((resolve, reject) => {
    client.makeUnaryRequest(
      "/grpc.health.v1.Health/Check",
      (req: { service: string }) => Buffer.from(toBinary(HealthCheckRequestSchema, create(HealthCheckRequestSchema, req))),
      (b: Buffer) => fromBinary(HealthCheckResponseSchema, b),
      { service },
      (err, response) => (err ? reject(err) : resolve(response!.status)),
    );
  });
}

describe("random requests of every RPC (fast-check)", () => {
  let sent = 0;

  beforeAll(async () => {
    t = await startTestServer();
  });
  afterAll(async () => {
    if (process.env.IOMMUFD_FUZZ_STATS === "1") {
      for (const [rpc, outcomes] of [...tally].sort()) console.log(rpc.padEnd(18), [...outcomes].sort((a, b) => b[1] - a[1]).map(([k, n]) => `${k} ${n}`).join(", "));
    }
    await t?.close();
  });

  it(`${TOTAL} requests: never INTERNAL or UNKNOWN, every error with its ErrorInfo, every response decodable`, async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(call, { minLength: PER_RUN, maxLength: PER_RUN }), async (calls) => {
        await resetWorld();
        const outcomes = await sendAll(t.client.grpc, calls);
        sent += calls.length;
        const problems: string[] = [];
        calls.forEach((c, i) => {
          record(c, outcomes[i]);
          const problem = problemWith(c, outcomes[i]);
          if (problem) problems.push(`${describeCall(c)}: ${problem}`);
        });
        if (problems.length > 0) throw new Error(`${problems.length} of ${calls.length} answers break api.md:\n${problems.slice(0, 12).join("\n")}`);
      }),
      {
        seed: SEED,
        numRuns: Math.ceil(TOTAL / PER_RUN),
        // Each failure names the offending calls itself: no shrinking, and no dump of the whole batch.
        endOnFailure: true,
        reporter: (run) => {
          if (run.failed) throw new Error(`seed ${run.seed}, run ${run.numRuns}: ${run.errorInstance instanceof Error ? run.errorInstance.message : String(run.errorInstance)}`);
        },
      },
    );
    expect(sent).toBeGreaterThanOrEqual(TOTAL);
    // Every RPC was exercised, and every RPC succeeded at least once: the pools reach past the argument checks.
    for (const method of METHODS) expect(tally.get(method.name)?.get("OK") ?? 0, `successful ${method.name} calls`).toBeGreaterThan(0);
  }, 120_000);

  it("the server is alive afterwards: Health/Check is SERVING and a new VM works", async () => {
    const health = new grpc.Client(t.server.address, grpc.credentials.createInsecure());
    try {
      expect(await healthCheck(health, "")).toBe(HealthCheckResponse_ServingStatus.SERVING);
      expect(await healthCheck(health, IommufdService.typeName)).toBe(HealthCheckResponse_ServingStatus.SERVING);
    } finally {
      health.close();
    }
    await destroyAllVms(t.client);
    const { vm } = await t.client.createVm({ vmId: "after-fuzz", model: IommuModel.INTEL_VTD, guestMemoryBytes: MIB });
    expect(vm?.objectCount).toBe(0);
    const v = t.client.vm("after-fuzz");
    expect((await v.allocIoas()).ioasId).toBe(1);
    await v.writeGuestMemory({ gpa: 0n, data: Buffer.from("alive") });
    expect(Buffer.from((await v.readGuestMemory({ gpa: 0n, length: 5 })).data).toString()).toBe("alive");
  });
});
