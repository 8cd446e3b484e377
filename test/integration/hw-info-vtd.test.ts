/**
 * The emulated VT-d's CAP_REG / ECAP_REG as HwInfo returns them: every bit
 * decoded with the field names of vtd.md §5, the raw `data` bytes against
 * the typed fields (struct iommu_hw_info_vtd, iommufd-semantics.md §2.4), the
 * five_level option (api.md VmOptions), and for every advertised capability
 * that the API can exercise without DMA, that the emulator honours it: a bit
 * advertised is accepted, a bit not advertised is refused.
 *
 * Bits only observable through DMA — SLLPS, FL1GP, EAFS's EA bit, C/SMPWC —
 * are checked at the end through Translate, from the decoded registers.
 */
import { describe, expect, it } from "vitest";
import { FS_A, FS_EA, SZ_1G, SZ_2M, SZ_4K } from "../../client/pagetable.js";
import { createNestedVm, GIB } from "./translate-helpers.js";
import {
  bind,
  expectFail,
  expectInvalidateFail,
  IOMMU_HW_CAP_DIRTY_TRACKING,
  IOMMU_HW_INFO_TYPE_INTEL_VTD,
  IOMMU_HW_INFO_VTD_ERRATA_772415_SPR17,
  ioas,
  map,
  nestedHwpt,
  PAGE,
  pagingHwpt,
  ranges,
  serverEnv,
  U64_MAX,
  type Vm,
  type VtdS1Init,
  vtdInv,
} from "./helpers.js";

const env = serverEnv("vtdcap");

/** A register field: [name, low bit, width]. */
type Field = readonly [name: string, lo: number, width: number];

/** CAP_REG fields, vtd.md §5. */
const CAP_FIELDS: readonly Field[] = [
  ["ND", 0, 3],
  ["RWBF", 4, 1],
  ["CM", 7, 1],
  ["SAGAW", 8, 5],
  ["MGAW", 16, 6],
  ["ZLR", 22, 1],
  ["FRO", 24, 10],
  ["SLLPS", 34, 4],
  ["PSI", 39, 1],
  ["NFR", 40, 8],
  ["MAMV", 48, 6],
  ["DWD", 54, 1],
  ["DRD", 55, 1],
  ["FL1GP", 56, 1],
  ["PI", 59, 1],
  ["FL5LP", 60, 1],
  ["ECMDS", 61, 1],
  ["ESIRTPS", 62, 1],
  ["ESRTPS", 63, 1],
];

/** ECAP_REG fields, vtd.md §5. */
const ECAP_FIELDS: readonly Field[] = [
  ["C", 0, 1],
  ["QI", 1, 1],
  ["DT", 2, 1],
  ["IR", 3, 1],
  ["EIM", 4, 1],
  ["PT", 6, 1],
  ["SC", 7, 1],
  ["IRO", 8, 10],
  ["MHMV", 20, 4],
  ["MTS", 25, 1],
  ["NEST", 26, 1],
  ["DIS", 27, 1],
  ["PRS", 29, 1],
  ["ERS", 30, 1],
  ["SRS", 31, 1],
  ["NWFS", 33, 1],
  ["EAFS", 34, 1],
  ["PSS", 35, 5],
  ["PASID", 40, 1],
  ["DIT", 41, 1],
  ["PDS", 42, 1],
  ["SMTS", 43, 1],
  ["VCS", 44, 1],
  ["SSADS", 45, 1],
  ["SSTS", 46, 1],
  ["FSTS", 47, 1],
  ["SMPWC", 48, 1],
  ["RPS", 49, 1],
  ["PMS", 51, 1],
];

type Decoded = Record<string, number> & { unnamed: number[] };

/** Every bit of a 64-bit register into its named field, plus the set bits no field names. */
function decode(reg: bigint, fields: readonly Field[]): Decoded {
  const out = { unnamed: [] as number[] } as Decoded;
  const covered = new Set<number>();
  for (const [name, lo, width] of fields) {
    out[name] = Number((reg >> BigInt(lo)) & ((1n << BigInt(width)) - 1n));
    for (let b = lo; b < lo + width; b++) covered.add(b);
  }
  for (let b = 0; b < 64; b++) if (!covered.has(b) && (reg >> BigInt(b)) & 1n) out.unnamed.push(b);
  return out;
}

interface VtdRegs {
  vm: Vm;
  flags: number;
  capReg: bigint;
  ecapReg: bigint;
  cap: Decoded;
  ecap: Decoded;
  data: Uint8Array;
  maxPasidLog2: number;
  capabilities: bigint;
}

/** A VT-d VM, a device on it, and its HwInfo decoded. */
async function vtdRegs(options: { fiveLevel?: boolean } = {}, bindOptions = { pasid: true, dirty: true }): Promise<VtdRegs & { dev: number }> {
  const vm = await env.vtdVm(options);
  const dev = await bind(vm, bindOptions);
  const info = await vm.v.hwInfo({ devId: dev });
  expect(info.dataType).toBe(IOMMU_HW_INFO_TYPE_INTEL_VTD);
  if (info.info.case !== "vtd") throw new Error(`HwInfo of a VT-d device has info.case ${info.info.case}`);
  const { flags, capReg, ecapReg } = info.info.value;
  return {
    vm,
    dev,
    flags,
    capReg,
    ecapReg,
    cap: decode(capReg, CAP_FIELDS),
    ecap: decode(ecapReg, ECAP_FIELDS),
    data: info.data,
    maxPasidLog2: info.maxPasidLog2,
    capabilities: info.capabilities,
  };
}

/** A nest-parent HWPT and a nested HWPT with `s1` on it; attach() attaches the device's RID. */
async function nestedWith(r: { vm: Vm; dev: number }, s1: Partial<VtdS1Init>) {
  const ioasId = await ioas(r.vm);
  const parent = await pagingHwpt(r.vm, r.dev, ioasId, { nestParent: true });
  const nested = await nestedHwpt(r.vm, r.dev, parent, { vtd: s1 });
  return { ioasId, parent, nested, attach: () => r.vm.v.attachDevice({ devId: r.dev, ptId: nested }) };
}

describe.each([false, true])("VT-d HwInfo with five_level = %s (vtd.md §5; api.md VmOptions, Devices)", (fiveLevel) => {
  it("data is struct iommu_hw_info_vtd in kernel layout: flags u32 @0, __reserved u32 @4 = 0, cap_reg u64 @8, ecap_reg u64 @16, little-endian (§2.4)", async () => {
    const r = await vtdRegs({ fiveLevel });
    expect(r.data.length).toBe(24);
    const view = Buffer.from(r.data);
    expect(view.readUInt32LE(0)).toBe(r.flags);
    expect(view.readUInt32LE(4)).toBe(0);
    expect(view.readBigUInt64LE(8)).toBe(r.capReg);
    expect(view.readBigUInt64LE(16)).toBe(r.ecapReg);
  });

  it("flags is exactly IOMMU_HW_INFO_VTD_ERRATA_772415_SPR17, as mainline reports (api.md Devices)", async () => {
    const r = await vtdRegs({ fiveLevel });
    expect(r.flags).toBe(IOMMU_HW_INFO_VTD_ERRATA_772415_SPR17);
  });

  it("every set bit of CAP_REG and ECAP_REG belongs to a field named in vtd.md §5", async () => {
    const r = await vtdRegs({ fiveLevel });
    expect(r.cap.unnamed, `CAP_REG 0x${r.capReg.toString(16)}`).toEqual([]);
    expect(r.ecap.unnamed, `ECAP_REG 0x${r.ecapReg.toString(16)}`).toEqual([]);
  });

  it("advertises what guest-visible nesting needs (vtd.md §5): ECAP SMTS, FSTS, SSTS, NEST, PASID, PSS, QI; CAP SAGAW 4-level, MGAW, PSI, MAMV", async () => {
    const { cap, ecap } = await vtdRegs({ fiveLevel });
    expect({ SMTS: ecap.SMTS, FSTS: ecap.FSTS, SSTS: ecap.SSTS, NEST: ecap.NEST, PASID: ecap.PASID, QI: ecap.QI, PSI: cap.PSI }).toEqual({
      SMTS: 1,
      FSTS: 1,
      SSTS: 1,
      NEST: 1,
      PASID: 1,
      QI: 1,
      PSI: 1,
    });
    expect(ecap.PSS).toBeGreaterThan(0);
    expect(cap.SAGAW & 0b00100).toBe(0b00100);
    expect(cap.MGAW).toBeGreaterThanOrEqual(47);
    expect(cap.MAMV).toBeGreaterThan(0);
  });

  it(`five_level ${fiveLevel ? "sets" : "clears"} FL5LP and SAGAW 5-level, and MGAW is ${fiveLevel ? 56 : 47} (api.md VmOptions; vtd.md §5)`, async () => {
    const { cap } = await vtdRegs({ fiveLevel });
    expect(cap.FL5LP).toBe(fiveLevel ? 1 : 0);
    expect(cap.SAGAW).toBe(fiveLevel ? 0b01100 : 0b00100);
    expect(cap.MGAW).toBe(fiveLevel ? 56 : 47);
  });

  it("FL5LP: a stage-1 addr_width 57 is accepted at attach iff FL5LP is advertised; 48 always is", async () => {
    const r = await vtdRegs({ fiveLevel });
    const wide = await nestedWith(r, { addrWidth: 57 });
    if (r.cap.FL5LP) expect((await wide.attach()).hwptId).toBe(wide.nested);
    else await expectFail(wide.attach(), "EINVAL");
    await r.vm.v.detachDevice({ devId: r.dev });
    const narrow = await nestedWith(r, { addrWidth: 48 });
    expect((await narrow.attach()).hwptId).toBe(narrow.nested);
  });

  it("SAGAW/MGAW: a second-stage (nest-parent) HWPT covers exactly the MGAW + 1 bit input space", async () => {
    const r = await vtdRegs({ fiveLevel });
    const width = BigInt(r.cap.MGAW + 1);
    const ioasId = await ioas(r.vm);
    await pagingHwpt(r.vm, r.dev, ioasId, { nestParent: true });
    expect(await ranges(r.vm, ioasId)).toEqual({ ranges: [[0n, (1n << width) - 1n]], alignment: PAGE });
    await map(r.vm, ioasId, { iova: (1n << width) - PAGE });
    await expectFail(r.vm.v.mapIoas({ ioasId, userVa: 0n, length: PAGE, iova: 1n << width, readable: true, writeable: true }), "EINVAL");
  });

  it("SRS: SRE is accepted at attach iff ECAP.SRS is advertised", async () => {
    const r = await vtdRegs({ fiveLevel });
    const sre = await nestedWith(r, { sre: true });
    if (r.ecap.SRS) await sre.attach();
    else await expectFail(sre.attach(), "EINVAL");
  });

  it("EAFS: EAFE is accepted at attach iff ECAP.EAFS is advertised", async () => {
    const r = await vtdRegs({ fiveLevel });
    const eafe = await nestedWith(r, { eafe: true });
    if (r.ecap.EAFS) await eafe.attach();
    else await expectFail(eafe.attach(), "EINVAL");
  });

  it("PASID/PSS: max_pasid_log2 is PSS + 1 and PASIDs up to 2^(PSS+1) - 1 attach while 2^(PSS+1) is refused", async () => {
    const r = await vtdRegs({ fiveLevel });
    expect(r.ecap.PASID).toBe(1);
    const bits = r.ecap.PSS + 1;
    expect(r.maxPasidLog2).toBe(bits);
    const ioasId = await ioas(r.vm);
    const hwpt = await pagingHwpt(r.vm, r.dev, ioasId, { pasid: true });
    await r.vm.v.attachDevice({ devId: r.dev, ptId: hwpt, pasid: 1 });
    await r.vm.v.attachDevice({ devId: r.dev, ptId: hwpt, pasid: 2 ** bits - 1 });
    await expectFail(r.vm.v.attachDevice({ devId: r.dev, ptId: hwpt, pasid: 2 ** bits }), "EINVAL");
  });

  it("NEST/SSTS: nest-parent and nested HWPTs are allocated and attach (ECAP.NEST with SMTS, SSTS, FSTS)", async () => {
    const r = await vtdRegs({ fiveLevel });
    expect(r.ecap.NEST && r.ecap.SMTS && r.ecap.SSTS && r.ecap.FSTS).toBe(1);
    const { nested, attach } = await nestedWith(r, { addrWidth: 48 });
    expect((await attach()).hwptId).toBe(nested);
  });

  it("PSI/MAMV: an invalidation of a 2^MAMV-page naturally aligned range succeeds, as does a smaller aligned power of two", async () => {
    const r = await vtdRegs({ fiveLevel });
    expect(r.cap.PSI).toBe(1);
    const mamv = BigInt(r.cap.MAMV);
    const { nested } = await nestedWith(r, {});
    const small = mamv < 18n ? mamv : 18n;
    const entries = [
      { addr: 0n, npages: 1n << mamv },
      { addr: (1n << (small + 12n)) * 3n, npages: 1n << small, leaf: true },
    ];
    // The aligned range at 2^MAMV pages above 0 only exists when it fits in 64 bits.
    if (mamv + 13n <= 64n) entries.push({ addr: 1n << (mamv + 12n), npages: 1n << mamv });
    expect((await r.vm.v.invalidate({ hwptId: nested, requests: vtdInv(entries) })).entriesHandled).toBe(entries.length);
    await expectInvalidateFail(r.vm.v.invalidate({ hwptId: nested, requests: vtdInv([{ addr: PAGE, npages: U64_MAX }]) }), "EINVAL", 0);
  });

  it("SSADS: second-stage dirty tracking (AllocHwpt dirty_tracking, HwInfo DIRTY_TRACKING) is offered iff ECAP.SSADS is advertised", async () => {
    const r = await vtdRegs({ fiveLevel }, { pasid: false, dirty: true });
    const ioasId = await ioas(r.vm);
    expect(r.capabilities & IOMMU_HW_CAP_DIRTY_TRACKING, "HwInfo.capabilities DIRTY_TRACKING").toBe(r.ecap.SSADS ? IOMMU_HW_CAP_DIRTY_TRACKING : 0n);
    if (r.ecap.SSADS) await pagingHwpt(r.vm, r.dev, ioasId, { dirtyTracking: true });
    else await expectFail(r.vm.v.allocHwpt({ devId: r.dev, ptId: ioasId, dirtyTracking: true }), "EOPNOTSUPP");
  });
});

describe("VT-d HwInfo: five_level changes only FL5LP, SAGAW 5-level and MGAW (api.md VmOptions; vtd.md §5)", () => {
  it("the other bits of CAP_REG and all of ECAP_REG are identical", async () => {
    const four = await vtdRegs({ fiveLevel: false });
    const five = await vtdRegs({ fiveLevel: true });
    const FL5LP = 1n << 60n;
    const SAGAW_5 = 1n << 11n;
    const MGAW = 0x3fn << 16n;
    const mask = ~(FL5LP | SAGAW_5 | MGAW) & U64_MAX;
    expect(five.capReg & mask).toBe(four.capReg & mask);
    expect(five.ecapReg).toBe(four.ecapReg);
    expect(five.capReg ^ four.capReg).toBe(FL5LP | SAGAW_5 | ((47n ^ 56n) << 16n));
  });

  it("the registers depend on the device only through SSADS, which follows its dirty-tracking capability", async () => {
    // One emulated unit per VM; a dirty-capable device sits behind a unit with
    // second-stage A/D, as Linux derives IOMMU_CAP_DIRTY_TRACKING from SSADS.
    const vm = await env.vtdVm();
    const infos = [];
    for (const opts of [{ pasid: true, dirty: true }, { pasid: false, dirty: false }]) {
      const info = await vm.v.hwInfo({ devId: await bind(vm, opts) });
      infos.push(info.info.value as { capReg: bigint; ecapReg: bigint });
    }
    const SSADS = 1n << 45n;
    expect(infos[0].capReg).toBe(infos[1].capReg);
    expect(infos[0].ecapReg & SSADS).toBe(SSADS);
    expect(infos[1].ecapReg & SSADS).toBe(0n);
    expect(infos[0].ecapReg ^ infos[1].ecapReg).toBe(SSADS);
  });
});

describe("VT-d capabilities observable only through DMA are honoured (vtd.md §5, §1, §2)", () => {
  const regs = () => vtdRegs({ fiveLevel: false });

  it("SLLPS 2M and 1G: stage 2 maps with 2 MiB and 1 GiB leaves, so translations are cached at those sizes", async () => {
    const r = await regs();
    expect([r.cap.SLLPS & 1, r.cap.SLLPS & 2]).toEqual([1, 2]);
    const oneG = await createNestedVm(env.t, "sllps-1g", { hugePages: true, areas: [{ iova: 0n, userVa: 0n, length: GIB }] });
    await oneG.s1.map(0n, 0n, SZ_2M);
    await oneG.vm.translate({ devId: oneG.devId, iovas: [0x1234n] });
    // A 2 MiB stage-1 leaf over a 1 GiB stage-2 leaf: cached at 2 MiB, and the
    // stage-2 walks read 2 entries (PML4E, then the 1 GiB PDPE leaf).
    expect((await oneG.vm.dumpIotlb({ hwptId: oneG.nestedId })).entries.map((e) => e.pageSize)).toEqual([SZ_2M]);
    const twoM = await createNestedVm(env.t, "sllps-2m", { hugePages: true, areas: [{ iova: 0n, userVa: 0n, length: GIB / 2n }] });
    await twoM.s1.map(0x1000n, 0x600000n, SZ_4K);
    expect((await twoM.vm.translate({ devId: twoM.devId, iovas: [0x1000n] })).memoryReferences).toEqual([4 + 5 * 3]);
  });

  it("FL1GP: a 1 GiB first-stage leaf (PS in a PDPE) translates", async () => {
    const r = await regs();
    expect(r.cap.FL1GP).toBe(1);
    const v = await createNestedVm(env.t, "fl1gp", { guestBytes: 2n * GIB, hugePages: true, areas: [{ iova: 0n, userVa: 0n, length: 2n * GIB }] });
    await v.s1.map(SZ_1G, SZ_1G, SZ_1G);
    const res = await v.vm.translate({ devId: v.devId, iovas: [SZ_1G + 0x12345n] });
    expect(res.faults).toEqual([]);
    expect(res.addresses).toEqual([SZ_1G + 0x12345n]);
  });

  it("EAFS: with EAFE the walk sets the extended-accessed bit (bit 10) with A", async () => {
    const r = await regs();
    expect(r.ecap.EAFS).toBe(1);
    const v = await createNestedVm(env.t, "eafs", { eafe: true });
    await v.s1.map(0x1000n, 0x200000n, SZ_4K);
    await v.vm.translate({ devId: v.devId, iovas: [0x1000n] });
    expect((await v.s1.readEntry(0x1000n, 1)) & (FS_A | FS_EA)).toBe(FS_A | FS_EA);
  });

  it("C/SMPWC: walks are coherent with guest RAM — a not-present entry made present is seen without any invalidation", async () => {
    const r = await regs();
    expect([r.ecap.C, r.ecap.SMPWC]).toEqual([1, 1]);
    const v = await createNestedVm(env.t, "coherent");
    expect((await v.vm.translate({ devId: v.devId, iovas: [0x3000n] })).faults.map((f) => f.reasonName)).toEqual(["S1_NOT_PRESENT"]);
    await v.s1.map(0x3000n, 0x300000n, SZ_4K);
    expect((await v.vm.translate({ devId: v.devId, iovas: [0x3000n] })).addresses).toEqual([0x300000n]);
  });
});
