import { describe, expect, it } from "vitest";
import { rawHwptData, rawInvalidations, vtdS1Data } from "../../client/user-data.js";

describe("client/user-data: raw kernel encodings", () => {
  it("encodes struct iommu_hwpt_vtd_s1 (24 bytes: flags u64, pgtbl_addr u64, addr_width u32, __reserved u32)", () => {
    const raw = rawHwptData({ kind: "vtd_s1", sre: false, eafe: true, wpe: true, pgtblAddr: 0x12345000n, addrWidth: 57 });
    expect(raw).toMatchObject({ case: "raw", value: { dataType: 1 } });
    const bytes = (raw as { value: { data: Uint8Array } }).value.data;
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    expect(bytes.length).toBe(24);
    expect(view.getBigUint64(0, true)).toBe(0b110n);
    expect(view.getBigUint64(8, true)).toBe(0x12345000n);
    expect(view.getUint32(16, true)).toBe(57);
    expect(view.getUint32(20, true)).toBe(0);
  });

  it("encodes VT-d invalidation entries (24 bytes each: addr, npages, flags LEAF, __reserved)", () => {
    const raw = rawInvalidations({ kind: "vtd_s1", entries: [{ addr: 0x5000n, npages: 3n, leaf: true }, { addr: 0n, npages: 1n, leaf: false }] });
    const value = (raw as { value: { dataType: number; entryLen: number; entryNum: number; data: Uint8Array } }).value;
    expect([value.dataType, value.entryLen, value.entryNum, value.data.length]).toEqual([0, 24, 2, 48]);
    const view = new DataView(value.data.buffer, value.data.byteOffset);
    expect([view.getBigUint64(0, true), view.getBigUint64(8, true), view.getUint32(16, true), view.getUint32(40, true)]).toEqual([0x5000n, 3n, 1, 0]);
  });

  it("builds the typed VT-d case with 48-bit defaults", () => {
    expect(vtdS1Data(0x1000n)).toEqual({ case: "vtdS1", value: { pgtblAddr: 0x1000n, addrWidth: 48, sre: false, eafe: false, wpe: false } });
  });
});
