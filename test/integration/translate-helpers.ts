import { expect } from "vitest";
import type { VmMethods } from "../../client/client.js";
import { Stage1PageTable } from "../../client/pagetable.js";
import type { TranslateResponse } from "../../gen/iommufd/v1/dma_pb.js";
import { IommuOption } from "../../gen/iommufd/v1/ioas_pb.js";
import { IommuModel } from "../../gen/iommufd/v1/vm_pb.js";
import type { TestServer } from "../helpers/server.js";

/**
 * VM setups for the Translate tests: a VT-d VM with one IOAS whose areas
 * form the stage-2 (GPA -> host) map, a nest-parent HWPT on it, a guest
 * stage-1 table built with Stage1PageTable, and a nested HWPT attached.
 */

export const KIB = 1n << 10n;
export const MIB = 1n << 20n;
export const GIB = 1n << 30n;
export const U64_MAX = (1n << 64n) - 1n;

/** VT-d fault reasons and the reason_name api.md fixes for each (vtd.md §3). */
export const REASON_NAME: Readonly<Record<number, string>> = {
  0x59: "BLOCKED",
  0x71: "S1_NOT_PRESENT",
  0x72: "S1_RESERVED",
  0x73: "S2_ACCESS_S1_ROOT",
  0x74: "S1_TABLE_BEYOND_S2",
  0x75: "S2_NO_READ_S1_ROOT",
  0x76: "S2_NO_READ_S1_TABLE",
  0x77: "S2_NO_WRITE_S1_AD",
  0x79: "S2_NOT_PRESENT",
  0x7a: "S2_RESERVED",
  0x80: "NON_CANONICAL",
  0x81: "USER_TO_SUPERVISOR",
  0x83: "BEYOND_MAX_ADDRESS",
  0x85: "NO_WRITE",
  0x86: "NO_READ",
};

/** A stage-2 area: MapIoas(iova, user_va, length, rights). */
export interface Area {
  iova: bigint;
  userVa: bigint;
  length: bigint;
  readable?: boolean;
  writeable?: boolean;
}

export interface VmOptionsInit {
  iotlbEntries?: number;
  pagingStructureCaches?: boolean;
  fiveLevel?: boolean;
}

export interface NestedSetup {
  /** Guest RAM (default 1 GiB). */
  guestBytes?: bigint;
  options?: VmOptionsInit;
  /** IOMMU_OPTION_HUGE_PAGES of the IOAS (default false: 4 KiB stage-2 pages). */
  hugePages?: boolean;
  /** Stage-2 areas (default: identity map of the first 64 MiB). */
  areas?: Area[];
  /** Stage-1 levels (default 4). */
  levels?: 4 | 5;
  /** Where Stage1PageTable carves its tables (GPA = host address: keep it identity-mapped). */
  tableBase?: bigint;
  tableBytes?: bigint;
  /** pgtbl_addr override (default: the Stage1PageTable root). */
  pgtblAddr?: bigint;
  eafe?: boolean;
  /** Allocate the nested HWPT with the PASID flag and bind a PASID-capable device. */
  pasid?: boolean;
  /** Attach the device's RID to the nested HWPT (default true). */
  attach?: boolean;
}

export interface NestedVm {
  vmId: string;
  vm: VmMethods;
  ioasId: number;
  devId: number;
  parentId: number;
  nestedId: number;
  s1: Stage1PageTable;
}

export const TABLE_BASE = 0x100000n;

export async function createNestedVm(t: TestServer, vmId: string, setup: NestedSetup = {}): Promise<NestedVm> {
  const options = setup.options ?? {};
  await t.client.createVm({ vmId, model: IommuModel.INTEL_VTD, guestMemoryBytes: setup.guestBytes ?? GIB, options });
  const vm = t.client.vm(vmId);
  const { ioasId } = await vm.allocIoas();
  if (!setup.hugePages) await vm.setOption({ option: IommuOption.HUGE_PAGES, objectId: ioasId, value: 0n });
  for (const a of setup.areas ?? [{ iova: 0n, userVa: 0n, length: 64n * MIB }]) await mapArea(vm, ioasId, a);
  const { devId } = await vm.bindDevice({ name: "dev0", pasidCapable: setup.pasid ?? false });
  const { hwptId: parentId } = await vm.allocHwpt({ devId, ptId: ioasId, nestParent: true });
  const levels = setup.levels ?? 4;
  const s1 = new Stage1PageTable(vm, { levels, tableBase: setup.tableBase ?? TABLE_BASE, tableBytes: setup.tableBytes ?? 0x100000n });
  const { hwptId: nestedId } = await vm.allocHwpt({
    devId,
    ptId: parentId,
    pasid: setup.pasid ?? false,
    data: { case: "vtdS1", value: { pgtblAddr: setup.pgtblAddr ?? s1.root, addrWidth: s1.addrWidth, eafe: setup.eafe ?? false } },
  });
  if (setup.attach ?? true) await vm.attachDevice({ devId, ptId: nestedId });
  return { vmId, vm, ioasId, devId, parentId, nestedId, s1 };
}

export async function mapArea(vm: VmMethods, ioasId: number, a: Area): Promise<void> {
  await vm.mapIoas({ ioasId, iova: a.iova, userVa: a.userVa, length: a.length, readable: a.readable ?? true, writeable: a.writeable ?? true });
}

/** The response faulted exactly as listed (index -> reason), with reason_name, iova and address 0. */
export function expectFaults(r: TranslateResponse, iovas: readonly bigint[], expected: Record<number, number>): void {
  const got = r.faults.map((f) => ({ index: f.index, reason: f.reason, reasonName: f.reasonName, iova: f.iova }));
  const want = Object.entries(expected).map(([i, reason]) => ({ index: Number(i), reason, reasonName: REASON_NAME[reason], iova: iovas[Number(i)] }));
  expect(got.map((f) => ({ ...f, reason: hexOf(f.reason) }))).toEqual(want.map((f) => ({ ...f, reason: hexOf(f.reason) })));
  for (const i of Object.keys(expected)) expect(r.addresses[Number(i)]).toBe(0n);
}

/** Translate that must fault every access with one reason; returns the response. */
export async function expectFault(vm: VmMethods, devId: number, iova: bigint, reason: number, opts: { write?: boolean; pasid?: number } = {}): Promise<TranslateResponse> {
  const r = await vm.translate({ devId, iovas: [iova], write: opts.write ?? false, pasid: opts.pasid });
  expectFaults(r, [iova], { 0: reason });
  return r;
}

export function hexOf(n: number | bigint): string {
  return `0x${n.toString(16)}`;
}

/** GetStats as plain numbers. */
export async function stats(vm: VmMethods) {
  const { stats: s } = await vm.getStats();
  return {
    translations: Number(s!.translations),
    iotlbHits: Number(s!.iotlbHits),
    iotlbMisses: Number(s!.iotlbMisses),
    memoryReferences: Number(s!.memoryReferences),
    faults: Number(s!.faults),
    invalidationEntries: Number(s!.invalidationEntries),
    iotlbEntries: Number(s!.iotlbEntries),
  };
}

/** The IOTLB of a HWPT as plain objects (pasid undefined when unset). */
export async function dump(vm: VmMethods, hwptId: number) {
  const { entries } = await vm.dumpIotlb({ hwptId });
  return entries.map((e) => ({ iova: e.iova, pageSize: e.pageSize, address: e.address, readable: e.readable, writeable: e.writeable, pasid: e.pasid }));
}
