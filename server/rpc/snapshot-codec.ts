import { createHash, type Hash } from "node:crypto";
import { create, fromBinary, type MessageInitShape, toBinary } from "@bufbuild/protobuf";
import { sizeDelimitedEncode, sizeDelimitedPeek } from "@bufbuild/protobuf/wire";
import {
  type SnapshotObject,
  type SnapshotObjectSchema,
  SnapshotFormat,
  type VmSnapshotHeader,
  type VmSnapshotRecord,
  VmSnapshotRecordSchema,
} from "../../gen/iommufd/v1/snapshot_pb.js";
import { IommuModel as IommuModelPb } from "../../gen/iommufd/v1/vm_pb.js";
import { fail, IommuError } from "../core/errno.js";
import { PAGE_SIZE } from "../core/guest-memory.js";
import type { IommuModel } from "../core/vm.js";
import type { GuestPageState, ObjectState, VmState } from "../core/vm-state.js";

/**
 * The snapshot byte stream of snapshot.proto: length-delimited
 * VmSnapshotRecords (header, pages..., trailer), the trailer carrying the
 * length and SHA-256 of everything before it. ExportVm sends it in chunks,
 * ImportVm receives it in chunks, --state-dir stores it as a file.
 */

/** Bytes per ExportVm message (and the unit files are written in). */
export const SNAPSHOT_CHUNK_BYTES = 1 << 20;

/** Guest pages per pages record: 256 KiB of RAM, well under any message limit. */
const PAGES_PER_RECORD = 64;

/**
 * A record larger than this is corruption, not data: headers grow with
 * objects and areas (tens of bytes each), pages records are ~260 KiB.
 */
const MAX_RECORD_BYTES = 256 << 20;

const MODEL_TO_PB: Record<IommuModel, IommuModelPb> = {
  mock: IommuModelPb.MOCK,
  intel_vtd: IommuModelPb.INTEL_VTD,
  arm_smmuv3: IommuModelPb.ARM_SMMUV3,
};
const MODEL_FROM_PB = new Map(Object.entries(MODEL_TO_PB).map(([k, v]) => [v, k as IommuModel]));

function objectToPb(o: ObjectState): MessageInitShape<typeof SnapshotObjectSchema> {
  switch (o.kind) {
    case "ioas":
      return {
        id: o.id,
        object: {
          case: "ioas",
          value: { areas: o.areas.map((a) => ({ ...a })), allowed: o.allowed.map((r) => ({ ...r })), hugePages: o.hugePages, hwptIds: [...o.hwptIds] },
        },
      };
    case "hwpt_paging":
      return { id: o.id, object: { case: "hwptPaging", value: { ...o, smallPageAreas: [...o.smallPageAreas] } } };
    case "hwpt_nested":
      return {
        id: o.id,
        object: { case: "hwptNested", value: { parentId: o.parentId, pasid: o.pasid, data: { dataType: o.data.type, data: o.data.data }, selftestIotlb: [...o.selftestIotlb] } },
      };
    case "device":
      return {
        id: o.id,
        object: {
          case: "device",
          value: {
            name: o.name,
            pasidCapable: o.pasidCapable,
            dirtyTrackingCapable: o.dirtyTrackingCapable,
            attachments: o.attachments.map((a) => ({ ...a })),
            selftestPasidFakeError: o.selftestPasidFakeError,
          },
        },
      };
  }
}

function objectFromPb(o: SnapshotObject): ObjectState {
  const { id, object } = o;
  switch (object.case) {
    case "ioas": {
      const v = object.value;
      return { id, kind: "ioas", areas: v.areas.map((a) => ({ ...a })), allowed: v.allowed.map((r) => ({ start: r.start, last: r.last })), hugePages: v.hugePages, hwptIds: v.hwptIds };
    }
    case "hwptPaging": {
      const v = object.value;
      return {
        id,
        kind: "hwpt_paging",
        ioasId: v.ioasId,
        nestParent: v.nestParent,
        dirtyTracking: v.dirtyTracking,
        pasid: v.pasid,
        autoDomain: v.autoDomain,
        smallPageAreas: v.smallPageAreas,
      };
    }
    case "hwptNested": {
      const v = object.value;
      return { id, kind: "hwpt_nested", parentId: v.parentId, pasid: v.pasid, data: { type: v.data?.dataType ?? 0, data: v.data?.data ?? new Uint8Array() }, selftestIotlb: v.selftestIotlb };
    }
    case "device": {
      const v = object.value;
      return {
        id,
        kind: "device",
        name: v.name,
        pasidCapable: v.pasidCapable,
        dirtyTrackingCapable: v.dirtyTrackingCapable,
        attachments: v.attachments.map((a) => ({ pasid: a.pasid, hwptId: a.hwptId })),
        selftestPasidFakeError: v.selftestPasidFakeError,
      };
    }
    case undefined:
      return fail("EINVAL", `snapshot object ${id} has no kind`);
  }
}

function headerFromPb(h: VmSnapshotHeader): VmState {
  const model = MODEL_FROM_PB.get(h.model);
  if (model === undefined) fail("EINVAL", `snapshot has an unknown IOMMU model ${h.model}`);
  if (h.options === undefined || h.stats === undefined) fail("EINVAL", "snapshot header lacks options or stats");
  const s = h.stats;
  return {
    vmId: h.vmId,
    tenant: h.tenant,
    model,
    guestMemoryBytes: h.guestMemoryBytes,
    options: { iotlbEntries: h.options.iotlbEntries ?? 0, pagingStructureCaches: h.options.pagingStructureCaches ?? false, fiveLevel: h.options.fiveLevel ?? false },
    stats: {
      translations: Number(s.translations),
      iotlbHits: Number(s.iotlbHits),
      iotlbMisses: Number(s.iotlbMisses),
      memoryReferences: Number(s.memoryReferences),
      faults: Number(s.faults),
      invalidationEntries: Number(s.invalidationEntries),
    },
    objects: h.objects.map(objectFromPb),
  };
}

/** Accumulates bytes into SNAPSHOT_CHUNK_BYTES chunks while hashing them. */
class ChunkWriter {
  readonly chunks: Buffer[] = [];
  private pending: Uint8Array[] = [];
  private pendingBytes = 0;
  private readonly hash = createHash("sha256");
  length = 0;

  write(bytes: Uint8Array, hashed = true): void {
    if (hashed) {
      this.hash.update(bytes);
      this.length += bytes.length;
    }
    this.pending.push(bytes);
    this.pendingBytes += bytes.length;
    if (this.pendingBytes >= SNAPSHOT_CHUNK_BYTES) this.flush();
  }

  digest(): Buffer {
    return this.hash.digest();
  }

  flush(): void {
    if (this.pendingBytes === 0) return;
    const all = Buffer.concat(this.pending, this.pendingBytes);
    for (let i = 0; i < all.length; i += SNAPSHOT_CHUNK_BYTES) this.chunks.push(all.subarray(i, i + SNAPSHOT_CHUNK_BYTES));
    this.pending = [];
    this.pendingBytes = 0;
  }
}

function record(value: MessageInitShape<typeof VmSnapshotRecordSchema>): Uint8Array {
  return sizeDelimitedEncode(VmSnapshotRecordSchema, create(VmSnapshotRecordSchema, value));
}

/**
 * Encode a VM's state and pages as the snapshot byte stream, in chunks of at
 * most SNAPSHOT_CHUNK_BYTES. Synchronous on purpose: the stream is one
 * consistent instant of the VM, however slowly it is then sent.
 */
export function encodeVmSnapshot(state: VmState, pages: Iterable<GuestPageState>): Buffer[] {
  const out = new ChunkWriter();
  out.write(
    record({
      record: {
        case: "header",
        value: {
          format: SnapshotFormat.V1,
          vmId: state.vmId,
          tenant: state.tenant,
          model: MODEL_TO_PB[state.model],
          guestMemoryBytes: state.guestMemoryBytes,
          options: { ...state.options },
          stats: Object.fromEntries(Object.entries(state.stats).map(([k, v]) => [k, BigInt(v)])),
          objects: state.objects.map(objectToPb),
        },
      },
    }),
  );
  let batch: { gpa: bigint; data: Uint8Array }[] = [];
  let pageCount = 0;
  const flushPages = () => {
    if (batch.length > 0) out.write(record({ record: { case: "pages", value: { pages: batch } } }));
    batch = [];
  };
  for (const { gpa, data } of pages) {
    batch.push({ gpa: BigInt(gpa), data });
    pageCount++;
    if (batch.length === PAGES_PER_RECORD) flushPages();
  }
  flushPages();
  out.write(record({ record: { case: "trailer", value: { length: BigInt(out.length), sha256: out.digest(), pageCount: BigInt(pageCount) } } }), false);
  out.flush();
  return out.chunks;
}

/** What a snapshot stream delivers, in order: one header, pages, the end. */
export interface SnapshotSink {
  header(state: VmState): void;
  pages(pages: readonly GuestPageState[]): void;
}

function corrupt(what: string): never {
  fail("EINVAL", `snapshot is corrupt: ${what}`);
}

/**
 * Reads the snapshot byte stream as it arrives, checking framing, record
 * order, the format version (EOPNOTSUPP for one this server does not know,
 * as the kernel answers an unknown data_type) and, at the end, the trailer's
 * length, checksum and page count (EINVAL when anything is off). A sink only
 * ever sees records that framed and decoded correctly; the caller must not
 * trust what it built until end() returned. A refusal of the content (the
 * format, or the sink's: EEXIST, EDQUOT, EINVAL) is reported by end(), and
 * only if the stream is intact: damage is always EINVAL.
 */
export class SnapshotDecoder {
  private buffered: Uint8Array = new Uint8Array(0);
  private readonly hash: Hash = createHash("sha256");
  private length = 0;
  private pageCount = 0;
  private state: "header" | "pages" | "done" = "header";
  /**
   * The first refusal of the content (an unknown format, or the sink's): it
   * is reported only once the stream proved intact, so that a damaged stream
   * is always EINVAL, never what its damaged bytes happened to say.
   */
  private refusal: unknown;

  constructor(private readonly sink: SnapshotSink) {}

  /** The content was refused: the sink sees nothing more, end() will say why. */
  get refused(): boolean {
    return this.refusal !== undefined;
  }

  private deliver(fn: () => void): void {
    if (this.refusal !== undefined) return;
    try {
      fn();
    } catch (e) {
      this.refusal = e;
    }
  }

  push(chunk: Uint8Array): void {
    this.buffered = this.buffered.length === 0 ? chunk : Buffer.concat([this.buffered, chunk]);
    let offset = 0;
    for (;;) {
      const rest = this.buffered.subarray(offset);
      if (rest.length === 0) break;
      let peek: ReturnType<typeof sizeDelimitedPeek>;
      try {
        peek = sizeDelimitedPeek(rest);
      } catch {
        corrupt(`bad record length at byte ${this.length}`);
      }
      if (peek.eof) break;
      if (peek.size > MAX_RECORD_BYTES) corrupt(`record of ${peek.size} bytes at byte ${this.length}`);
      const end = peek.offset + peek.size;
      if (rest.length < end) break;
      this.record(rest.subarray(0, peek.offset), rest.subarray(peek.offset, end));
      offset += end;
    }
    this.buffered = this.buffered.subarray(offset);
  }

  /** The stream has ended: it must have ended exactly after its trailer. */
  end(): void {
    if (this.state !== "done") corrupt(`truncated after ${this.length + this.buffered.length} bytes (no trailer)`);
    if (this.buffered.length > 0) corrupt(`${this.buffered.length} bytes after the trailer`);
    if (this.refusal !== undefined) throw this.refusal;
  }

  private record(prefix: Uint8Array, body: Uint8Array): void {
    if (this.state === "done") corrupt("data after the trailer");
    let r: VmSnapshotRecord;
    try {
      r = fromBinary(VmSnapshotRecordSchema, body);
    } catch (e) {
      corrupt(`undecodable record at byte ${this.length}: ${(e as Error).message}`);
    }
    const value = r.record;
    if (value.case === "trailer") {
      const t = value.value;
      if (this.state !== "pages") corrupt("trailer before the header");
      // The trailer is outside the checksum: only its one encoding is accepted.
      if (!Buffer.from(toBinary(VmSnapshotRecordSchema, r)).equals(body)) corrupt("the trailer is not canonically encoded");
      if (t.length !== BigInt(this.length)) corrupt(`trailer says ${t.length} bytes, the stream has ${this.length}`);
      if (!this.hash.digest().equals(t.sha256)) corrupt("SHA-256 mismatch");
      if (t.pageCount !== BigInt(this.pageCount)) corrupt(`trailer says ${t.pageCount} pages, the stream has ${this.pageCount}`);
      this.state = "done";
      return;
    }
    this.hash.update(prefix).update(body);
    this.length += prefix.length + body.length;
    if (value.case === "header") {
      if (this.state !== "header") corrupt("a second header");
      const format = value.value.format;
      if (format === SnapshotFormat.UNSPECIFIED) corrupt("the header names no format");
      if (format !== SnapshotFormat.V1) {
        this.refusal = new IommuError("EOPNOTSUPP", `snapshot format ${format} is not supported (this server reads SNAPSHOT_FORMAT_V1)`);
      }
      this.state = "pages";
      this.deliver(() => this.sink.header(headerFromPb(value.value)));
    } else if (value.case === "pages") {
      if (this.state !== "pages") corrupt("pages before the header");
      const pages = value.value.pages.map((p) => {
        if (p.data.length !== PAGE_SIZE || p.gpa % BigInt(PAGE_SIZE) !== 0n || p.gpa > BigInt(Number.MAX_SAFE_INTEGER)) {
          corrupt(`page at ${p.gpa} is not one aligned ${PAGE_SIZE}-byte page`);
        }
        return { gpa: Number(p.gpa), data: p.data };
      });
      this.pageCount += pages.length;
      this.deliver(() => this.sink.pages(pages));
    } else {
      corrupt(`unknown record at byte ${this.length}`);
    }
  }
}

/** Checks a whole snapshot's framing, version and integrity without applying it. */
export function checkSnapshot(bytes: Uint8Array): void {
  const decoder = new SnapshotDecoder({ header() {}, pages() {} });
  decoder.push(bytes);
  decoder.end();
}
