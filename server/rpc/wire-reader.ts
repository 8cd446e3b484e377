/**
 * A protobuf wire-format reader for the hand-written codecs of the hot and
 * the bulky methods (translate-codec.ts, invalidate-codec.ts): varints as
 * u32 halves, no BigInt. Throws on malformed input; the codecs turn that
 * into EINVAL.
 */

export const WIRE_VARINT = 0;
export const WIRE_FIXED64 = 1;
export const WIRE_LEN = 2;
export const WIRE_FIXED32 = 5;

export class Reader {
  pos = 0;
  /** The last varint read, as u32 halves. */
  lo = 0;
  hi = 0;

  constructor(readonly buf: Buffer) {}

  /** Reads a varint into (lo, hi); throws on a truncated or over-long one. */
  varint(): void {
    const buf = this.buf;
    let lo = 0;
    let hi = 0;
    let b = 0;
    for (let shift = 0; shift < 28; shift += 7) {
      b = buf[this.pos++];
      if (b === undefined) throw new Error("truncated varint");
      lo |= (b & 0x7f) << shift;
      if (b < 0x80) {
        this.lo = lo >>> 0;
        this.hi = 0;
        return;
      }
    }
    b = buf[this.pos++];
    if (b === undefined) throw new Error("truncated varint");
    lo |= (b & 0x0f) << 28;
    hi = (b & 0x7f) >> 4;
    if (b >= 0x80) {
      for (let shift = 3; ; shift += 7) {
        if (shift > 31) throw new Error("varint longer than 10 bytes");
        b = buf[this.pos++];
        if (b === undefined) throw new Error("truncated varint");
        hi |= (b & 0x7f) << shift;
        if (b < 0x80) break;
      }
    }
    this.lo = lo >>> 0;
    this.hi = hi >>> 0;
  }

  skip(wireType: number): void {
    switch (wireType) {
      case WIRE_VARINT:
        this.varint();
        break;
      case WIRE_FIXED64:
        this.pos += 8;
        break;
      case WIRE_LEN:
        this.varint();
        this.pos += this.lo;
        break;
      case WIRE_FIXED32:
        this.pos += 4;
        break;
      default:
        throw new Error(`unsupported wire type ${wireType}`);
    }
    if (this.pos > this.buf.length) throw new Error("truncated field");
  }
}
