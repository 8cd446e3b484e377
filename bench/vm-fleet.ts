import type { IommufdClient, VmMethods } from "../client/client.js";
import { SZ_2M, SZ_4K, Stage1PageTable } from "../client/pagetable.js";
import type { TranslateResponse } from "../gen/iommufd/v1/dma_pb.js";
import { IommuModel } from "../gen/iommufd/v1/vm_pb.js";

/**
 * A fleet of VMs built over gRPC the way a VMM builds them, for the soak run
 * and the scale_vms benchmark, with per-RPC latency bookkeeping and the
 * expected result of every Translate (so that the load checks what it gets).
 *
 * Per VM: 1 GiB of sparse guest RAM, one IOAS, `devices` devices, one nest
 * parent and one nested HWPT per device, each device attached to its own.
 *
 * - INTEL_VTD: the IOAS maps the whole 1 GiB at IOVA 0 (identity stage 2).
 *   Each device has its own first-stage table (client/pagetable.ts) in guest
 *   RAM: `pages` 4 KiB leaves from S1_IOVA and one 2 MiB leaf at S1_HUGE_IOVA.
 * - MOCK (the kernel selftest driver): a selftest nested HWPT over a nest
 *   parent. Its paging table is a Map entry per 2 KiB page (mock-driver.ts),
 *   so only MOCK_MAP_BYTES of the 1 GiB are mapped, at the aperture start.
 */

export const GIB = 1n << 30n;

// VT-d layout (GPAs and IOVAs).
const S1_TABLES_AT = 0x100000n; // stage-1 tables of device d at S1_TABLES_AT + d * S1_TABLE_BYTES
const S1_TABLE_BYTES = 0x40000n;
const S1_IOVA = 0x10000000n; // first 4 KiB stage-1 page
const S1_HUGE_IOVA = 0x20000000n; // the 2 MiB stage-1 leaf
const DATA_AT = 0x1000000n; // 4 KiB leaves of device d point into [DATA_AT + d MiB, + 1 MiB)
const ALT_OFFSET = 0x80000n; // a remapped leaf moves to the other half of that MiB
const HUGE_DATA_AT = 0x4000000n; // 2 MiB leaf of device d: HUGE_DATA_AT + d * 2 MiB
/** An IOVA window outside the identity map for Map/Unmap cycles (VT-d). */
export const VTD_EXTRA_IOVA = 0x100000000n;
export const VTD_EXTRA_BYTES = SZ_2M;

// MOCK layout.
const MOCK_IOVA = 0x1000000n; // MOCK_APERTURE start
export const MOCK_MAP_BYTES = 16n << 20n;
export const MOCK_EXTRA_IOVA = 0x4000000n;
export const MOCK_EXTRA_BYTES = 0x10000n;

/** Per-kind latency histogram: 2% log bins from 1 µs, constant memory however long the run. */
export class Latency {
  private static readonly LOG_GROWTH = Math.log(1.02);
  private readonly bins = new Float64Array(1300); // up to ~1.5e11 µs
  count = 0;
  sumMs = 0;
  maxMs = 0;

  record(ms: number): void {
    const us = Math.max(1, ms * 1000);
    this.bins[Math.min(this.bins.length - 1, Math.ceil(Math.log(us) / Latency.LOG_GROWTH))]++;
    this.count++;
    this.sumMs += ms;
    if (ms > this.maxMs) this.maxMs = ms;
  }

  /** The p-quantile in ms (upper edge of its bin: at most 2% high). */
  quantile(p: number): number {
    if (this.count === 0) return 0;
    const rank = Math.max(1, Math.ceil(p * this.count));
    let seen = 0;
    for (let i = 0; i < this.bins.length; i++) {
      seen += this.bins[i];
      if (seen >= rank) return Math.min(this.maxMs, Math.exp(i * Latency.LOG_GROWTH) / 1000);
    }
    return this.maxMs;
  }
}

/** Latencies by kind (RPC name, or "metrics_scrape"). */
export class LatencyBook {
  readonly kinds = new Map<string, Latency>();

  record(kind: string, ms: number): void {
    let l = this.kinds.get(kind);
    if (l === undefined) {
      l = new Latency();
      this.kinds.set(kind, l);
    }
    l.record(ms);
  }

  async time<T>(kind: string, fn: () => Promise<T>): Promise<T> {
    const t0 = performance.now();
    const out = await fn();
    this.record(kind, performance.now() - t0);
    return out;
  }

  rows(): { kind: string; count: number; p50: number; p99: number; max: number; mean: number }[] {
    return [...this.kinds]
      .map(([kind, l]) => ({ kind, count: l.count, p50: l.quantile(0.5), p99: l.quantile(0.99), max: l.maxMs, mean: l.sumMs / Math.max(1, l.count) }))
      .sort((a, b) => a.kind.localeCompare(b.kind));
  }
}

/** The VM's RPCs, each timed into `book` under its method name (successful calls only). */
export function timedVm(vm: VmMethods, book: LatencyBook): VmMethods {
  return new Proxy(vm, {
    get(target, name: string) {
      const f = (target as unknown as Record<string, (...a: unknown[]) => unknown>)[name];
      if (typeof f !== "function") return f;
      return (...args: unknown[]) => book.time(name, () => f(...args) as Promise<unknown>);
    },
  });
}

/**
 * WriteGuestMemory through a write-combining buffer while `buffering`: the
 * 8-byte entry writes of Stage1PageTable land in whole-page images that
 * flush() sends one 4 KiB write per table. Only for fresh table pages (the
 * image starts at zero); with buffering off, writes go straight through.
 */
class CoalescingVm {
  buffering = true;
  private readonly pages = new Map<bigint, Uint8Array>();
  readonly vm: VmMethods;

  constructor(private readonly inner: VmMethods) {
    this.vm = new Proxy(inner, {
      get: (target, name: string) => {
        if (name !== "writeGuestMemory") return (target as unknown as Record<string, unknown>)[name];
        return (req: { gpa: bigint; data: Uint8Array }) => {
          if (!this.buffering) return target.writeGuestMemory(req);
          const base = req.gpa & ~0xfffn;
          const offset = Number(req.gpa - base);
          if (offset + req.data.length > 4096) throw new Error("coalesced write crosses a page");
          let page = this.pages.get(base);
          if (page === undefined) {
            page = new Uint8Array(4096);
            this.pages.set(base, page);
          }
          page.set(req.data, offset);
          return Promise.resolve({});
        };
      },
    });
  }

  async flush(): Promise<void> {
    for (const [gpa, data] of this.pages) await this.inner.writeGuestMemory({ gpa, data });
    this.pages.clear();
    this.buffering = false;
  }
}

export type Attachment = "nested" | "parent" | "none";

export interface FleetDevice {
  readonly index: number;
  readonly devId: number;
  nestedId: number;
  /** VT-d: the device's first-stage table (writes through FleetVm.vm as it is at the time). */
  readonly s1?: Stage1PageTable;
  /** VT-d: the GPA each 4 KiB stage-1 page maps now. */
  readonly pageGpa: bigint[];
  attached: Attachment;
}

export interface FleetVm {
  readonly vmId: string;
  readonly model: "vtd" | "mock";
  ioasId: number;
  parentId: number;
  readonly devices: FleetDevice[];
  /** Timed, vm_id-bound RPCs of the client that built it (any client may be swapped in). */
  vm: VmMethods;
  /** One operation at a time per VM, so that each can check exact results. */
  busy: boolean;
  /** GetStats translations last seen (monotonic, also across export/import). */
  translationsSeen: bigint;
}

export interface BuildOptions {
  model: "vtd" | "mock";
  devices: number;
  /** VT-d: 4 KiB stage-1 leaves per device. */
  pages: number;
  /** VT-d paging-structure caches. */
  pagingStructureCaches: boolean;
  /** Build stage-1 tables with one 4 KiB WriteGuestMemory per table (else one per entry). */
  coalesce: boolean;
}

const deviceName = (d: number) => `0000:00:${(4 + d).toString(16).padStart(2, "0")}.0`;

/**
 * A VmMethods that forwards every call to `holder.vm` as it is at call time,
 * so that a VM's first-stage table keeps writing through whichever client
 * the VM is bound to now.
 */
function lateBound(holder: { vm: VmMethods }): VmMethods {
  return new Proxy({} as VmMethods, { get: (_, name: string) => (holder.vm as unknown as Record<string, unknown>)[name] });
}

/** Creates and wires one VM (see the file comment); returns its description. */
export async function buildVm(client: IommufdClient, book: LatencyBook, vmId: string, o: BuildOptions): Promise<FleetVm> {
  const vtd = o.model === "vtd";
  await book.time("createVm", () =>
    client.createVm({
      vmId,
      model: vtd ? IommuModel.INTEL_VTD : IommuModel.MOCK,
      guestMemoryBytes: GIB,
      options: vtd ? { iotlbEntries: 4096, pagingStructureCaches: o.pagingStructureCaches } : {},
    }),
  );
  const fleetVm: FleetVm = { vmId, model: o.model, ioasId: 0, parentId: 0, devices: [], vm: timedVm(client.vm(vmId), book), busy: false, translationsSeen: 0n };
  const vm = fleetVm.vm;
  const { ioasId } = await vm.allocIoas();
  fleetVm.ioasId = ioasId;
  if (vtd) await vm.mapIoas({ ioasId, userVa: 0n, length: GIB, iova: 0n, readable: true, writeable: true });
  else await vm.mapIoas({ ioasId, userVa: 0n, length: MOCK_MAP_BYTES, iova: MOCK_IOVA, readable: true, writeable: true });
  const devIds: number[] = [];
  for (let d = 0; d < o.devices; d++) devIds.push((await vm.bindDevice({ name: deviceName(d), pasidCapable: vtd })).devId);
  const { hwptId: parentId } = await vm.allocHwpt({ devId: devIds[0], ptId: ioasId, nestParent: true });
  fleetVm.parentId = parentId;
  for (let d = 0; d < o.devices; d++) {
    const devId = devIds[d];
    let nestedId: number;
    let s1: Stage1PageTable | undefined;
    const pageGpa: bigint[] = [];
    if (vtd) {
      const writer = o.coalesce ? new CoalescingVm(lateBound(fleetVm)) : undefined;
      s1 = new Stage1PageTable(writer?.vm ?? lateBound(fleetVm), { tableBase: S1_TABLES_AT + BigInt(d) * S1_TABLE_BYTES, tableBytes: S1_TABLE_BYTES });
      for (let i = 0; i < o.pages; i++) {
        pageGpa.push(dataGpa(d, i, false));
        await s1.map(S1_IOVA + BigInt(i) * SZ_4K, pageGpa[i], SZ_4K);
      }
      await s1.map(S1_HUGE_IOVA, HUGE_DATA_AT + BigInt(d) * SZ_2M, SZ_2M);
      await writer?.flush();
      nestedId = (await vm.allocHwpt({ devId, ptId: parentId, data: { case: "vtdS1", value: { pgtblAddr: s1.root, addrWidth: s1.addrWidth } } })).hwptId;
    } else {
      nestedId = (await vm.allocHwpt({ devId, ptId: parentId, data: { case: "selftest", value: { iotlb: 0x1234 + d } } })).hwptId;
    }
    await vm.attachDevice({ devId, ptId: nestedId });
    fleetVm.devices.push({ index: d, devId, nestedId, s1, pageGpa, attached: "nested" });
  }
  return fleetVm;
}

/** The data page the i-th 4 KiB stage-1 leaf of device d maps (or its alternative). */
export function dataGpa(d: number, i: number, alt: boolean): bigint {
  return DATA_AT + BigInt(d) * 0x100000n + BigInt(i) * SZ_4K + (alt ? ALT_OFFSET : 0n);
}

/** The IOVA of the i-th 4 KiB stage-1 leaf. */
export const s1PageIova = (i: number): bigint => S1_IOVA + BigInt(i) * SZ_4K;

/** A small deterministic PRNG (mulberry32), so that runs are repeatable with --seed. */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export interface TranslateCase {
  iovas: bigint[];
  /** Expected address per access, or "BLOCKED" for a detached device. */
  expect: bigint[] | "BLOCKED";
}

/** A batch of `n` accesses of the device as it is attached now, with the answers it must get. */
export function translateCase(vm: FleetVm, dev: FleetDevice, n: number, random: () => number): TranslateCase {
  const iovas: bigint[] = [];
  const expect: bigint[] = [];
  const off = (limit: number) => BigInt(Math.floor(random() * limit) & ~7);
  for (let k = 0; k < n; k++) {
    let iova: bigint;
    let addr: bigint;
    if (vm.model === "mock") {
      const o = off(Number(MOCK_MAP_BYTES));
      iova = MOCK_IOVA + o;
      addr = o;
    } else if (dev.attached === "nested" || dev.attached === "none") {
      if (random() < 0.8) {
        const i = Math.floor(random() * dev.pageGpa.length);
        const o = off(4096);
        iova = s1PageIova(i) + o;
        addr = dev.pageGpa[i] + o;
      } else {
        const o = off(Number(SZ_2M));
        iova = S1_HUGE_IOVA + o;
        addr = HUGE_DATA_AT + BigInt(dev.index) * SZ_2M + o;
      }
    } else {
      // Attached to the nest parent: stage 2 only, identity over guest RAM.
      iova = off(Number(GIB));
      addr = iova;
    }
    iovas.push(iova);
    expect.push(addr);
  }
  return { iovas, expect: dev.attached === "none" ? "BLOCKED" : expect };
}

/** Why a Translate response is not what the case expects, or undefined when it is. */
export function checkTranslate(c: TranslateCase, r: TranslateResponse): string | undefined {
  if (r.addresses.length !== c.iovas.length) return `${r.addresses.length} addresses for ${c.iovas.length} IOVAs`;
  if (c.expect === "BLOCKED") {
    if (r.faults.length !== c.iovas.length || r.faults.some((f) => f.reasonName !== "BLOCKED")) return `detached device: expected ${c.iovas.length} BLOCKED faults, got ${r.faults.length}`;
    return undefined;
  }
  if (r.faults.length > 0) return `${r.faults.length} faults, first ${r.faults[0].reasonName} at 0x${r.faults[0].iova.toString(16)}`;
  for (let i = 0; i < c.iovas.length; i++) {
    if (r.addresses[i] !== c.expect[i]) return `IOVA 0x${c.iovas[i].toString(16)} -> 0x${r.addresses[i].toString(16)}, expected 0x${c.expect[i].toString(16)}`;
  }
  return undefined;
}

/** Translates one batch per device and checks every answer; throws on a mismatch. */
export async function verifyVm(vm: FleetVm, n: number, random: () => number): Promise<void> {
  for (const dev of vm.devices) {
    const c = translateCase(vm, dev, n, random);
    const r = await vm.vm.translate({ devId: dev.devId, iovas: c.iovas });
    const why = checkTranslate(c, r);
    if (why) throw new Error(`${vm.vmId} dev ${dev.devId}: ${why}`);
  }
}

/** Runs `tasks` with at most `limit` in flight; rejects with the first failure (after the rest settle). */
export async function pool<T>(items: readonly T[], limit: number, task: (item: T, worker: number) => Promise<void>): Promise<void> {
  let next = 0;
  let failure: unknown;
  await Promise.all(
    Array.from({ length: Math.min(limit, items.length) }, async (_, worker) => {
      while (next < items.length && failure === undefined) {
        const item = items[next++];
        try {
          await task(item, worker);
        } catch (e) {
          failure ??= e;
        }
      }
    }),
  );
  if (failure !== undefined) throw failure;
}

export const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

/** Server flags for `vms` VMs of 1 GiB each plus headroom: the limits above their defaults where needed. */
export function fleetLimitArgs(vms: number): string[] {
  const headroom = vms + 256;
  return [
    "--max-vms-per-tenant",
    String(Math.max(4096, headroom)),
    "--max-tenant-guest-memory-bytes",
    String(Math.max(2 ** 46, headroom * 2 ** 30)),
    "--max-tenant-touched-bytes",
    String(Math.max(64 * 2 ** 30, headroom * 16 * 2 ** 20)),
  ];
}
