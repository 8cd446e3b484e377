import type { IommufdContext } from "./context.js";
import type { IommuProt } from "./drivers/driver.js";
import { fail } from "./errno.js";
import { faultPoint } from "./fail-nth.js";
import { addU64, hex, intersects, type IovaRange, U64_MAX, ULONG_MAX } from "./iova.js";
import { Ioas } from "./objects.js";

/** The IOAS ioctls (ioas.c), each checking its input in the kernel's order. */

/** IOMMU_IOAS_ALLOC */
export function ioasAlloc(ctx: IommufdContext): number {
  const ioas = new Ioas(ctx.memory, ctx.limits);
  ctx.reserve(ioas);
  ioas.iopt.subject = `${ctx.subject}/ioas:${ioas.id}`;
  ctx.finalize(ioas);
  return ioas.id;
}

export interface IoasMapCmd {
  ioasId: number;
  userVa: bigint;
  length: bigint;
  /** IOMMU_IOAS_MAP_FIXED_IOVA when set. */
  iova?: bigint;
  readable: boolean;
  writeable: boolean;
}

function protOf(cmd: { readable: boolean; writeable: boolean }): IommuProt {
  // conv_iommu_prot(); a mapping must be readable or writeable.
  if (!cmd.readable && !cmd.writeable) fail("EINVAL", "mapping must be readable or writeable");
  return { read: cmd.readable, write: cmd.writeable };
}

/** IOMMU_IOAS_MAP (iommufd_ioas_map() -> iopt_map_user_pages()) */
export function ioasMap(ctx: IommufdContext, cmd: IoasMapCmd): bigint {
  if ((cmd.iova ?? 0n) >= ULONG_MAX || cmd.length >= ULONG_MAX) fail("EOVERFLOW", "iova or length is U64_MAX");
  const prot = protOf(cmd);
  const ioas = ctx.getIoas(cmd.ioasId);
  // iopt_alloc_user_pages()
  if (addU64(cmd.userVa, cmd.length) === undefined) fail("EOVERFLOW", `user_va ${hex(cmd.userVa)} + length ${hex(cmd.length)} overflows`);
  if (cmd.length === 0n || cmd.length > ULONG_MAX - 4096n) fail("EINVAL", `length ${hex(cmd.length)} is invalid`);
  // The struct iopt_pages of the user range (kzalloc).
  faultPoint("iopt_alloc_user_pages");
  // The pages are writable only if mapped WRITEABLE (iopt_alloc_user_pages(),
  // writable = iommu_prot & IOMMU_WRITE); a later COPY inherits that.
  return ioas.iopt.mapPages([{ hostAddr: cmd.userVa, length: cmd.length, writable: cmd.writeable }], cmd.length, cmd.iova, prot);
}

export interface IoasCopyCmd {
  dstIoasId: number;
  srcIoasId: number;
  srcIova: bigint;
  length: bigint;
  dstIova?: bigint;
  readable: boolean;
  writeable: boolean;
}

/** IOMMU_IOAS_COPY: map the pages behind a source range into another IOAS. */
export function ioasCopy(ctx: IommufdContext, cmd: IoasCopyCmd): bigint {
  if (cmd.length >= ULONG_MAX || cmd.srcIova >= ULONG_MAX || (cmd.dstIova ?? 0n) >= ULONG_MAX) {
    fail("EOVERFLOW", "length, src_iova or dst_iova is U64_MAX");
  }
  const prot = protOf(cmd);
  const src = ctx.getIoas(cmd.srcIoasId);
  const slices = src.iopt.getPages(cmd.srcIova, cmd.length);
  const dst = ctx.getIoas(cmd.dstIoasId);
  return dst.iopt.mapPages(slices, cmd.length, cmd.dstIova, prot);
}

/** IOMMU_IOAS_UNMAP: returns the bytes unmapped. */
export function ioasUnmap(ctx: IommufdContext, cmd: { ioasId: number; iova: bigint; length: bigint }): bigint {
  const ioas = ctx.getIoas(cmd.ioasId);
  if (cmd.iova === 0n && cmd.length === U64_MAX) return ioas.iopt.unmapAll();
  if (cmd.iova >= ULONG_MAX || cmd.length >= ULONG_MAX) fail("EOVERFLOW", "iova or length is U64_MAX");
  // iopt_unmap_iova()
  if (cmd.length === 0n) fail("EINVAL", "length is 0");
  const last = addU64(cmd.iova, cmd.length - 1n);
  if (last === undefined) fail("EOVERFLOW", `iova ${hex(cmd.iova)} + length ${hex(cmd.length)} overflows`);
  return ioas.iopt.unmapIovaRange(cmd.iova, last);
}

/** IOMMU_IOAS_IOVA_RANGES */
export function ioasIovaRanges(ctx: IommufdContext, ioasId: number): { ranges: IovaRange[]; alignment: bigint } {
  const ioas = ctx.getIoas(ioasId);
  return { ranges: ioas.iopt.iovaRanges(), alignment: ioas.iopt.iovaAlignment };
}

/** IOMMU_IOAS_ALLOW_IOVAS: replace the allowed list atomically. */
export function ioasAllowIovas(ctx: IommufdContext, ioasId: number, ranges: readonly IovaRange[]): void {
  const ioas = ctx.getIoas(ioasId);
  // iommufd_ioas_load_iovas()
  ranges.forEach((r, i) => {
    if (r.start >= r.last) fail("EINVAL", `allowed range ${i} has start ${hex(r.start)} >= last ${hex(r.last)}`);
    if (ranges.slice(0, i).some((prev) => intersects(prev, r.start, r.last))) fail("EINVAL", `allowed range ${i} overlaps an earlier one`);
    // The range's struct iopt_allowed (kzalloc).
    faultPoint("iommufd_ioas_load_iovas");
  });
  ioas.iopt.setAllowIova(ranges);
}

/** IOMMU_OPTION option ids this service knows (IOMMU_OPTION_RLIMIT_MODE is not offered). */
export type IommuOption = "huge_pages";

export interface OptionCmd {
  /** Undefined for an unset or unknown option id. */
  option: IommuOption | undefined;
  op: "get" | "set";
  objectId: number;
  value: bigint;
}

/** IOMMU_OPTION: returns the value now in force (val64 written back). */
export function iommuOption(ctx: IommufdContext, cmd: OptionCmd): bigint {
  if (cmd.option !== "huge_pages") fail("EOPNOTSUPP", "unknown IOMMU option");
  // iommufd_ioas_option() -> iommufd_ioas_option_huge_pages()
  const ioas = ctx.getIoas(cmd.objectId);
  if (cmd.op === "set") {
    if (cmd.value !== 0n && cmd.value !== 1n) fail("EINVAL", `HUGE_PAGES value ${cmd.value} is not 0 or 1`);
    ioas.iopt.setLargePages(cmd.value === 1n);
  }
  return ioas.iopt.disableLargePages ? 0n : 1n;
}
