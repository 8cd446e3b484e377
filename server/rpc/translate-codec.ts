import type { DmaBatch } from "../core/translate/dma-batch.js";
import { faultName } from "../core/translate/fault.js";
import type { IommuError } from "../core/errno.js";
import { rejectedRequest } from "./bridge.js";
import { Reader, WIRE_LEN, WIRE_VARINT } from "./wire-reader.js";

/**
 * The wire codec of Translate, the DMA hot path: TranslateRequest decoded
 * straight into u32 halves and TranslateResponse encoded straight from the
 * batch's typed arrays, with no BigInt and no per-IOVA objects. Produces and
 * accepts exactly the protobuf encoding of proto/iommufd/v1/dma.proto (any
 * protobuf client interoperates); other methods use protobuf-es.
 */

export interface TranslateWireRequest {
  vmId: string;
  devId: number;
  /** Absent = requests without PASID. */
  pasid: number | undefined;
  iovaLo: Uint32Array;
  iovaHi: Uint32Array;
  write: boolean;
}

/** Decodes a TranslateRequest; a malformed one becomes an EINVAL IommuError. */
export function decodeTranslateRequest(buf: Buffer): TranslateWireRequest | IommuError {
  try {
    const r = new Reader(buf);
    const req: TranslateWireRequest = { vmId: "", devId: 0, pasid: undefined, iovaLo: new Uint32Array(0), iovaHi: new Uint32Array(0), write: false };
    // Unpacked IOVAs (legal for repeated scalars) are gathered here; packed
    // ones, the normal encoding, go straight into typed arrays.
    let loose: number[] | undefined;
    while (r.pos < buf.length) {
      r.varint();
      const field = r.lo >>> 3;
      const wire = r.lo & 7;
      if (field === 1 && wire === WIRE_LEN) {
        r.varint();
        const end = r.pos + r.lo;
        if (end > buf.length) throw new Error("truncated vm_id");
        req.vmId = buf.toString("utf8", r.pos, end);
        r.pos = end;
      } else if (field === 2 && wire === WIRE_VARINT) {
        r.varint();
        req.devId = r.lo;
      } else if (field === 3 && wire === WIRE_VARINT) {
        r.varint();
        req.pasid = r.lo;
      } else if (field === 4 && wire === WIRE_LEN) {
        r.varint();
        const end = r.pos + r.lo;
        if (end > buf.length) throw new Error("truncated iovas");
        // Each varint ends with a byte below 0x80: that counts the values.
        let count = 0;
        for (let p = r.pos; p < end; p++) if (buf[p] < 0x80) count++;
        const lo = new Uint32Array(req.iovaLo.length + count);
        const hi = new Uint32Array(req.iovaHi.length + count);
        lo.set(req.iovaLo);
        hi.set(req.iovaHi);
        for (let i = req.iovaLo.length; r.pos < end; i++) {
          r.varint();
          lo[i] = r.lo;
          hi[i] = r.hi;
        }
        if (r.pos !== end) throw new Error("packed iovas overrun their length");
        req.iovaLo = lo;
        req.iovaHi = hi;
      } else if (field === 4 && wire === WIRE_VARINT) {
        r.varint();
        (loose ??= []).push(r.lo, r.hi);
      } else if (field === 5 && wire === WIRE_VARINT) {
        r.varint();
        req.write = r.lo !== 0 || r.hi !== 0;
      } else {
        r.skip(wire);
      }
    }
    if (loose !== undefined) {
      const n = req.iovaLo.length;
      const lo = new Uint32Array(n + loose.length / 2);
      const hi = new Uint32Array(n + loose.length / 2);
      lo.set(req.iovaLo);
      hi.set(req.iovaHi);
      for (let i = 0; i < loose.length / 2; i++) {
        lo[n + i] = loose[2 * i];
        hi[n + i] = loose[2 * i + 1];
      }
      req.iovaLo = lo;
      req.iovaHi = hi;
    }
    return req;
  } catch (e) {
    return rejectedRequest(e);
  }
}

class Writer {
  pos = 0;

  constructor(readonly buf: Uint8Array) {}

  u32(v: number): void {
    while (v > 0x7f) {
      this.buf[this.pos++] = (v & 0x7f) | 0x80;
      v >>>= 7;
    }
    this.buf[this.pos++] = v;
  }

  u64(lo: number, hi: number): void {
    while (hi !== 0 || lo > 0x7f) {
      this.buf[this.pos++] = (lo & 0x7f) | 0x80;
      lo = ((lo >>> 7) | (hi << 25)) >>> 0;
      hi >>>= 7;
    }
    this.buf[this.pos++] = lo;
  }

  bytes(data: Uint8Array): void {
    this.buf.set(data, this.pos);
    this.pos += data.length;
  }
}

const SCRATCH_BYTES_PER_ITEM = 10;
let scratch = new Uint8Array(64 * 1024);

/** Encodes a TranslateResponse from a translated batch and its request. */
export function encodeTranslateResponse(batch: DmaBatch, req: TranslateWireRequest): Buffer {
  const n = batch.count;
  if (scratch.length < n * SCRATCH_BYTES_PER_ITEM + 16) scratch = new Uint8Array(n * SCRATCH_BYTES_PER_ITEM * 2);
  const out = new Writer(new Uint8Array(n * 16 + batch.faults * 64 + 32));
  const packed = new Writer(scratch);
  const { addr, refs, fault } = batch;

  // 1: addresses (packed uint64); host addresses < 2^53 are exact doubles.
  for (let i = 0; i < n; i++) {
    const a = fault[i] === 0 ? addr[i] : 0;
    packed.u64(a >>> 0, Math.floor(a / 4294967296));
  }
  writePacked(out, 1, packed);
  // 2: memory_references (packed uint32)
  packed.pos = 0;
  for (let i = 0; i < n; i++) packed.u32(refs[i]);
  writePacked(out, 2, packed);
  // 3: faults (TranslationFault messages)
  if (batch.faults > 0) {
    const msg = new Writer(new Uint8Array(64));
    for (let i = 0; i < n; i++) {
      const reason = fault[i];
      if (reason === 0) continue;
      msg.pos = 0;
      if (i !== 0) {
        msg.u32(1 << 3);
        msg.u32(i);
      }
      msg.u32(2 << 3);
      msg.u32(reason);
      const name = Buffer.from(faultName(reason), "latin1");
      msg.u32((3 << 3) | WIRE_LEN);
      msg.u32(name.length);
      msg.bytes(name);
      if (req.iovaLo[i] !== 0 || req.iovaHi[i] !== 0) {
        msg.u32(4 << 3);
        msg.u64(req.iovaLo[i], req.iovaHi[i]);
      }
      out.u32((3 << 3) | WIRE_LEN);
      out.u32(msg.pos);
      out.bytes(msg.buf.subarray(0, msg.pos));
    }
  }
  // 4: iotlb_hits
  if (batch.hits !== 0) {
    out.u32(4 << 3);
    out.u32(batch.hits);
  }
  return Buffer.from(out.buf.buffer, 0, out.pos);
}

function writePacked(out: Writer, field: number, packed: Writer): void {
  if (packed.pos === 0) return;
  out.u32((field << 3) | WIRE_LEN);
  out.u32(packed.pos);
  out.bytes(packed.buf.subarray(0, packed.pos));
}
