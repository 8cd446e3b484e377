/**
 * Shared setup for the spec-driven integration tests: a real server per test
 * file, fresh VMs, small fixtures (devices, IOASes, HWPTs), the errno and gRPC
 * code tables of the specs, kernel-layout encoders for the raw request forms,
 * and a snapshot of the observable state used to check that failed RPCs
 * change nothing.
 *
 * Everything here is derived from the specs (api.md, iommufd-semantics.md,
 * vtd.md), not from the server's code: the raw encoders in particular are
 * written independently of server/core/uapi.ts.
 */
import * as grpc from "@grpc/grpc-js";
import { afterAll, beforeAll, expect } from "vitest";
import type { IommufdClient, IommufdError, RequestOf, VmMethods } from "../../client/client.js";
import { IommuModel } from "../../gen/iommufd/v1/vm_pb.js";
import { expectErrno } from "../helpers/errors.js";
import { startTestServer, type TestServer } from "../helpers/server.js";

export { IommuModel };

export const U64_MAX = (1n << 64n) - 1n;
export const PAGE = 4096n;
export const MIB = 1n << 20n;

/** Linux errno numbers (iommufd-semantics.md §9). */
export const ERRNO = {
  EPERM: 1,
  ENOENT: 2,
  EIO: 5,
  E2BIG: 7,
  ENOMEM: 12,
  EFAULT: 14,
  EBUSY: 16,
  EEXIST: 17,
  ENODEV: 19,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  EOPNOTSUPP: 95,
  EADDRINUSE: 98,
  EDQUOT: 122,
} as const;
export type Errno = keyof typeof ERRNO;

/** api.md "Errors": the gRPC code of each errno. */
export const GRPC_CODE: Record<Errno, grpc.status> = {
  EINVAL: grpc.status.INVALID_ARGUMENT,
  E2BIG: grpc.status.INVALID_ARGUMENT,
  EIO: grpc.status.INVALID_ARGUMENT,
  ENOENT: grpc.status.NOT_FOUND,
  EEXIST: grpc.status.ALREADY_EXISTS,
  EBUSY: grpc.status.FAILED_PRECONDITION,
  EADDRINUSE: grpc.status.FAILED_PRECONDITION,
  ENODEV: grpc.status.FAILED_PRECONDITION,
  EOPNOTSUPP: grpc.status.UNIMPLEMENTED,
  EFAULT: grpc.status.OUT_OF_RANGE,
  EOVERFLOW: grpc.status.OUT_OF_RANGE,
  ENOSPC: grpc.status.RESOURCE_EXHAUSTED,
  ENOMEM: grpc.status.RESOURCE_EXHAUSTED,
  EDQUOT: grpc.status.RESOURCE_EXHAUSTED,
  EPERM: grpc.status.PERMISSION_DENIED,
};

/**
 * Awaits a call that must fail with `errno`, and checks the whole error as
 * api.md "Errors" defines it: the gRPC code of the table, ErrorInfo's errno
 * number, no entries_handled (only Invalidate carries it) and no QuotaFailure
 * (only EDQUOT carries one).
 */
export async function expectFail(call: Promise<unknown>, errno: Errno): Promise<IommufdError> {
  const e = await expectErrno(call, errno);
  expect(e.code, `gRPC code of ${errno}: ${e.message}`).toBe(GRPC_CODE[errno]);
  expect(e.errnoValue, `ErrorInfo.metadata.errno of ${errno}`).toBe(ERRNO[errno]);
  expect(e.entriesHandled, "entries_handled outside Invalidate").toBeUndefined();
  if (errno !== "EDQUOT") expect(e.quotaFailure, "QuotaFailure without EDQUOT").toBeUndefined();
  return e;
}

/** An Invalidate that must fail with `errno` after handling `handled` entries (api.md Hardware page tables). */
export async function expectInvalidateFail(call: Promise<unknown>, errno: Errno, handled: number): Promise<IommufdError> {
  const e = await expectErrno(call, errno, handled);
  expect(e.code, `gRPC code of ${errno}: ${e.message}`).toBe(GRPC_CODE[errno]);
  expect(e.errnoValue).toBe(ERRNO[errno]);
  expect(e.entriesHandled, "ErrorInfo.metadata.entries_handled").toBe(handled);
  return e;
}

// ---------------------------------------------------------------------------
// Server and VMs

export interface Vm {
  readonly id: string;
  readonly v: VmMethods;
  readonly client: IommufdClient;
  readonly model: IommuModel;
}

export interface VmOptionsInit {
  iotlbEntries?: number;
  pagingStructureCaches?: boolean;
  fiveLevel?: boolean;
}

export interface ServerEnv {
  readonly t: TestServer;
  readonly client: IommufdClient;
  /** A fresh VM with a unique id (`prefix-N`), 64 MiB of RAM unless told otherwise. */
  vm(model: IommuModel, options?: VmOptionsInit, guestMemoryBytes?: bigint): Promise<Vm>;
  mockVm(options?: VmOptionsInit, guestMemoryBytes?: bigint): Promise<Vm>;
  vtdVm(options?: VmOptionsInit, guestMemoryBytes?: bigint): Promise<Vm>;
}

/** Starts a real server for the enclosing file (or describe block) and stops it afterwards. */
export function serverEnv(prefix = "vm"): ServerEnv {
  let t: TestServer | undefined;
  let seq = 0;
  beforeAll(async () => {
    t = await startTestServer();
  });
  afterAll(async () => {
    await t?.close();
  });
  const env: ServerEnv = {
    get t() {
      if (!t) throw new Error("server not started");
      return t;
    },
    get client() {
      return env.t.client;
    },
    async vm(model, options = {}, guestMemoryBytes = 64n * MIB) {
      const id = `${prefix}-${++seq}`;
      await env.client.createVm({ vmId: id, model, guestMemoryBytes, options });
      return { id, v: env.client.vm(id), client: env.client, model };
    },
    mockVm: (options, bytes) => env.vm(IommuModel.MOCK, options, bytes),
    vtdVm: (options, bytes) => env.vm(IommuModel.INTEL_VTD, options, bytes),
  };
  return env;
}

// ---------------------------------------------------------------------------
// Fixtures

let deviceSeq = 0;

export interface BindOptions {
  name?: string;
  pasid?: boolean;
  dirty?: boolean;
}

/** BindDevice with a unique name; dirty tracking capable unless told otherwise. */
export async function bind(vm: Vm, options: BindOptions = {}): Promise<number> {
  const name = options.name ?? `0000:00:${(++deviceSeq).toString(16).padStart(2, "0")}.0`;
  const { devId } = await vm.v.bindDevice({ name, pasidCapable: options.pasid ?? false, dirtyTrackingCapable: options.dirty ?? true });
  return devId;
}

export async function ioas(vm: Vm): Promise<number> {
  return (await vm.v.allocIoas()).ioasId;
}

export interface MapInit {
  userVa?: bigint;
  length?: bigint;
  iova?: bigint;
  readable?: boolean;
  writeable?: boolean;
}

/** MapIoas, read-write 4 KiB at user_va 0 unless told otherwise; returns the IOVA. */
export async function map(vm: Vm, ioasId: number, m: MapInit = {}): Promise<bigint> {
  const { iova } = await vm.v.mapIoas(mapReq(ioasId, m));
  return iova;
}

export function mapReq(ioasId: number, m: MapInit = {}): Omit<RequestOf<"mapIoas">, "vmId"> {
  return {
    ioasId,
    userVa: m.userVa ?? 0n,
    length: m.length ?? PAGE,
    ...(m.iova !== undefined && { iova: m.iova }),
    readable: m.readable ?? true,
    writeable: m.writeable ?? true,
  };
}

export interface HwptFlags {
  nestParent?: boolean;
  dirtyTracking?: boolean;
  pasid?: boolean;
}

/** AllocHwpt with no data: a paging HWPT on an IOAS. */
export async function pagingHwpt(vm: Vm, devId: number, ioasId: number, flags: HwptFlags = {}): Promise<number> {
  const { hwptId } = await vm.v.allocHwpt({ devId, ptId: ioasId, ...flags });
  return hwptId;
}

/** A nested HWPT on `parentId` with the model's typed data (mock: iotlb; VT-d: a 48-bit stage 1). */
export async function nestedHwpt(vm: Vm, devId: number, parentId: number, init: { iotlb?: number; vtd?: Partial<VtdS1Init>; pasid?: boolean } = {}): Promise<number> {
  const data =
    vm.model === IommuModel.INTEL_VTD
      ? { case: "vtdS1" as const, value: { sre: false, eafe: false, wpe: false, pgtblAddr: 0x10000n, addrWidth: 48, ...init.vtd } }
      : { case: "selftest" as const, value: { iotlb: init.iotlb ?? 0xbadbeef } };
  const { hwptId } = await vm.v.allocHwpt({ devId, ptId: parentId, pasid: init.pasid ?? false, data });
  return hwptId;
}

export interface VtdS1Init {
  sre: boolean;
  eafe: boolean;
  wpe: boolean;
  pgtblAddr: bigint;
  addrWidth: number;
}

/** The usual nesting setup: a device, an IOAS, a nest-parent HWPT and a nested HWPT on it. */
export async function nestingSetup(vm: Vm, init: { iotlb?: number; vtd?: Partial<VtdS1Init>; bind?: BindOptions } = {}) {
  const dev = await bind(vm, init.bind);
  const ioasId = await ioas(vm);
  const parent = await pagingHwpt(vm, dev, ioasId, { nestParent: true });
  const nested = await nestedHwpt(vm, dev, parent, init);
  return { dev, ioasId, parent, nested };
}

// ---------------------------------------------------------------------------
// Observable state

/** object_count of a VM as ListVms reports it (api.md VM lifecycle). */
export async function objectCount(vm: Vm): Promise<number> {
  let pageToken = "";
  for (;;) {
    const page = await vm.client.listVms({ pageSize: 1000, pageToken });
    const found = page.vms.find((x) => x.vmId === vm.id);
    if (found) return found.objectCount;
    if (page.nextPageToken === "") throw new Error(`VM ${vm.id} is not listed`);
    pageToken = page.nextPageToken;
  }
}

/** The id the next object would get: allocate an IOAS and destroy it again (ids are reused, §1.1). */
export async function nextId(vm: Vm): Promise<number> {
  const id = await ioas(vm);
  await vm.v.destroy({ id });
  return id;
}

export async function ranges(vm: Vm, ioasId: number): Promise<{ ranges: [bigint, bigint][]; alignment: bigint }> {
  const r = await vm.v.getIovaRanges({ ioasId });
  return { ranges: r.ranges.map((x) => [x.start, x.last]), alignment: r.alignment };
}

async function settle<T>(p: Promise<T>): Promise<T | string> {
  return p.then(
    (x) => x,
    (e: IommufdError) => `error ${e.errno}`,
  );
}

export async function dumpIotlb(vm: Vm, hwptId: number) {
  const d = await vm.v.dumpIotlb({ hwptId });
  return { selftestIotlb: [...d.selftestIotlb], entries: d.entries.map((e) => ({ iova: e.iova, pageSize: e.pageSize, address: e.address, r: e.readable, w: e.writeable, pasid: e.pasid })) };
}

/**
 * The observable state of a VM that a failed RPC must leave alone: object
 * count, the next id, each IOAS's ranges and alignment, each HWPT's IOTLB.
 */
export async function snapshot(vm: Vm, watch: { ioas?: number[]; hwpts?: number[] } = {}) {
  const state: Record<string, unknown> = { objectCount: await objectCount(vm), nextId: await nextId(vm) };
  for (const id of watch.ioas ?? []) state[`ioas ${id}`] = await settle(ranges(vm, id));
  for (const id of watch.hwpts ?? []) state[`iotlb ${id}`] = await settle(dumpIotlb(vm, id));
  return state;
}

/** Runs a call that must fail with `errno` and checks that the snapshot is unchanged. */
export async function expectFailUnchanged(vm: Vm, watch: { ioas?: number[]; hwpts?: number[] }, call: () => Promise<unknown>, errno: Errno): Promise<void> {
  const before = await snapshot(vm, watch);
  await expectFail(call(), errno);
  expect(await snapshot(vm, watch)).toEqual(before);
}

/** Bytes mapped in an IOAS, by unmapping everything (destructive: use at the end of a test). */
export async function unmapAllBytes(vm: Vm, ioasId: number): Promise<bigint> {
  return (await vm.v.unmapIoas({ ioasId, iova: 0n, length: U64_MAX })).length;
}

// ---------------------------------------------------------------------------
// Kernel uAPI constants and little-endian encoders (iommufd-semantics.md §2, §5)

export const IOMMU_HWPT_DATA_NONE = 0;
export const IOMMU_HWPT_DATA_VTD_S1 = 1;
export const IOMMU_HWPT_DATA_SELFTEST = 0xdead;
export const IOMMU_HWPT_INVALIDATE_DATA_VTD_S1 = 0;
export const IOMMU_HWPT_INVALIDATE_DATA_SELFTEST = 0xdeadbeef;
export const IOMMU_HWPT_INVALIDATE_DATA_SELFTEST_INVALID = 0xdadbeef;
export const IOMMU_HW_INFO_TYPE_DEFAULT = 0;
export const IOMMU_HW_INFO_TYPE_INTEL_VTD = 1;
export const IOMMU_HW_INFO_TYPE_ARM_SMMUV3 = 2;
export const IOMMU_HW_INFO_TYPE_SELFTEST = 0xfeedbeef;
export const IOMMU_HW_INFO_SELFTEST_REGVAL = 0xdeadbeef;
export const IOMMU_HW_INFO_VTD_ERRATA_772415_SPR17 = 1;
export const IOMMU_HW_CAP_DIRTY_TRACKING = 1n;
export const IOMMU_HW_CAP_PCI_PASID_EXEC = 2n;
export const IOMMU_HW_CAP_PCI_PASID_PRIV = 4n;
export const IOMMU_VTD_S1_SRE = 1n;
export const IOMMU_VTD_S1_EAFE = 2n;
export const IOMMU_VTD_S1_WPE = 4n;
export const IOMMU_VTD_INV_FLAGS_LEAF = 1;
export const IOMMU_TEST_INVALIDATE_FLAG_ALL = 1;
export const MOCK_APERTURE_START = 1n << 24n;
export const MOCK_APERTURE_LAST = (1n << 31n) - 1n;
export const MOCK_IO_PAGE_SIZE = 2048n;
export const IOMMU_TEST_IOTLB_DEFAULT = 0xbadbeef;

/** struct iommu_hwpt_vtd_s1 (24 bytes): flags u64 @0, pgtbl_addr u64 @8, addr_width u32 @16, __reserved u32 @20. */
export function vtdS1Bytes(s: { flags: bigint; pgtblAddr: bigint; addrWidth: number; reserved?: number }): Uint8Array {
  const b = Buffer.alloc(24);
  b.writeBigUInt64LE(s.flags, 0);
  b.writeBigUInt64LE(s.pgtblAddr, 8);
  b.writeUInt32LE(s.addrWidth, 16);
  b.writeUInt32LE(s.reserved ?? 0, 20);
  return new Uint8Array(b);
}

export function vtdS1Flags(s: { sre: boolean; eafe: boolean; wpe: boolean }): bigint {
  return (s.sre ? IOMMU_VTD_S1_SRE : 0n) | (s.eafe ? IOMMU_VTD_S1_EAFE : 0n) | (s.wpe ? IOMMU_VTD_S1_WPE : 0n);
}

/** struct iommu_hwpt_selftest (4 bytes): iotlb u32. */
export function selftestHwptBytes(iotlb: number): Uint8Array {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(iotlb >>> 0, 0);
  return new Uint8Array(b);
}

export interface VtdInvEntry {
  addr: bigint;
  npages: bigint;
  flags?: number;
  reserved?: number;
}

/** struct iommu_hwpt_vtd_s1_invalidate (24 bytes): addr u64, npages u64, flags u32, __reserved u32. */
export function vtdInvBytes(entries: readonly VtdInvEntry[]): Uint8Array {
  const b = Buffer.alloc(24 * entries.length);
  entries.forEach((e, i) => {
    b.writeBigUInt64LE(e.addr, 24 * i);
    b.writeBigUInt64LE(e.npages, 24 * i + 8);
    b.writeUInt32LE(e.flags ?? 0, 24 * i + 16);
    b.writeUInt32LE(e.reserved ?? 0, 24 * i + 20);
  });
  return new Uint8Array(b);
}

export interface SelftestInvEntry {
  flags: number;
  iotlbId: number;
}

/** struct iommu_hwpt_invalidate_selftest (8 bytes): flags u32, iotlb_id u32. */
export function selftestInvBytes(entries: readonly SelftestInvEntry[]): Uint8Array {
  const b = Buffer.alloc(8 * entries.length);
  entries.forEach((e, i) => {
    b.writeUInt32LE(e.flags >>> 0, 8 * i);
    b.writeUInt32LE(e.iotlbId >>> 0, 8 * i + 4);
  });
  return new Uint8Array(b);
}

/** RawInvalidations for VT-d entries (kernel data type 0, entry_len 24). */
export function rawVtd(entries: readonly VtdInvEntry[], over: { entryLen?: number; entryNum?: number; data?: Uint8Array; dataType?: number } = {}) {
  return {
    case: "raw" as const,
    value: {
      dataType: over.dataType ?? IOMMU_HWPT_INVALIDATE_DATA_VTD_S1,
      entryLen: over.entryLen ?? 24,
      entryNum: over.entryNum ?? entries.length,
      data: over.data ?? vtdInvBytes(entries),
    },
  };
}

/** RawInvalidations for selftest entries (kernel data type 0xdeadbeef, entry_len 8). */
export function rawSelftest(entries: readonly SelftestInvEntry[], over: { entryLen?: number; entryNum?: number; data?: Uint8Array; dataType?: number } = {}) {
  return {
    case: "raw" as const,
    value: {
      dataType: over.dataType ?? IOMMU_HWPT_INVALIDATE_DATA_SELFTEST,
      entryLen: over.entryLen ?? 8,
      entryNum: over.entryNum ?? entries.length,
      data: over.data ?? selftestInvBytes(entries),
    },
  };
}

export function selftestInv(entries: readonly { iotlbId: number; all?: boolean }[]) {
  return { case: "selftest" as const, value: { entries: entries.map((e) => ({ iotlbId: e.iotlbId, all: e.all ?? false })) } };
}

export function vtdInv(entries: readonly { addr: bigint; npages: bigint; leaf?: boolean }[]) {
  return { case: "vtdS1" as const, value: { entries: entries.map((e) => ({ addr: e.addr, npages: e.npages, leaf: e.leaf ?? false })) } };
}
