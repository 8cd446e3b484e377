import type { IommufdContext } from "../server/core/context.js";
import { deviceAttach, deviceBind } from "../server/core/device.js";
import type { VtdDriver } from "../server/core/drivers/vtd/vtd-driver.js";
import type { GuestMemory } from "../server/core/guest-memory.js";
import { hwptAlloc } from "../server/core/hwpt.js";
import { ioasAlloc, ioasMap, iommuOption } from "../server/core/ioas.js";
import { DmaBatch } from "../server/core/translate/dma-batch.js";
import { translate } from "../server/core/translate/translate.js";
import { VmRegistry } from "../server/core/vm.js";

/**
 * Benchmark fixtures built through the core API in-process: a VT-d VM with
 * guest RAM identity-mapped in stage 2 and a device attached to a nested
 * HWPT whose stage-1 tables are written straight into guest RAM.
 */

export const GIB = 1 << 30;
const TABLES_AT = 0x100000; // stage-1 tables live here, below the data
const DATA_AT = 0x4000000; // first GPA stage-1 leaves point at

export interface NestedFixture {
  ctx: IommufdContext;
  driver: VtdDriver;
  devId: number;
  nestedId: number;
  stage1: Stage1Writer;
  /** A batch of `count` IOVAs, 4 KiB apart from 0, the last page first mapped by map4k(). */
  batch(count: number, write?: boolean): DmaBatch;
  run(batch: DmaBatch): void;
}

export interface NestedOptions {
  iotlbEntries?: number;
  pagingStructureCaches?: boolean;
  fiveLevel?: boolean;
  /** HUGE_PAGES of the IOAS: false forces 4 KiB stage-2 pages. */
  hugePages?: boolean;
  stage1Levels?: 4 | 5;
  guestBytes?: number;
  /** Attach the device to the nested HWPT (default true). */
  attach?: boolean;
}

/** A synchronous first-stage table writer over guest RAM (the bench twin of client/pagetable.ts). */
export class Stage1Writer {
  private next = TABLES_AT;
  readonly root: number;

  constructor(
    private readonly memory: GuestMemory,
    readonly levels: 4 | 5,
  ) {
    this.root = this.alloc();
  }

  private alloc(): number {
    const gpa = this.next;
    this.next += 4096;
    return gpa;
  }

  private entry(table: number, index: number): Uint32Array {
    return this.memory.pageForWrite(table / 4096).subarray(index * 2, index * 2 + 2);
  }

  /** Map iova -> gpa with a leaf at `level` (1: 4 KiB, 2: 2 MiB). Non-leaf entries: P|RW|US. */
  map(iova: number, gpa: number, level = 1): void {
    let table = this.root;
    for (let l = this.levels; l > level; l--) {
      const e = this.entry(table, Math.floor(iova / 2 ** (12 + 9 * (l - 1))) % 512);
      if ((e[0] & 1) === 0) {
        const child = this.alloc();
        e[0] = child | 0x7;
        e[1] = 0;
      }
      table = e[0] & ~0xfff;
    }
    const leaf = this.entry(table, Math.floor(iova / 2 ** (12 + 9 * (level - 1))) % 512);
    leaf[0] = (gpa % 2 ** 32) | 0x7 | (level > 1 ? 0x80 : 0);
    leaf[1] = Math.floor(gpa / 2 ** 32);
  }
}

export function nestedFixture(name: string, options: NestedOptions = {}): NestedFixture {
  const vms = new VmRegistry();
  const guestBytes = options.guestBytes ?? 2 * GIB;
  const vm = vms.create("", {
    vmId: name,
    model: "intel_vtd",
    guestMemoryBytes: BigInt(guestBytes),
    options: {
      iotlbEntries: options.iotlbEntries ?? 4096,
      pagingStructureCaches: options.pagingStructureCaches ?? false,
      fiveLevel: options.fiveLevel ?? false,
    },
  });
  const ctx = vm.ctx;
  const ioasId = ioasAlloc(ctx);
  if (options.hugePages === false) iommuOption(ctx, { option: "huge_pages", op: "set", objectId: ioasId, value: 0n });
  ioasMap(ctx, { ioasId, userVa: 0n, length: BigInt(guestBytes), iova: 0n, readable: true, writeable: true });
  const devId = deviceBind(ctx, { name: "dev0", pasidCapable: true, dirtyTrackingCapable: false });
  const flags = { nestParent: true, dirtyTracking: false, pasid: false };
  const parentId = hwptAlloc(ctx, { devId, ptId: ioasId, flags });
  const stage1 = new Stage1Writer(ctx.memory, options.stage1Levels ?? 4);
  const nestedId = hwptAlloc(ctx, {
    devId,
    ptId: parentId,
    flags: { ...flags, nestParent: false },
    data: { kind: "vtd_s1", sre: false, eafe: false, wpe: false, pgtblAddr: BigInt(stage1.root), addrWidth: stage1.levels === 5 ? 57 : 48 },
  });
  if (options.attach !== false) deviceAttach(ctx, { devId, ptId: nestedId, pasid: 0, replace: false });
  return {
    ctx,
    driver: ctx.driver as VtdDriver,
    devId,
    nestedId,
    stage1,
    batch(count, write = false) {
      const lo = new Uint32Array(count);
      for (let i = 0; i < count; i++) lo[i] = i * 4096 + (i & 0xff8);
      return new DmaBatch(lo, new Uint32Array(count), write);
    },
    run(batch) {
      translate(ctx, devId, undefined, batch);
    },
  };
}

/** Map `pages` consecutive 4 KiB pages from IOVA 0 to data pages from DATA_AT. */
export function map4k(f: NestedFixture, pages: number): void {
  for (let i = 0; i < pages; i++) f.stage1.map(i * 4096, DATA_AT + i * 4096);
}

/** Reset a batch's outputs so it can run again. */
export function resetBatch(b: DmaBatch): void {
  b.hits = b.misses = b.faults = b.references = 0;
  b.fault.fill(0);
}
