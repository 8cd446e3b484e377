import type { IommuError } from "../core/errno.js";
import {
  IOMMU_HWPT_INVALIDATE_DATA_SELFTEST,
  IOMMU_HWPT_INVALIDATE_DATA_VTD_S1,
  IOMMU_TEST_INVALIDATE_FLAG_ALL,
  IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3,
  IOMMU_VTD_INV_FLAGS_LEAF,
  type Invalidations,
} from "../core/uapi.js";
import { rejectedRequest } from "./bridge.js";
import { Reader, WIRE_FIXED64, WIRE_LEN, WIRE_VARINT } from "./wire-reader.js";

/**
 * The request codec of Invalidate: an InvalidateRequest (hwpt.proto) decoded
 * straight into the kernel's entry array (struct iommu_hwpt_invalidate's
 * data_type, entry_len, entry_num, data), which is what the core makes of
 * the typed entries anyway. protobuf-es builds an object per entry (about
 * 40 ms for 64 Ki entries, in grpc-js's deserializer where nothing can
 * yield); this takes a few. Same protobuf semantics: unknown fields are
 * skipped, repeated occurrences of a message merge, the last oneof member
 * wins; a malformed request is EINVAL.
 */

export interface InvalidateWireRequest {
  vmId: string;
  hwptId: number;
  requests: Invalidations | undefined;
}

/** Entry layouts of the typed cases: the kernel struct each entry becomes. */
const TYPED = {
  /** vtd_s1 (10): struct iommu_hwpt_vtd_s1_invalidate: addr u64, npages u64, flags u32, __reserved u32. */
  10: { type: IOMMU_HWPT_INVALIDATE_DATA_VTD_S1, entryLen: 24 },
  /** arm_smmuv3 (11): struct iommu_viommu_arm_smmuv3_invalidate: __le64 cmd[2]. */
  11: { type: IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3, entryLen: 16 },
  /** selftest (12): struct iommu_hwpt_invalidate_selftest: flags u32, iotlb_id u32. */
  12: { type: IOMMU_HWPT_INVALIDATE_DATA_SELFTEST, entryLen: 8 },
} as const;
type TypedField = keyof typeof TYPED;

/** A growing array of fixed-size entries. */
class Entries {
  data = new Uint8Array(0);
  view = new DataView(this.data.buffer);
  count = 0;

  constructor(readonly entryLen: number) {}

  /** A zeroed new entry; its byte offset. */
  add(): number {
    const offset = this.count * this.entryLen;
    if (offset + this.entryLen > this.data.length) {
      const grown = new Uint8Array(Math.max(this.entryLen * 64, this.data.length * 2));
      grown.set(this.data);
      this.data = grown;
      this.view = new DataView(grown.buffer);
    }
    this.count++;
    return offset;
  }
}

function expectWire(actual: number, expected: number, what: string): void {
  if (actual !== expected) throw new Error(`${what} has wire type ${actual}`);
}

/** The end of a length-delimited field whose length the reader is at. */
function lengthEnd(r: Reader): number {
  r.varint();
  const end = r.pos + r.lo;
  if (r.hi !== 0 || end > r.buf.length) throw new Error("truncated field");
  return end;
}

/** One entry message of a typed case, merged into the kernel struct at `o`. */
function readEntry(r: Reader, end: number, field: TypedField, v: DataView, o: number): void {
  while (r.pos < end) {
    r.varint();
    const f = r.lo >>> 3;
    const wire = r.lo & 7;
    if (field === 10 && f >= 1 && f <= 3) {
      // VtdS1Invalidation: addr = 1, npages = 2, leaf = 3.
      expectWire(wire, WIRE_VARINT, "a VtdS1Invalidation field");
      r.varint();
      if (f === 3) v.setUint32(o + 16, r.lo !== 0 || r.hi !== 0 ? IOMMU_VTD_INV_FLAGS_LEAF : 0, true);
      else {
        v.setUint32(o + (f - 1) * 8, r.lo, true);
        v.setUint32(o + (f - 1) * 8 + 4, r.hi, true);
      }
    } else if (field === 11 && (f === 1 || f === 2)) {
      // ArmSmmuv3Command: cmd0 = 1, cmd1 = 2 (fixed64).
      expectWire(wire, WIRE_FIXED64, "an ArmSmmuv3Command field");
      if (r.pos + 8 > end) throw new Error("truncated fixed64");
      v.setUint32(o + (f - 1) * 8, r.buf.readUInt32LE(r.pos), true);
      v.setUint32(o + (f - 1) * 8 + 4, r.buf.readUInt32LE(r.pos + 4), true);
      r.pos += 8;
    } else if (field === 12 && (f === 1 || f === 2)) {
      // SelftestInvalidation: iotlb_id = 1, all = 2.
      expectWire(wire, WIRE_VARINT, "a SelftestInvalidation field");
      r.varint();
      if (f === 1) v.setUint32(o + 4, r.lo, true);
      else v.setUint32(o, r.lo !== 0 || r.hi !== 0 ? IOMMU_TEST_INVALIDATE_FLAG_ALL : 0, true);
    } else {
      r.skip(wire);
    }
  }
  if (r.pos !== end) throw new Error("an entry overruns its message");
}

/** The entries list message of a typed case (its repeated field 1), appended to `into`. */
function readTyped(r: Reader, end: number, field: TypedField, into: Entries): void {
  while (r.pos < end) {
    r.varint();
    const f = r.lo >>> 3;
    const wire = r.lo & 7;
    if (f === 1) {
      expectWire(wire, WIRE_LEN, "an entry");
      const entryEnd = lengthEnd(r);
      const o = into.add();
      readEntry(r, entryEnd, field, into.view, o);
    } else {
      r.skip(wire);
    }
  }
  if (r.pos !== end) throw new Error("entries overrun their message");
}

interface RawFields {
  dataType: number;
  entryLen: number;
  entryNum: number;
  data: Uint8Array;
}

/** RawInvalidations, merged into `raw` (scalars: last wins). */
function readRaw(r: Reader, end: number, raw: RawFields): void {
  while (r.pos < end) {
    r.varint();
    const f = r.lo >>> 3;
    const wire = r.lo & 7;
    if (f >= 1 && f <= 3) {
      expectWire(wire, WIRE_VARINT, "a RawInvalidations field");
      r.varint();
      if (f === 1) raw.dataType = r.lo;
      else if (f === 2) raw.entryLen = r.lo;
      else raw.entryNum = r.lo;
    } else if (f === 4) {
      expectWire(wire, WIRE_LEN, "RawInvalidations.data");
      const dataEnd = lengthEnd(r);
      raw.data = r.buf.subarray(r.pos, dataEnd);
      r.pos = dataEnd;
    } else {
      r.skip(wire);
    }
  }
  if (r.pos !== end) throw new Error("raw invalidations overrun their message");
}

/** Decodes an InvalidateRequest; a malformed one becomes an EINVAL IommuError. */
export function decodeInvalidateRequest(buf: Buffer): InvalidateWireRequest | IommuError {
  try {
    const r = new Reader(buf);
    let vmId = "";
    let hwptId = 0;
    // The oneof: the member last seen, and its value so far.
    let member: TypedField | 13 | undefined;
    let entries: Entries | undefined;
    let raw: RawFields | undefined;
    while (r.pos < buf.length) {
      r.varint();
      const field = r.lo >>> 3;
      const wire = r.lo & 7;
      if (field === 1) {
        expectWire(wire, WIRE_LEN, "vm_id");
        const end = lengthEnd(r);
        vmId = buf.toString("utf8", r.pos, end);
        r.pos = end;
      } else if (field === 2) {
        expectWire(wire, WIRE_VARINT, "hwpt_id");
        r.varint();
        hwptId = r.lo;
      } else if (field === 10 || field === 11 || field === 12) {
        expectWire(wire, WIRE_LEN, "the invalidations");
        const end = lengthEnd(r);
        // Another member resets the oneof; the same one merges (entries append).
        if (member !== field || entries === undefined) entries = new Entries(TYPED[field].entryLen);
        member = field;
        readTyped(r, end, field, entries);
      } else if (field === 13) {
        expectWire(wire, WIRE_LEN, "raw");
        const end = lengthEnd(r);
        if (member !== 13 || raw === undefined) raw = { dataType: 0, entryLen: 0, entryNum: 0, data: new Uint8Array(0) };
        member = 13;
        readRaw(r, end, raw);
      } else {
        r.skip(wire);
      }
    }
    let requests: Invalidations | undefined;
    if (member === 13) requests = { kind: "raw", ...raw! };
    else if (member !== undefined) {
      const e = entries!;
      requests = { kind: "raw", dataType: TYPED[member].type, entryLen: e.entryLen, entryNum: e.count, data: e.data.subarray(0, e.count * e.entryLen) };
    }
    return { vmId, hwptId, requests };
  } catch (e) {
    return rejectedRequest(e);
  }
}
