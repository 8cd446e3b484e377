import fc from "fast-check";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { IommufdError, type VmMethods } from "../../client/client.js";
import { IommuOption } from "../../gen/iommufd/v1/ioas_pb.js";
import { IommuModel } from "../../gen/iommufd/v1/vm_pb.js";
import {
  A,
  ADDR_51_12,
  D,
  EA,
  FAULT_NAME,
  type Outcome,
  P,
  PS,
  RefRam,
  RefStage2,
  RW,
  type Stage1Config,
  translateNested,
  translateStage2,
  US,
} from "../reference/reference-walker.js";
import { startTestServer, type TestServer } from "../helpers/server.js";
import { stats } from "./translate-helpers.js";

/**
 * Translate against the reference model (test/reference/reference-walker.ts,
 * written from vtd.md §1–§3) on random guest first-stage tables (4 KiB /
 * 2 MiB / 1 GiB leaves, random R/W, U/S, A/D and ignored bits, now and then
 * reserved bits, not-present entries, non-canonical IOVAs, tables in a
 * write-only or unmapped stage-2 area), random stage-2 maps (MapIoas /
 * UnmapIoas / remaps of random areas, HUGE_PAGES on or off, 4- or 5-level),
 * random stage-1 changes and Invalidates, and Translate batches (reads and
 * writes; the RID, PASID 9, and a stage-2-only device on the parent).
 *
 * Two properties:
 * - caches off (iotlb_entries 0, no paging-structure caches): every change is
 *   visible at once, so every access is compared, including its reference
 *   count against the (n+1)(m+1)-1 walk model (api.md Translate);
 * - caches on: a stage-1 change makes the IOVAs under the changed entry
 *   "dirty" until an Invalidate covers them, and dirty IOVAs are not
 *   compared. A leaf-only Invalidate does not clean a changed non-leaf entry
 *   (vtd.md §4.4: paging-structure caches may be kept); for a changed leaf,
 *   whatever part an Invalidate covered is clean (every IOTLB entry
 *   overlapping the range goes, §4.2). Turning a not-present entry present
 *   dirties nothing (§1.3: faults are never cached), and a stage-2 change
 *   needs no guest invalidation (the host drops the nested entries, §4.2).
 *   "cycle" operations aim at exactly that: cache a leaf, change it,
 *   invalidate (exactly, more, or a few pages inside it), access it again.
 *
 * Both check A/D bits in guest RAM (every entry of a translated walk has A —
 * and EA with EAFE — its leaf D for writes; no other bit ever changes),
 * DumpIotlb against the reference, and the GetStats totals.
 */

let t: TestServer;
beforeAll(async () => {
  t = await startTestServer();
});
afterAll(async () => {
  // TRANSLATE_PROP_STATS=1 prints what the runs exercised (outcome per kind of access).
  if (process.env.TRANSLATE_PROP_STATS) console.log([...coverage].sort().map(([k, v]) => `${k}: ${v}`).join("\n"));
  await t.close();
});

/** Outcome counts per (property, compared or dirty, device, reason, hit). */
const coverage = new Map<string, number>();
const count = (k: string) => coverage.set(k, (coverage.get(k) ?? 0) + 1);

const K4 = 1n << 12n;
const M2 = 1n << 21n;
const G1 = 1n << 30n;
const U64 = (1n << 64n) - 1n;
const RAM = 8n * G1;
/** Host addresses of the stage-1 table areas (above every data area's host range). */
const TA_HOST = 0x1_f000_0000n;
const TB_HOST = TA_HOST + M2;
const PWT = 1n << 3n;
const PCD = 1n << 4n;
const G = 1n << 8n;
const ZERO_PAGE = new Uint8Array(4096);

// ---------------------------------------------------------------------------
// Arbitraries

const pct = (p: number) => fc.integer({ min: 0, max: 99 }).map((x) => x < p);

interface Config {
  fiveLevel: boolean;
  s1Levels: 4 | 5;
  hugePages: boolean;
  caches: boolean;
  iotlbEntries: number;
  psc: boolean;
  eafe: boolean;
  /** GPA of the main table area (root and most tables). */
  taGpaSel: number;
  taWriteOnly: boolean;
  /** The second table area: mapped RW, write-only, or not mapped at all. */
  tbMode: "rw" | "wo" | "none";
  areas: AreaSpec[];
}

interface AreaSpec {
  slot: number;
  iovaPages: number;
  userSlot: number;
  userPages: number;
  lengthSel: number;
  writeOnly: boolean;
  mapAtStart: boolean;
}

const PAGE_OFFSETS = [0, 1, 2, 511, 512, 513, 1024, 262144];
const LENGTHS = [K4, 2n * K4, 16n * K4, M2, M2 + K4, 4n * M2, G1, G1 + M2];
/** Data GPA slots; the last two are only used in five-level VMs (GPA ≥ 2^48). */
const GPA_SLOTS = [0x4000_0000n, 0x8000_0000n, 0x2_0000_0000n, 0x3_4000_0000n, 0x7f_0000_0000n, 0xffff_0000_0000n, 0x1_0000_0000_0000n, 0xf_ff00_0000_0000n];
const USER_SLOTS = [0n, 0x4000_0000n, 0x8000_0000n, 0xc000_0000n, 0x1_0000_0000n];
const TA_GPAS = [0x20_0000n, 0x1000n, 0x1_2340_0000n, 0x7f_ffe0_0000n, 0x1_0000_0020_0000n];

const areaSpecArbFields = {
  slot: fc.nat(7),
  iovaPages: fc.constantFrom(...PAGE_OFFSETS),
  userSlot: fc.nat(USER_SLOTS.length - 1),
  userPages: fc.constantFrom(...PAGE_OFFSETS),
  lengthSel: fc.oneof({ weight: 6, arbitrary: fc.nat(5) }, { weight: 1, arbitrary: fc.constantFrom(6, 7) }),
  writeOnly: pct(12),
  mapAtStart: pct(75),
};
const areaSpecArb: fc.Arbitrary<AreaSpec> = fc.record(areaSpecArbFields);

function configArb(caches: boolean): fc.Arbitrary<Config> {
  return fc
    .record({
      fiveLevel: pct(30),
      s1Five: fc.boolean(),
      hugePages: pct(65),
      iotlbEntries: fc.constantFrom(4096, 8, 64),
      psc: fc.boolean(),
      eafe: pct(25),
      taGpaSel: fc.nat(TA_GPAS.length - 1),
      taWriteOnly: pct(2),
      tbMode: fc.constantFrom<Config["tbMode"]>("rw", "rw", "wo", "none"),
      // Area 0 (where the warm-up leaves point) is often 2 MiB-aligned on both sides and
      // at least 2 MiB long, so that 2 MiB stage-2 leaves and 2 MiB IOTLB entries occur.
      areas: fc
        .tuple(
          fc.oneof(
            areaSpecArb,
            fc.record({ ...areaSpecArbFields, iovaPages: fc.constantFrom(0, 512, 1024), userPages: fc.constantFrom(0, 512), lengthSel: fc.constantFrom(3, 4, 5) }),
          ),
          fc.array(areaSpecArb, { maxLength: 5 }),
        )
        .map(([first, rest]) => [first, ...rest]),
    })
    .map((c) => ({
      fiveLevel: c.fiveLevel,
      s1Levels: c.fiveLevel && c.s1Five ? 5 : 4,
      hugePages: c.hugePages,
      caches,
      iotlbEntries: caches ? c.iotlbEntries : 0,
      psc: caches && c.psc,
      eafe: c.eafe,
      // The GPA above 2^48 only exists with a 57-bit stage 2.
      taGpaSel: !c.fiveLevel && c.taGpaSel === 4 ? 0 : c.taGpaSel,
      taWriteOnly: c.taWriteOnly,
      tbMode: c.tbMode,
      // Area 0 is mapped readable and writable from the start: the warm-up leaves point into it.
      areas: c.areas.map((a, i) => ({ ...a, slot: !c.fiveLevel && a.slot >= 6 ? a.slot - 6 : a.slot, ...(i === 0 && { mapAtStart: true, writeOnly: false }) })),
    }));
}

/** IOVA bases: low, high-in-47-bits, canonical upper halves (48 and 57 bits), and non-canonical ones. */
const IOVA_BASES = [
  0n,
  0x4000_0000n,
  0x7f_ffe0_0000n,
  0x7fff_ffe0_0000n,
  0xffff_8000_0000_0000n,
  0x0000_8000_0000_0000n,
  0x00ff_ffff_ffe0_0000n,
  0xff00_0000_0000_0000n,
  0x0100_0000_0000_0000n,
];
const iovaArb = fc.record({
  base: fc.oneof({ weight: 12, arbitrary: fc.nat(4) }, { weight: 1, arbitrary: fc.nat(IOVA_BASES.length - 1) }),
  page: fc.constantFrom(0, 1, 2, 3, 511, 512, 513, 1023),
});
type IovaSel = { base: number; page: number };

const targetArb = fc.record({
  kind: fc.oneof({ weight: 12, arbitrary: fc.constant("data") }, { weight: 1, arbitrary: fc.constantFrom("table", "unmapped", "wide") }),
  sel: fc.nat(),
  pages: fc.constantFrom(0, 1, 3, 511, 512, 1024),
  misalign: pct(6),
});
type Target = { kind: string; sel: number; pages: number; misalign: boolean };

const bitsArb = fc.record({
  rw: pct(85),
  us: pct(94),
  present: pct(96),
  extra: fc.constantFrom(0n, 0n, 0n, A, A | D, G, PWT | PCD, (1n << 9n) | (1n << 11n), 0x7ffn << 52n, 1n << 63n, EA),
});
type Bits = { rw: boolean; us: boolean; present: boolean; extra: bigint };

type Inval = "none" | "leaf" | "full";
const invalArb = fc.constantFrom<Inval>("none", "leaf", "full", "full");

type Op =
  | { kind: "s1map"; iova: IovaSel; level: number; target: Target; bits: Bits; upper: Bits; inTb: boolean; inval: Inval }
  | { kind: "s1poke"; pick: number; level: number; mutation: string; target: Target; inval: Inval }
  | { kind: "s2map"; sel: number }
  | { kind: "s2unmap"; sel: number; how: "exact" | "partial" | "all" | "remap" }
  | { kind: "inval"; pick: number; how: "cover" | "inside" | "random" | "all"; leaf: boolean; pages: number }
  | { kind: "cycle"; pick: number; pasid: boolean; level: number; mutation: string; target: Target; leaf: boolean; before: number; after: number; tail: boolean; write: boolean }
  | { kind: "translate"; dev: "rid" | "pasid" | "s2"; picks: { sel: number; offset: bigint; raw: IovaSel | null }[]; write: boolean };

const opArb: fc.Arbitrary<Op> = fc.oneof(
  {
    weight: 6,
    arbitrary: fc.record({
      kind: fc.constant("s1map" as const),
      iova: iovaArb,
      level: fc.constantFrom(1, 1, 1, 2, 2, 3),
      target: targetArb,
      bits: bitsArb,
      upper: fc.record({ rw: pct(97), us: pct(98), present: fc.constant(true), extra: fc.constantFrom(0n, 0n, A, G, PWT) }),
      inTb: pct(15),
      inval: invalArb,
    }),
  },
  {
    weight: 3,
    arbitrary: fc.record({
      kind: fc.constant("s1poke" as const),
      pick: fc.oneof(fc.nat(2), fc.nat()),
      level: fc.integer({ min: 1, max: 5 }),
      mutation: fc.constantFrom("rw", "us", "p", "ps", "rsv", "retarget", "a"),
      target: targetArb,
      inval: invalArb,
    }),
  },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant("s2map" as const), sel: fc.nat() }) },
  {
    weight: 2,
    arbitrary: fc.record({
      kind: fc.constant("s2unmap" as const),
      sel: fc.nat(),
      how: fc.constantFrom<"exact" | "partial" | "all" | "remap">("exact", "exact", "exact", "remap", "remap", "partial", "partial", "all"),
    }),
  },
  {
    weight: 2,
    arbitrary: fc.record({
      kind: fc.constant("inval" as const),
      pick: fc.nat(),
      how: fc.constantFrom<"cover" | "inside" | "random" | "all">("cover", "cover", "inside", "inside", "random", "all"),
      leaf: fc.boolean(),
      pages: fc.constantFrom(1, 2, 3, 512, 1024),
    }),
  },
  {
    weight: 3,
    arbitrary: fc.record({
      kind: fc.constant("cycle" as const),
      pick: fc.nat(),
      pasid: fc.boolean(),
      level: fc.constantFrom(0, 0, 0, 0, 1, 2, 3, 4, 5),
      mutation: fc.constantFrom("rw", "us", "p", "ps", "rsv", "retarget", "retarget", "a"),
      target: targetArb,
      leaf: fc.boolean(),
      before: fc.constantFrom(0, 0, 1, 3),
      after: fc.constantFrom(0, 0, 1, 5),
      tail: pct(50),
      write: fc.boolean(),
    }),
  },
  {
    weight: 6,
    arbitrary: fc.record({
      kind: fc.constant("translate" as const),
      dev: fc.constantFrom<"rid" | "pasid" | "s2">("rid", "rid", "pasid", "s2"),
      picks: fc.array(
        fc.record({
          // Small selectors pick the first leaves again and again: repeats make IOTLB hits.
          sel: fc.oneof(fc.nat(2), fc.nat()),
          offset: fc.constantFrom(0n, 0n, 8n, 0xff8n, 0x1000n, 0x200000n),
          raw: fc.oneof({ weight: 1, arbitrary: iovaArb }, { weight: 5, arbitrary: fc.constant(null) }),
        }),
        { minLength: 1, maxLength: 8 },
      ),
      write: pct(40),
    }),
  },
);

// ---------------------------------------------------------------------------
// The scenario: a VM, the reference state next to it, and the checks

const hex = (v: bigint | number) => `0x${v.toString(16)}`;
const u64 = (v: bigint) => BigInt.asUintN(64, v);

interface TableNode {
  gpa: bigint;
  hpa: bigint;
  /** The level of the entries it holds. */
  level: number;
  children: Map<number, TableNode>;
}

/** A changed stage-1 entry not yet covered by an Invalidate: [base, base + span). */
interface Dirty {
  base: bigint;
  span: bigint;
  nonLeaf: boolean;
}

/** An IOAS area as MapIoas takes it. */
interface MapArgs {
  iova: bigint;
  userVa: bigint;
  length: bigint;
  readable: boolean;
  writeable: boolean;
}

/**
 * One run: a VM on the server and, next to it, the reference state — guest
 * RAM, the stage-2 areas, the tree of live stage-1 tables the generator
 * built, the pending (dirty) stage-1 changes, and the A/D bits walks were
 * allowed to set — plus every check.
 */
class Scenario {
  readonly ram = new RefRam(RAM);
  readonly s2: RefStage2;
  readonly s1: Stage1Config;
  readonly areaSpecs: MapArgs[];
  /** The main stage-1 table area (the root and most tables) and the second one. */
  readonly ta: MapArgs;
  readonly tb: MapArgs;
  vm!: VmMethods;
  ioasId = 0;
  devId = 0;
  s2DevId = 0;
  parentId = 0;
  nestedId = 0;
  root!: TableNode;
  private taNext = 0n;
  private tbNext = 0n;
  /** IOVAs the generator mapped leaves at (for translations to pick from). */
  readonly leaves: bigint[] = [];
  /** Per leaf: the offset inside it that lands on the targeted (likely mapped) GPA. */
  readonly hints: bigint[] = [];
  /** Output GPAs of recent successful nested translations. */
  recentGpas: bigint[] = [];
  dirty: Dirty[] = [];
  /** Per entry word: A/D bits a faulting or stale walk may have set. */
  readonly may = new Map<bigint, bigint>();
  readonly log: string[] = [];
  totals = { translations: 0, hits: 0, refs: 0, faults: 0, invalidations: 0 };

  constructor(
    readonly cfg: Config,
    readonly vmId: string,
  ) {
    this.s2 = new RefStage2(cfg.fiveLevel ? 5 : 4);
    const taGpa = TA_GPAS[cfg.taGpaSel];
    this.ta = { iova: taGpa, userVa: TA_HOST, length: M2, readable: !cfg.taWriteOnly, writeable: true };
    this.tb = { iova: taGpa + M2, userVa: TB_HOST, length: M2, readable: cfg.tbMode === "rw", writeable: true };
    this.s1 = { levels: cfg.s1Levels, root: taGpa, eafe: cfg.eafe };
    this.areaSpecs = cfg.areas.map((a) => ({
      iova: GPA_SLOTS[a.slot] + BigInt(a.iovaPages) * K4,
      userVa: USER_SLOTS[a.userSlot] + BigInt(a.userPages) * K4,
      length: LENGTHS[a.lengthSel],
      readable: !a.writeOnly,
      writeable: true,
    }));
  }

  get width(): bigint {
    return this.cfg.s1Levels === 5 ? 57n : 48n;
  }

  canonical(iova: bigint): boolean {
    const top = u64(iova) >> (this.width - 1n);
    return top === 0n || top === (1n << (65n - this.width)) - 1n;
  }

  /** The canonical IOVA with iova's translated bits. */
  canonicalize(iova: bigint): bigint {
    return u64(BigInt.asIntN(Number(this.width), iova));
  }

  isDirty(iova: bigint, size = 1n): boolean {
    if (!this.canonical(iova)) return false;
    const x = u64(iova);
    return this.dirty.some((d) => x < d.base + d.span && d.base < x + size);
  }

  // --- setup -------------------------------------------------------------

  async setup(): Promise<void> {
    const { cfg } = this;
    await t.client.createVm({
      vmId: this.vmId,
      model: IommuModel.INTEL_VTD,
      guestMemoryBytes: RAM,
      options: { iotlbEntries: cfg.iotlbEntries, pagingStructureCaches: cfg.psc, fiveLevel: cfg.fiveLevel },
    });
    this.vm = t.client.vm(this.vmId);
    this.ioasId = (await this.vm.allocIoas()).ioasId;
    await this.vm.setOption({ option: IommuOption.HUGE_PAGES, objectId: this.ioasId, value: cfg.hugePages ? 1n : 0n });
    await this.map(this.ta);
    if (cfg.tbMode !== "none") await this.map(this.tb);
    for (const [i, a] of cfg.areas.entries()) if (a.mapAtStart) await this.map(this.areaSpecs[i]);
    this.devId = (await this.vm.bindDevice({ name: "dev0", pasidCapable: true })).devId;
    this.s2DevId = (await this.vm.bindDevice({ name: "dev1" })).devId;
    this.parentId = (await this.vm.allocHwpt({ devId: this.devId, ptId: this.ioasId, nestParent: true })).hwptId;
    this.nestedId = (
      await this.vm.allocHwpt({
        devId: this.devId,
        ptId: this.parentId,
        pasid: true,
        data: { case: "vtdS1", value: { pgtblAddr: this.s1.root, addrWidth: cfg.s1Levels === 5 ? 57 : 48, eafe: cfg.eafe } },
      })
    ).hwptId;
    await this.vm.attachDevice({ devId: this.devId, ptId: this.nestedId });
    await this.vm.attachDevice({ devId: this.devId, ptId: this.nestedId, pasid: 9 });
    await this.vm.attachDevice({ devId: this.s2DevId, ptId: this.parentId });
    this.root = this.allocTable(this.cfg.s1Levels, false);
  }

  /** MapIoas, mirrored into the reference (which decides whether it must fail with EEXIST). */
  async map(a: MapArgs): Promise<void> {
    const overlaps = this.s2.overlaps(a.iova, a.length);
    const call = this.vm.mapIoas({ ioasId: this.ioasId, iova: a.iova, userVa: a.userVa, length: a.length, readable: a.readable, writeable: a.writeable });
    if (overlaps) {
      const e = await call.then(
        () => undefined,
        (err: unknown) => err,
      );
      expect(e, `MapIoas ${hex(a.iova)}+${hex(a.length)} overlaps an area`).toBeInstanceOf(IommufdError);
      expect((e as IommufdError).errno).toBe("EEXIST");
      return;
    }
    await call;
    this.s2.add({ ...a, hugePages: this.cfg.hugePages });
    this.log.push(`map ${hex(a.iova)}+${hex(a.length)} -> ${hex(a.userVa)} ${a.readable ? "r" : ""}w`);
  }

  async unmap(iova: bigint, length: bigint): Promise<void> {
    const before = [...this.s2.areas];
    const expected = this.s2.unmap(iova, length);
    const got = await this.vm.unmapIoas({ ioasId: this.ioasId, iova, length }).then(
      (r) => r.length,
      (e: unknown) => {
        expect(e).toBeInstanceOf(IommufdError);
        expect((e as IommufdError).errno, (e as Error).message).toBe("ENOENT");
        return undefined;
      },
    );
    expect(got, `UnmapIoas ${hex(iova)}+${hex(length)} over ${before.map((a) => `${hex(a.iova)}+${hex(a.length)}`).join(", ")}`).toBe(expected);
    this.log.push(`unmap ${hex(iova)}+${hex(length)} -> ${got === undefined ? "ENOENT" : hex(got)}`);
  }

  // --- guest stage-1 tables -----------------------------------------------

  allocTable(level: number, inTb: boolean): TableNode {
    const useTb = inTb && this.tbNext < M2;
    const offset = useTb ? this.tbNext : this.taNext;
    if (offset >= M2) throw new Error("table area exhausted");
    if (useTb) this.tbNext += K4;
    else this.taNext += K4;
    const area = useTb ? this.tb : this.ta;
    return { gpa: area.iova + offset, hpa: area.userVa + offset, level, children: new Map() };
  }

  /** Write one stage-1 entry of a reachable table, recording what the change may leave stale. */
  async writeEntry(node: TableNode, index: number, value: bigint, iova: bigint): Promise<void> {
    const hpa = node.hpa + BigInt(index) * 8n;
    const old = this.ram.read64(hpa);
    this.ram.write64(hpa, value);
    this.may.delete(hpa);
    const data = new Uint8Array(8);
    new DataView(data.buffer).setBigUint64(0, value, true);
    await this.vm.writeGuestMemory({ gpa: hpa, data });
    if (this.cfg.caches && (old & P) !== 0n && old !== value) {
      const span = 1n << BigInt(12 + 9 * (node.level - 1));
      const base = this.canonicalize(iova) & ~(span - 1n);
      const nonLeaf = node.level >= 4 || (node.level >= 2 && (old & PS) === 0n);
      this.dirty.push({ base, span, nonLeaf });
    }
  }

  /** The table holding iova's level-`level` entry, creating (and linking) tables on the way. */
  async tableFor(iova: bigint, level: number, upper: Bits, inTb: boolean): Promise<TableNode> {
    let node = this.root;
    for (let l = this.cfg.s1Levels; l > level; l--) {
      const index = Number((u64(iova) >> BigInt(12 + 9 * (l - 1))) & 511n);
      let child = node.children.get(index);
      if (child === undefined) {
        child = this.allocTable(l - 1, inTb);
        const value = child.gpa | P | (upper.rw ? RW : 0n) | (upper.us ? US : 0n) | upper.extra;
        await this.writeEntry(node, index, value, iova);
        node.children.set(index, child);
      }
      node = child;
    }
    return node;
  }

  /**
   * A GPA for a leaf of `size` to point at (or for a non-leaf entry when
   * `forTable`). `hint` is the offset inside the leaf of the page that was
   * aimed at (a large leaf is aligned down, so most of it may be unmapped).
   */
  target(target: Target, size: bigint, forTable: boolean): { gpa: bigint; hint: bigint } {
    let gpa: bigint;
    switch (target.kind) {
      case "table":
        // Data pointing into the table areas; never used as a table itself
        // (a stale walk through it could touch live tables the model does not track).
        gpa = forTable || size !== K4 ? 0x3000_0000n : (target.sel % 2 === 0 ? this.ta.iova : this.tb.iova) + BigInt(target.pages % 512) * K4;
        break;
      case "unmapped":
        gpa = 0x3000_0000n + BigInt(target.pages) * K4;
        break;
      case "wide":
        gpa = (1n << 48n) | (BigInt(target.pages) * K4);
        break;
      default: {
        const a = this.areaSpecs[target.sel % this.areaSpecs.length];
        gpa = a.iova + ((BigInt(target.pages) * K4) % a.length);
      }
    }
    const aimed = gpa;
    if (!target.misalign || forTable) gpa &= ~(size - 1n);
    return { gpa: gpa & ADDR_51_12, hint: (aimed - gpa) & (size - 1n) };
  }

  targetGpa(target: Target, size: bigint, forTable: boolean): bigint {
    return this.target(target, size, forTable).gpa;
  }

  iovaOf(sel: IovaSel): bigint {
    return u64(IOVA_BASES[sel.base] + BigInt(sel.page) * K4);
  }

  async s1map(op: Extract<Op, { kind: "s1map" }>): Promise<void> {
    const level = op.level;
    const size = 1n << BigInt(12 + 9 * (level - 1));
    const iova = this.iovaOf(op.iova) & ~(size - 1n);
    const node = await this.tableFor(iova, level, op.upper, op.inTb);
    const index = Number((iova >> BigInt(12 + 9 * (level - 1))) & 511n);
    node.children.delete(index); // a leaf replaces whatever table hung here
    const b = op.bits;
    const { gpa, hint } = this.target(op.target, size, false);
    const value = gpa | (b.present ? P : 0n) | (b.rw ? RW : 0n) | (b.us ? US : 0n) | (level > 1 ? PS : 0n) | b.extra;
    await this.writeEntry(node, index, value, iova);
    this.leaves.push(iova);
    this.hints.push(hint);
    this.log.push(`s1map L${level} ${hex(iova)} = ${hex(value)}`);
    await this.afterChange(iova, level, op.inval);
  }

  async s1poke(op: Extract<Op, { kind: "s1poke" }>): Promise<void> {
    if (this.leaves.length === 0) return;
    const iova = this.leaves[op.pick % this.leaves.length];
    const level = Math.min(op.level, this.cfg.s1Levels);
    if (await this.poke(iova, level, op.mutation, op.target)) await this.afterChange(iova, level, op.inval);
  }

  /** Change the level-`level` entry on iova's path, if its table exists; true if it did. */
  async poke(iova: bigint, level: number, mutation: string, target: Target): Promise<boolean> {
    let node = this.root;
    for (let l = this.cfg.s1Levels; l > level; l--) {
      const child = node.children.get(Number((iova >> BigInt(12 + 9 * (l - 1))) & 511n));
      if (child === undefined) return false;
      node = child;
    }
    const index = Number((iova >> BigInt(12 + 9 * (level - 1))) & 511n);
    const old = this.ram.read64(node.hpa + BigInt(index) * 8n);
    let value = old;
    let keepsChild = false;
    switch (mutation) {
      case "rw":
        value ^= RW;
        keepsChild = true;
        break;
      case "us":
        value ^= US;
        keepsChild = true;
        break;
      case "a":
        value &= ~(A | D | EA);
        keepsChild = true;
        break;
      case "p":
        value ^= P;
        break;
      case "ps":
        value ^= PS;
        // A cleared PS turns a leaf into a pointer: to a non-table GPA only.
        if ((value & PS) === 0n && level > 1) value = (value & ~ADDR_51_12) | this.targetGpa({ ...target, kind: "unmapped" }, K4, true);
        break;
      case "rsv":
        value |= level >= 4 ? PS : level === 1 ? 1n << 48n : 1n << 13n;
        break;
      default: {
        const isLeaf = level === 1 || (level <= 3 && (old & PS) !== 0n);
        const size = 1n << BigInt(12 + 9 * (level - 1));
        value = (value & ~ADDR_51_12) | this.targetGpa(target, isLeaf ? size : K4, !isLeaf);
      }
    }
    if (!keepsChild) node.children.delete(index);
    await this.writeEntry(node, index, value, iova);
    this.log.push(`s1poke L${level} ${hex(iova)} ${mutation}: ${hex(old)} -> ${hex(value)}`);
    return true;
  }

  /**
   * Cache a leaf (and its neighbour), write it if asked (first write of a
   * clean entry), change an entry on its path, invalidate a range covering
   * the change (with `before`/`after` extra pages), and access it again.
   */
  async cycle(op: Extract<Op, { kind: "cycle" }>, step: number): Promise<void> {
    if (this.leaves.length === 0) return;
    const i = op.pick % Math.min(this.leaves.length, 3);
    const x = u64(this.leaves[i] + this.hints[i]);
    const access = async (iovas: bigint[], write: boolean) =>
      this.translate({ kind: "translate", dev: op.pasid ? "pasid" : "rid", picks: [], write }, step, iovas);
    await access([x, u64(x + K4), x], false);
    if (op.write) await access([x], true);
    // Level 0 (and always for a tail invalidation): the leaf on x's path.
    let level = op.tail ? 0 : Math.min(op.level, this.cfg.s1Levels);
    if (level === 0) {
      level = this.cfg.s1Levels;
      for (let node = this.root; level > 1; level--) {
        const child = node.children.get(Number((x >> BigInt(12 + 9 * (level - 1))) & 511n));
        if (child === undefined) break;
        node = child;
      }
    }
    if (!(await this.poke(x, level, op.mutation, op.target))) return;
    const span = 1n << BigInt(12 + 9 * (level - 1));
    const base = this.canonicalize(x) & ~(span - 1n);
    const after = [x, u64(x + K4), x, u64(base + span - K4)];
    if (op.tail && span > 4n * K4) {
      // A few pages inside the span: only they are clean afterwards, and an
      // entry cached for the whole (large) leaf starts before them (the PSI
      // rounding of vtd.md §4.3 keeps such a small range inside the leaf).
      const skip = BigInt(2 + 2 * (op.before % 2)) * K4;
      await this.invalidate(u64(base + skip), BigInt(1 + (op.after % 2)), op.leaf);
      after.push(u64(base + skip));
    } else {
      const before = BigInt(op.before);
      await this.invalidate(u64(base - before * K4), (span >> 12n) + before + BigInt(op.after), op.leaf && level === 1);
    }
    await access(after, op.write);
  }

  async afterChange(iova: bigint, level: number, inval: Inval): Promise<void> {
    if (inval === "none") return;
    const span = 1n << BigInt(12 + 9 * (level - 1));
    const base = this.canonicalize(iova) & ~(span - 1n);
    await this.invalidate(base, span >> 12n, inval === "leaf");
  }

  /** Invalidate on the nested HWPT; clears the dirty records it covers. */
  async invalidate(addr: bigint, npages: bigint, leaf: boolean): Promise<void> {
    const r = await this.vm.invalidate({ hwptId: this.nestedId, requests: { case: "vtdS1", value: { entries: [{ addr, npages, leaf }] } } });
    expect(r.entriesHandled).toBe(1);
    this.totals.invalidations++;
    const all = addr === 0n && npages === U64;
    const end = addr + npages * K4;
    const left: Dirty[] = [];
    for (const d of this.dirty) {
      const covered = all || (addr <= d.base && d.base + d.span <= end);
      if (covered && (!d.nonLeaf || !leaf)) continue;
      if (d.nonLeaf || all || end <= d.base || d.base + d.span <= addr) {
        left.push(d);
        continue;
      }
      // A leaf change is clean wherever an Invalidate covered it: every
      // IOTLB entry overlapping the range is dropped (vtd.md §4.2, type 6 G=11).
      if (d.base < addr) left.push({ base: d.base, span: addr - d.base, nonLeaf: false });
      if (end < d.base + d.span) left.push({ base: end, span: d.base + d.span - end, nonLeaf: false });
    }
    this.dirty = left;
    this.log.push(`invalidate ${hex(addr)}+${npages} pages${leaf ? " leaf" : ""}`);
  }

  async inval(op: Extract<Op, { kind: "inval" }>): Promise<void> {
    if (op.how === "all" || this.leaves.length === 0) return this.invalidate(0n, U64, op.leaf);
    const iova = this.canonicalize(this.leaves[op.pick % this.leaves.length]);
    if (op.how === "cover") {
      const d = this.dirty.length > 0 ? this.dirty[op.pick % this.dirty.length] : { base: iova & ~(M2 - 1n), span: M2 };
      return this.invalidate(d.base, d.span >> 12n, op.leaf);
    }
    if (op.how === "inside" && this.dirty.length > 0) {
      const d = this.dirty[op.pick % this.dirty.length];
      const first = d.base + ((BigInt(op.pick) * K4) % d.span);
      return this.invalidate(first, BigInt(op.pages), op.leaf);
    }
    const pages = BigInt(op.pages);
    return this.invalidate(iova & ~(K4 - 1n), pages, op.leaf);
  }

  // --- stage 2 ------------------------------------------------------------

  async s2map(op: Extract<Op, { kind: "s2map" }>): Promise<void> {
    // The root's area first when it is gone: without it every nested access faults 0x73.
    if (!this.s2.areas.some((x) => x.iova === this.ta.iova) && op.sel % 2 === 0) return this.map(this.ta);
    const choices = [...this.areaSpecs, this.ta, ...(this.cfg.tbMode === "none" ? [] : [this.tb])];
    const a = choices[op.sel % choices.length];
    if (this.s2.areas.some((x) => x.iova === a.iova && x.length === a.length)) return;
    await this.map(a);
  }

  async s2unmap(op: Extract<Op, { kind: "s2unmap" }>): Promise<void> {
    if (op.how === "all") return this.unmap(0n, U64);
    const areas = this.s2.areas;
    if (areas.length === 0) return;
    // Data areas far more often than the table areas.
    const data = areas.filter((a) => a.userVa < TA_HOST);
    const pool = data.length > 0 && op.sel % 16 !== 0 ? data : areas;
    // Half the time the area behind a recent nested translation: its cached
    // combined entries must go (the host flushes nested entries on a stage-2 change).
    const recent = this.recentGpas.length > 0 && op.sel % 4 !== 0 ? this.recentGpas[op.sel % this.recentGpas.length] : undefined;
    const a = areas.find((x) => recent !== undefined && x.iova <= recent && recent < x.iova + x.length) ?? pool[op.sel % pool.length];
    if (op.how === "exact") return this.unmap(a.iova, a.length);
    if (op.how === "remap") {
      // The same GPAs onto other host memory: cached translations must not survive.
      await this.unmap(a.iova, a.length);
      if (a.userVa >= TA_HOST) return; // the table areas only ever come back where they were
      const moved = { iova: a.iova, userVa: (a.userVa + BigInt(1 + (op.sel % 3)) * M2) % (4n * G1), length: a.length, readable: a.readable, writeable: a.writeable };
      this.areaSpecs.push(moved);
      return this.map(moved);
    }
    return this.unmap(a.iova, a.length > K4 ? a.length - K4 : 2n * K4);
  }

  // --- translation and checks ---------------------------------------------

  pickIova(p: { sel: number; offset: bigint; raw: IovaSel | null }, s2only: boolean): bigint {
    if (s2only) {
      if (p.raw !== null) return u64(p.raw.page % 2 === 0 ? (1n << this.s2.width) + BigInt(p.raw.page) * K4 : 0x3000_0000n + BigInt(p.raw.page) * K4);
      const a = this.areaSpecs[p.sel % this.areaSpecs.length];
      return a.iova + ((p.offset + BigInt(p.sel % 7) * K4) % a.length);
    }
    if (p.raw !== null || this.leaves.length === 0) return this.iovaOf(p.raw ?? { base: 0, page: 0 });
    const i = p.sel % this.leaves.length;
    return u64(this.leaves[i] + this.hints[i] + p.offset);
  }

  async translate(op: Extract<Op, { kind: "translate" }>, step: number, explicit?: bigint[]): Promise<void> {
    const s2only = op.dev === "s2";
    const iovas = explicit ?? op.picks.map((p) => this.pickIova(p, s2only));
    const pasid = op.dev === "pasid" ? 9 : undefined;
    const r = await this.vm.translate({ devId: s2only ? this.s2DevId : this.devId, pasid, iovas, write: op.write });
    this.log.push(`translate ${op.dev} ${op.write ? "write" : "read"} [${iovas.map(hex).join(", ")}]`);
    this.totals.translations += iovas.length;
    this.totals.hits += r.iotlbHits;
    this.totals.refs += r.memoryReferences.reduce((a, b) => a + b, 0);
    this.totals.faults += r.faults.length;
    const faultAt = new Map(r.faults.map((f) => [f.index, f]));
    let hitsSeen = 0;
    for (const [i, iova] of iovas.entries()) {
      const ref = s2only ? translateStage2(this.s2, iova, op.write) : translateNested(this.ram, this.s2, this.s1, iova, op.write);
      const f = faultAt.get(i);
      const refs = r.memoryReferences[i];
      if (f === undefined && refs === 0) hitsSeen++;
      const dirty = !s2only && this.isDirty(iova);
      const where = `step ${step}, access ${i}: ${s2only ? "stage-2-only" : op.dev} ${op.write ? "write" : "read"} of ${hex(iova)}`;
      count(`${this.cfg.caches ? "caches" : "no caches"}: ${dirty ? "dirty" : "compared"} ${s2only ? "stage-2-only" : "nested"} ${ref.fault ? hex(ref.fault) : "ok"}${refs === 0 && !f ? " hit" : ""}`);
      if (!dirty) {
        const got = { fault: f === undefined ? "none" : hex(f.reason), name: f?.reasonName, address: hex(r.addresses[i]) };
        const want = { fault: ref.fault === 0 ? "none" : hex(ref.fault), name: ref.fault === 0 ? undefined : FAULT_NAME.get(ref.fault), address: hex(ref.address) };
        expect(got, this.explain(where)).toEqual(want);
        if (f !== undefined) expect(f.iova).toBe(iova);
        if (this.cfg.caches) {
          expect(refs, `${where}: references`).toBeLessThanOrEqual(ref.refsMax);
        } else {
          expect(refs, `${where}: references`).toBeGreaterThanOrEqual(ref.refsMin);
          expect(refs, `${where}: references`).toBeLessThanOrEqual(ref.refsMax);
        }
      }
      this.applyAd(ref, op.write, dirty);
      if (ref.gpa !== undefined && ref.fault === 0) this.recentGpas = [ref.gpa, ...this.recentGpas.slice(0, 7)];
    }
    expect(r.iotlbHits, "iotlb_hits counts the accesses answered without a walk").toBe(hitsSeen);
    if (!this.cfg.caches) expect(r.iotlbHits).toBe(0);
    await this.checkTables(step);
    await this.checkIotlb(step);
  }

  /** Record the A/D bits the reference walk sets: required after a clean translation, allowed otherwise. */
  applyAd(ref: Outcome, write: boolean, dirty: boolean): void {
    if (ref.fault === 0 && !dirty) {
      for (const u of ref.updates) this.ram.write64(u.hpa, this.ram.read64(u.hpa) | u.bits);
      return;
    }
    for (const hpa of ref.read) this.may.set(hpa, (this.may.get(hpa) ?? 0n) | A | EA | (write ? D : 0n));
    if (ref.fault === 0) for (const u of ref.updates) this.may.set(u.hpa, (this.may.get(u.hpa) ?? 0n) | u.bits);
  }

  /** Every entry of every live table: the server set exactly the required A/D bits, plus allowed ones. */
  async checkTables(step: number): Promise<void> {
    const tables: TableNode[] = [];
    const collect = (n: TableNode) => {
      tables.push(n);
      for (const c of n.children.values()) collect(c);
    };
    collect(this.root);
    for (const [base, used] of [
      [TA_HOST, this.taNext],
      [TB_HOST, this.tbNext],
    ] as const) {
      if (used === 0n) continue;
      const { data } = await this.vm.readGuestMemory({ gpa: base, length: Number(used) });
      const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
      for (const n of tables) {
        if (n.hpa < base || n.hpa >= base + used) continue;
        const off = Number(n.hpa - base);
        const serverPage = data.subarray(off, off + 4096);
        const modelPage = this.ram.pageBytes(n.hpa) ?? ZERO_PAGE;
        if (Buffer.compare(serverPage, modelPage) === 0) continue;
        for (let i = 0; i < 512; i++) {
          const hpa = n.hpa + BigInt(i) * 8n;
          const server = view.getBigUint64(off + i * 8, true);
          const model = this.ram.read64(hpa);
          if (server === model) continue;
          const may = this.may.get(hpa) ?? 0n;
          const where = `step ${step}: stage-1 entry at host ${hex(hpa)} (L${n.level}[${i}])`;
          expect(hex(model & ~server), this.explain(`${where}: bits the walk must have set (or the guest wrote) are missing; server ${hex(server)}, model ${hex(model)}`)).toBe("0x0");
          expect(hex(server & ~model & ~may), this.explain(`${where}: bits set that no walk may set; server ${hex(server)}, model ${hex(model)}`)).toBe("0x0");
          this.ram.write64(hpa, server);
        }
      }
    }
    this.may.clear();
  }

  /** DumpIotlb entries agree with the reference (caches off: nothing cached). */
  async checkIotlb(step: number): Promise<void> {
    const nested = (await this.vm.dumpIotlb({ hwptId: this.nestedId })).entries;
    const parent = (await this.vm.dumpIotlb({ hwptId: this.parentId })).entries;
    if (!this.cfg.caches) {
      expect(nested.length + parent.length).toBe(0);
      return;
    }
    expect(nested.length + parent.length).toBeLessThanOrEqual(this.cfg.iotlbEntries);
    for (const [list, s2only] of [
      [nested, false],
      [parent, true],
    ] as const) {
      for (const e of list) {
        expect(e.pasid === undefined || e.pasid === 9, "pasid is 9 or unset").toBe(true);
        if (!s2only && this.isDirty(e.iova, e.pageSize)) continue;
        const read = s2only ? translateStage2(this.s2, e.iova, false) : translateNested(this.ram, this.s2, this.s1, e.iova, false);
        const write = s2only ? translateStage2(this.s2, e.iova, true) : translateNested(this.ram, this.s2, this.s1, e.iova, true);
        const ok = read.fault === 0 ? read : write;
        const where = `step ${step}: IOTLB entry ${hex(e.iova)} size ${hex(e.pageSize)} -> ${hex(e.address)} ${e.readable ? "r" : "-"}${e.writeable ? "w" : "-"}${s2only ? " (stage-2 only)" : ""}`;
        expect(ok.fault, this.explain(`${where}: the reference faults ${hex(read.fault)} / ${hex(write.fault)}`)).toBe(0);
        expect({ address: hex(e.address), pageSize: hex(e.pageSize), readable: e.readable, writeable: e.writeable }, this.explain(where)).toEqual({
          address: hex(ok.address),
          pageSize: hex(ok.pageSize),
          readable: read.fault === 0,
          writeable: write.fault === 0,
        });
      }
    }
  }

  async checkStats(): Promise<void> {
    const nested = (await this.vm.dumpIotlb({ hwptId: this.nestedId })).entries.length;
    const parent = (await this.vm.dumpIotlb({ hwptId: this.parentId })).entries.length;
    expect(await stats(this.vm)).toEqual({
      translations: this.totals.translations,
      iotlbHits: this.totals.hits,
      iotlbMisses: this.totals.translations - this.totals.hits,
      memoryReferences: this.totals.refs,
      faults: this.totals.faults,
      invalidationEntries: this.totals.invalidations,
      iotlbEntries: nested + parent,
    });
  }

  explain(what: string): string {
    return `${what}\nconfig: ${JSON.stringify(this.cfg, (_k, v) => (typeof v === "bigint" ? hex(v) : v))}\nhistory:\n  ${this.log.slice(-25).join("\n  ")}`;
  }

  async destroy(): Promise<void> {
    await t.client.destroyVm({ vmId: this.vmId }).catch(() => undefined);
  }
}

let vmSeq = 0;

async function runScenario(cfg: Config, ops: Op[]): Promise<void> {
  const sc = new Scenario(cfg, `prop-${cfg.caches ? "c" : "n"}-${++vmSeq}`);
  try {
    await sc.setup();
    for (const [step, op] of ops.entries()) {
      switch (op.kind) {
        case "s1map":
          await sc.s1map(op);
          break;
        case "s1poke":
          await sc.s1poke(op);
          break;
        case "s2map":
          await sc.s2map(op);
          break;
        case "s2unmap":
          await sc.s2unmap(op);
          break;
        case "inval":
          await sc.inval(op);
          break;
        case "translate":
          await sc.translate(op, step);
          break;
        case "cycle":
          await sc.cycle(op, step);
          break;
      }
    }
    // A final pass over every leaf, after invalidating everything.
    await sc.invalidate(0n, U64, false);
    expect(sc.dirty).toEqual([]);
    const picks = sc.leaves.slice(0, 16).map((_, sel) => ({ sel, offset: 0x10n, raw: null }));
    if (picks.length > 0) {
      await sc.translate({ kind: "translate", dev: "rid", picks, write: false }, ops.length);
      await sc.translate({ kind: "translate", dev: "pasid", picks, write: true }, ops.length + 1);
    }
    await sc.checkStats();
  } finally {
    await sc.destroy();
  }
}

/**
 * Every run starts with three well-formed leaves into area 0 (the first
 * leaves, which translations and changes pick most often), so that plenty of
 * accesses translate, get cached, and are then changed and invalidated.
 */
const GOOD: Bits = { rw: true, us: true, present: true, extra: 0n };
const warmUpArb: fc.Arbitrary<Op> = fc.record({
  kind: fc.constant("s1map" as const),
  iova: fc.record({ base: fc.nat(3), page: fc.constantFrom(0, 1, 2, 3, 511, 512, 513, 1023) }),
  level: fc.constantFrom(1, 1, 2, 2, 3),
  target: fc.record({ kind: fc.constant("data"), sel: fc.constant(0), pages: fc.constantFrom(0, 1, 3, 511, 512, 1024), misalign: fc.constant(false) }),
  bits: fc.constant(GOOD),
  upper: fc.constant(GOOD),
  inTb: fc.constant(false),
  inval: fc.constant<Inval>("none"),
});
/**
 * 80 runs per property (about 3–5 s each). endOnFailure: the failure message
 * carries the last operations, the config and the seed; no shrinking (every
 * shrink step is a fresh VM). Replay one with TRANSLATE_PROP_SEED=<seed>
 * TRANSLATE_PROP_PATH=<path> from the report.
 */
const RUNS = { numRuns: Number(process.env.TRANSLATE_PROP_RUNS ?? 80), endOnFailure: true };
const REPLAY = process.env.TRANSLATE_PROP_SEED ? { seed: Number(process.env.TRANSLATE_PROP_SEED), path: process.env.TRANSLATE_PROP_PATH } : {};

const opsArb = fc.tuple(fc.array(warmUpArb, { minLength: 3, maxLength: 3 }), fc.array(opArb, { minLength: 5, maxLength: 40 })).map(([warm, ops]) => [...warm, ...ops]);

describe("Translate agrees with the reference model of vtd.md §1–§3", () => {
  it("caches disabled (iotlb_entries 0, no paging-structure caches): every access, fault and reference count matches at once", async () => {
    await fc.assert(
      fc.asyncProperty(configArb(false), opsArb, (cfg, ops) => runScenario(cfg, ops)),
      { ...RUNS, ...REPLAY },
    );
  }, 90_000);

  it("caches enabled: accesses not under a pending stage-1 change match; Invalidate, stage-2 unmap and IOTLB replacement keep it so", async () => {
    await fc.assert(
      fc.asyncProperty(configArb(true), opsArb, (cfg, ops) => runScenario(cfg, ops)),
      { ...RUNS, ...REPLAY },
    );
  }, 90_000);
});
