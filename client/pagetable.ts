import type { MessageInitShape } from "@bufbuild/protobuf";
import type { VtdS1InvalidationSchema } from "../gen/iommufd/v1/hwpt_pb.js";
import type { VmMethods } from "./client.js";

/**
 * Builds a guest's VT-d first-stage page tables (IA-32e / LA57 format,
 * vtd.md §1) in guest RAM through WriteGuestMemory, as a guest driver would,
 * and produces the Invalidate entries that go with each change. Tables are
 * carved from a region of guest RAM the caller reserves for them.
 */

// First-stage entry bits.
export const FS_P = 1n << 0n;
export const FS_RW = 1n << 1n;
export const FS_US = 1n << 2n;
export const FS_A = 1n << 5n;
export const FS_D = 1n << 6n;
export const FS_PS = 1n << 7n;
export const FS_EA = 1n << 10n;

export const SZ_4K = 1n << 12n;
export const SZ_2M = 1n << 21n;
export const SZ_1G = 1n << 30n;

const LEVEL_OF_SIZE = new Map<bigint, number>([
  [SZ_4K, 1],
  [SZ_2M, 2],
  [SZ_1G, 3],
]);

export interface Stage1Options {
  /** 4 (addr_width 48) or 5 (addr_width 57). */
  levels?: 4 | 5;
  /** First GPA of the region the tables are allocated from (4 KiB aligned). */
  tableBase: bigint;
  /** Bytes available for tables. */
  tableBytes: bigint;
}

export interface LeafOptions {
  /** R/W = 1 (default true). */
  writeable?: boolean;
  /** U/S = 1 (default true): requests without PASID are user requests. */
  user?: boolean;
  /** Extra bits ORed into the leaf (A, D, reserved bits for fault tests). */
  extraBits?: bigint;
}

export type VtdS1Invalidation = MessageInitShape<typeof VtdS1InvalidationSchema>;

function indexAt(iova: bigint, level: number): number {
  return Number((iova >> (12n + 9n * BigInt(level - 1))) & 511n);
}

export class Stage1PageTable {
  readonly levels: 4 | 5;
  /** GPA of the root table: the pgtbl_addr of VtdS1Data. */
  readonly root: bigint;
  /** addr_width of VtdS1Data. */
  readonly addrWidth: 48 | 57;
  private next: bigint;
  private readonly end: bigint;
  /** Shadow of every table written: GPA -> 512 entries. */
  private readonly tables = new Map<bigint, BigUint64Array>();

  constructor(
    private readonly vm: VmMethods,
    options: Stage1Options,
  ) {
    this.levels = options.levels ?? 4;
    this.addrWidth = this.levels === 5 ? 57 : 48;
    this.next = options.tableBase;
    this.end = options.tableBase + options.tableBytes;
    this.root = this.allocTable();
  }

  private allocTable(): bigint {
    if (this.next + SZ_4K > this.end) throw new Error("stage-1 table region exhausted");
    const gpa = this.next;
    this.next += SZ_4K;
    // Guest RAM reads as zero until written, so a fresh table is empty.
    this.tables.set(gpa, new BigUint64Array(512));
    return gpa;
  }

  private async writeEntry(table: bigint, index: number, value: bigint): Promise<void> {
    this.tables.get(table)![index] = value;
    const data = new Uint8Array(8);
    new DataView(data.buffer).setBigUint64(0, value, true);
    await this.vm.writeGuestMemory({ gpa: table + BigInt(index) * 8n, data });
  }

  /** The GPA of the table holding the level-`level` entry for iova, creating tables on the way. */
  private async tableFor(iova: bigint, level: number): Promise<bigint> {
    let table = this.root;
    for (let l = this.levels; l > level; l--) {
      const i = indexAt(iova, l);
      const entry = this.tables.get(table)![i];
      if ((entry & FS_P) !== 0n && (entry & FS_PS) === 0n) {
        table = entry & 0x000f_ffff_ffff_f000n;
        continue;
      }
      const child = this.allocTable();
      // Non-leaf entries grant everything; leaves carry the permissions.
      await this.writeEntry(table, i, child | FS_P | FS_RW | FS_US);
      table = child;
    }
    return table;
  }

  /** Map [iova, iova + size) to gpa with a leaf of `size` (4 KiB, 2 MiB or 1 GiB). */
  async map(iova: bigint, gpa: bigint, size: bigint, options: LeafOptions = {}): Promise<void> {
    const level = LEVEL_OF_SIZE.get(size);
    if (level === undefined || iova % size !== 0n || gpa % size !== 0n) throw new Error("map: size must be 4K/2M/1G and both addresses aligned to it");
    const table = await this.tableFor(iova, level);
    let entry = gpa | FS_P | (options.writeable === false ? 0n : FS_RW) | (options.user === false ? 0n : FS_US) | (options.extraBits ?? 0n);
    if (level > 1) entry |= FS_PS;
    await this.writeEntry(table, indexAt(iova, level), entry);
  }

  /** Clear the leaf that maps iova at `size`. */
  async unmap(iova: bigint, size: bigint): Promise<void> {
    const level = LEVEL_OF_SIZE.get(size)!;
    await this.writeEntry(await this.tableFor(iova, level), indexAt(iova, level), 0n);
  }

  /** Overwrite the level-`level` entry on iova's path with a raw value (for fault tests). */
  async setEntry(iova: bigint, level: number, value: bigint): Promise<void> {
    await this.writeEntry(await this.tableFor(iova, level), indexAt(iova, level), value);
  }

  /** The GPA of the level-`level` entry for iova (tables must exist). */
  async entryAddress(iova: bigint, level: number): Promise<bigint> {
    return (await this.tableFor(iova, level)) + BigInt(indexAt(iova, level)) * 8n;
  }

  /** Read an entry back from guest RAM (to observe A/D updates). */
  async readEntry(iova: bigint, level: number): Promise<bigint> {
    const { data } = await this.vm.readGuestMemory({ gpa: await this.entryAddress(iova, level), length: 8 });
    return new DataView(data.buffer, data.byteOffset, 8).getBigUint64(0, true);
  }

  /** The Invalidate entry covering [iova, iova + size) (leaf: only leaf entries changed). */
  static invalidation(iova: bigint, size: bigint, leaf = true): VtdS1Invalidation {
    return { addr: iova & ~0xfffn, npages: (size + 0xfffn) >> 12n, leaf };
  }

  /** The Invalidate entry for the whole domain (addr 0, npages U64_MAX). */
  static invalidateAll(): VtdS1Invalidation {
    return { addr: 0n, npages: (1n << 64n) - 1n, leaf: false };
  }
}
