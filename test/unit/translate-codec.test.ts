import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { TranslateRequestSchema, TranslateResponseSchema } from "../../gen/iommufd/v1/dma_pb.js";
import { DmaBatch } from "../../server/core/translate/dma-batch.js";
import { FAULT, faultName } from "../../server/core/translate/fault.js";
import { IommuError } from "../../server/core/errno.js";
import { decodeTranslateRequest, encodeTranslateResponse, type TranslateWireRequest } from "../../server/rpc/translate-codec.js";

// Translate's hand-written codec must agree with protobuf-es on every input.
const u64 = fc.bigInt({ min: 0n, max: (1n << 64n) - 1n });
const faultCodes = Object.values(FAULT);

describe("Translate wire codec (server/rpc/translate-codec.ts)", () => {
  it("decodes any TranslateRequest protobuf-es encodes, packed or not", () => {
    fc.assert(
      fc.property(fc.string(), fc.nat(), fc.option(fc.nat({ max: 0xfffff }), { nil: undefined }), fc.array(u64, { maxLength: 64 }), fc.boolean(), (vmId, devId, pasid, iovas, write) => {
        const bytes = Buffer.from(toBinary(TranslateRequestSchema, create(TranslateRequestSchema, { vmId, devId, pasid, iovas, write })));
        const req = decodeTranslateRequest(bytes) as TranslateWireRequest;
        expect(req).not.toBeInstanceOf(IommuError);
        expect([req.vmId, req.devId, req.pasid, req.write]).toEqual([vmId, devId, pasid, write]);
        expect(Array.from(req.iovaLo, (lo, i) => (BigInt(req.iovaHi[i]) << 32n) | BigInt(lo))).toEqual(iovas);
      }),
      { numRuns: 300, seed: 7 },
    );
  });

  it("encodes a response protobuf-es decodes to the batch's results", () => {
    fc.assert(
      fc.property(
        fc.array(fc.record({ iova: u64, addr: fc.nat({ max: 2 ** 40 }), refs: fc.nat({ max: 35 }), fault: fc.option(fc.constantFrom(...faultCodes), { nil: 0 }) }), { maxLength: 64 }),
        fc.nat({ max: 64 }),
        (accesses, hits) => {
          const batch = DmaBatch.fromIovas(accesses.map((a) => a.iova), false);
          accesses.forEach((a, i) => {
            batch.addr[i] = a.addr;
            batch.refs[i] = a.refs;
            if (a.fault !== 0) batch.recordFault(i, a.fault);
          });
          batch.hits = hits;
          const req = { vmId: "vm", devId: 1, pasid: undefined, iovaLo: batch.iovaLo, iovaHi: batch.iovaHi, write: false };
          const res = fromBinary(TranslateResponseSchema, encodeTranslateResponse(batch, req));
          expect(res.addresses).toEqual(accesses.map((a) => (a.fault === 0 ? BigInt(a.addr) : 0n)));
          expect(res.memoryReferences).toEqual(accesses.map((a) => a.refs));
          expect(res.iotlbHits).toBe(hits);
          const faults = accesses.flatMap((a, index) => (a.fault === 0 ? [] : [{ index, reason: a.fault, reasonName: faultName(a.fault), iova: a.iova }]));
          expect(res.faults.map(({ index, reason, reasonName, iova }) => ({ index, reason, reasonName, iova }))).toEqual(faults);
        },
      ),
      { numRuns: 300, seed: 11 },
    );
  });

  it("answers malformed bytes with an EINVAL IommuError, never a throw", () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 64 }), (bytes) => {
        const out = decodeTranslateRequest(Buffer.from(bytes));
        expect(out instanceof IommuError || typeof (out as TranslateWireRequest).vmId === "string").toBe(true);
      }),
      { numRuns: 2000, seed: 3 },
    );
    expect(decodeTranslateRequest(Buffer.from([0x22, 0x05, 0x80]))).toBeInstanceOf(IommuError);
  });
});
