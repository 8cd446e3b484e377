/**
 * The IOAS ioctls over gRPC (iommufd-semantics.md §1.1, §3.2–§3.8; api.md IOAS):
 * ids, GetIovaRanges, MapIoas, UnmapIoas, CopyIoas, AllowIovas,
 * SetOption/GetOption, each with its check order, and "nothing half-changes".
 */
import { describe, expect, it } from "vitest";
import { IommuOption } from "../../gen/iommufd/v1/ioas_pb.js";
import {
  bind,
  expectFail,
  expectFailUnchanged,
  ioas,
  map,
  mapReq,
  MIB,
  MOCK_APERTURE_LAST,
  MOCK_APERTURE_START,
  MOCK_IO_PAGE_SIZE,
  nextId,
  objectCount,
  PAGE,
  pagingHwpt,
  ranges,
  serverEnv,
  U64_MAX,
  unmapAllBytes,
  type Vm,
} from "./helpers.js";

const env = serverEnv("ioas");

const FRESH = { ranges: [[0n, U64_MAX]], alignment: 1n };
const MOCK_DOMAIN_RANGES = { ranges: [[MOCK_APERTURE_START, MOCK_APERTURE_LAST]], alignment: MOCK_IO_PAGE_SIZE };

/** A mock VM with an IOAS that has a (mock) paging domain: aperture and alignment 2048 apply. */
async function mockIoasWithDomain(vm: Vm) {
  const dev = await bind(vm);
  const ioasId = await ioas(vm);
  const hwpt = await pagingHwpt(vm, dev, ioasId);
  return { dev, ioasId, hwpt };
}

describe("object ids (iommufd-semantics.md §1.1)", () => {
  it("are the lowest free id >= 1 in one id space shared by IOASes, devices and HWPTs, reused after destroy", async () => {
    const vm = await env.mockVm();
    expect(await ioas(vm)).toBe(1);
    const dev = await bind(vm);
    expect(dev).toBe(2);
    expect(await ioas(vm)).toBe(3);
    expect(await pagingHwpt(vm, dev, 3)).toBe(4);
    await vm.v.destroy({ id: 1 });
    expect(await ioas(vm)).toBe(1);
    await vm.v.destroy({ id: 4 });
    await vm.v.destroy({ id: 3 });
    await vm.v.destroy({ id: 1 });
    expect(await ioas(vm)).toBe(1);
    expect(await ioas(vm)).toBe(3);
    expect(await ioas(vm)).toBe(4);
    expect(await ioas(vm)).toBe(5);
  });

  it("Destroy of id 0, a missing id or an already destroyed id is NOT_FOUND/ENOENT (§3.1)", async () => {
    const vm = await env.mockVm();
    const id = await ioas(vm);
    await expectFail(vm.v.destroy({ id: 0 }), "ENOENT");
    await expectFail(vm.v.destroy({ id: 77 }), "ENOENT");
    await vm.v.destroy({ id });
    await expectFail(vm.v.destroy({ id }), "ENOENT");
  });

  it("Destroy of an IOAS with areas but no HWPT succeeds (§1.2: only HWPTs hold an IOAS)", async () => {
    const vm = await env.mockVm();
    const id = await ioas(vm);
    await map(vm, id);
    await vm.v.destroy({ id });
    expect(await objectCount(vm)).toBe(0);
  });
});

describe("GetIovaRanges (iommufd-semantics.md §3.3)", () => {
  it("a fresh IOAS has one range [0, U64_MAX] and alignment 1", async () => {
    const vm = await env.vtdVm();
    expect(await ranges(vm, await ioas(vm))).toEqual(FRESH);
  });

  it("an unknown IOAS, or an id of another type, is NOT_FOUND/ENOENT", async () => {
    const vm = await env.mockVm();
    const dev = await bind(vm);
    await expectFail(vm.v.getIovaRanges({ ioasId: 9 }), "ENOENT");
    await expectFail(vm.v.getIovaRanges({ ioasId: 0 }), "ENOENT");
    await expectFail(vm.v.getIovaRanges({ ioasId: dev }), "ENOENT");
  });

  it("a mock paging HWPT shrinks the range to the mock aperture and raises the alignment to 2048 even with no device attached; destroying it restores them (§8.3, §10.4)", async () => {
    const vm = await env.mockVm();
    const { ioasId, hwpt } = await mockIoasWithDomain(vm);
    expect(await ranges(vm, ioasId)).toEqual(MOCK_DOMAIN_RANGES);
    await vm.v.destroy({ id: hwpt });
    expect(await ranges(vm, ioasId)).toEqual(FRESH);
  });
});

describe("MapIoas (iommufd-semantics.md §3.5)", () => {
  it("checks EOVERFLOW (iova or length U64_MAX) before EINVAL (neither readable nor writeable) before ENOENT (IOAS lookup)", async () => {
    const vm = await env.mockVm();
    await expectFail(vm.v.mapIoas({ ioasId: 99, userVa: 0n, length: PAGE, iova: U64_MAX }), "EOVERFLOW");
    await expectFail(vm.v.mapIoas({ ioasId: 99, userVa: 0n, length: U64_MAX }), "EOVERFLOW");
    await expectFail(vm.v.mapIoas({ ioasId: 99, userVa: 0n, length: PAGE }), "EINVAL");
    await expectFail(vm.v.mapIoas({ ioasId: 99, userVa: 0n, length: PAGE, readable: true }), "ENOENT");
  });

  it("a device id is not an IOAS: NOT_FOUND/ENOENT", async () => {
    const vm = await env.mockVm();
    const dev = await bind(vm);
    await expectFail(vm.v.mapIoas(mapReq(dev)), "ENOENT");
  });

  it("length 0 is EINVAL; user_va + length overflowing is EOVERFLOW", async () => {
    const vm = await env.mockVm();
    const id = await ioas(vm);
    await expectFail(vm.v.mapIoas(mapReq(id, { length: 0n })), "EINVAL");
    await expectFail(vm.v.mapIoas(mapReq(id, { userVa: U64_MAX - PAGE + 1n, length: 2n * PAGE })), "EOVERFLOW");
  });

  it("automatic IOVAs: never 0, the lowest free aligned hole from PAGE_SIZE on, and the response carries the IOVA", async () => {
    const vm = await env.mockVm();
    const id = await ioas(vm);
    expect(await map(vm, id)).toBe(PAGE);
    expect(await map(vm, id)).toBe(2n * PAGE);
    await vm.v.unmapIoas({ ioasId: id, iova: PAGE, length: PAGE });
    expect(await map(vm, id)).toBe(PAGE);
  });

  it("automatic IOVAs land inside a domain's aperture", async () => {
    const vm = await env.mockVm();
    const { ioasId } = await mockIoasWithDomain(vm);
    expect(await map(vm, ioasId)).toBe(MOCK_APERTURE_START);
  });

  it("automatic allocation of length >= 2^63 is EOVERFLOW", async () => {
    const vm = await env.mockVm();
    const id = await ioas(vm);
    await expectFail(vm.v.mapIoas(mapReq(id, { length: 1n << 63n })), "EOVERFLOW");
  });

  it("a user_va less aligned than the IOAS alignment is EINVAL", async () => {
    const vm = await env.mockVm();
    const { ioasId } = await mockIoasWithDomain(vm);
    await expectFail(vm.v.mapIoas(mapReq(ioasId, { userVa: 0x400n, length: PAGE })), "EINVAL");
  });

  it("no hole left in the allowed ranges is RESOURCE_EXHAUSTED/ENOSPC, which is not a quota failure", async () => {
    const vm = await env.mockVm();
    const id = await ioas(vm);
    await vm.v.allowIovas({ ioasId: id, ranges: [{ start: 0x100000n, last: 0x101fffn }] });
    expect(await map(vm, id)).toBe(0x100000n);
    expect(await map(vm, id)).toBe(0x101000n);
    const e = await expectFail(vm.v.mapIoas(mapReq(id)), "ENOSPC");
    expect(e.quotaFailure).toBeUndefined();
  });

  it("a length that is not a multiple of the IOAS alignment is EINVAL", async () => {
    const vm = await env.mockVm();
    const { ioasId } = await mockIoasWithDomain(vm);
    await expectFail(vm.v.mapIoas(mapReq(ioasId, { length: 1024n })), "EINVAL");
    await expectFail(vm.v.mapIoas(mapReq(ioasId, { length: 1024n, iova: MOCK_APERTURE_START })), "EINVAL");
    // 2048, the mock's page size, is fine.
    expect(await map(vm, ioasId, { length: MOCK_IO_PAGE_SIZE, iova: MOCK_APERTURE_START })).toBe(MOCK_APERTURE_START);
  });

  it("FIXED_IOVA: the response echoes the IOVA; misaligned iova is EINVAL; iova + length wrapping is EOVERFLOW", async () => {
    const vm = await env.mockVm();
    const fresh = await ioas(vm);
    expect(await map(vm, fresh, { iova: 0n })).toBe(0n);
    await expectFail(vm.v.mapIoas(mapReq(fresh, { iova: U64_MAX - PAGE + 1n, length: 2n * PAGE })), "EOVERFLOW");
    const { ioasId } = await mockIoasWithDomain(vm);
    await expectFail(vm.v.mapIoas(mapReq(ioasId, { iova: MOCK_APERTURE_START + 0x400n })), "EINVAL");
  });

  it("the in-page offset of user_va must respect the IOAS alignment, for FIXED_IOVA too (EINVAL)", async () => {
    const vm = await env.mockVm();
    const { ioasId } = await mockIoasWithDomain(vm);
    await expectFailUnchanged(vm, { ioas: [ioasId] }, () => vm.v.mapIoas(mapReq(ioasId, { userVa: 0x400n, iova: MOCK_APERTURE_START })), "EINVAL");
    expect(await map(vm, ioasId, { userVa: 0x800n, iova: MOCK_APERTURE_START })).toBe(MOCK_APERTURE_START);
  });

  it("FIXED_IOVA into a reserved range (outside the domain aperture) is EINVAL", async () => {
    const vm = await env.mockVm();
    const { ioasId } = await mockIoasWithDomain(vm);
    await expectFail(vm.v.mapIoas(mapReq(ioasId, { iova: 0x1000n })), "EINVAL");
    await expectFail(vm.v.mapIoas(mapReq(ioasId, { iova: MOCK_APERTURE_LAST + 1n })), "EINVAL");
    await expectFail(vm.v.mapIoas(mapReq(ioasId, { iova: MOCK_APERTURE_START - PAGE, length: 2n * PAGE })), "EINVAL");
  });

  it("FIXED_IOVA over an existing area is ALREADY_EXISTS/EEXIST and the existing area stays as it was", async () => {
    const vm = await env.mockVm();
    const id = await ioas(vm);
    await map(vm, id, { iova: 0x10000n, length: 4n * PAGE });
    await expectFailUnchanged(vm, { ioas: [id] }, () => vm.v.mapIoas(mapReq(id, { iova: 0x13000n, length: 2n * PAGE })), "EEXIST");
    await expectFail(vm.v.mapIoas(mapReq(id, { iova: 0xf000n, length: 2n * PAGE })), "EEXIST");
    expect(await unmapAllBytes(vm, id)).toBe(4n * PAGE);
  });

  it("user_va + length beyond guest RAM is OUT_OF_RANGE/EFAULT at map time when the IOAS has a domain, and maps nothing (api.md IOAS)", async () => {
    const vm = await env.mockVm({}, 16n * MIB);
    const { ioasId } = await mockIoasWithDomain(vm);
    await expectFailUnchanged(vm, { ioas: [ioasId] }, () => vm.v.mapIoas(mapReq(ioasId, { userVa: 16n * MIB - PAGE, length: 2n * PAGE, iova: MOCK_APERTURE_START })), "EFAULT");
    await expectFail(vm.v.mapIoas(mapReq(ioasId, { userVa: 16n * MIB, length: PAGE })), "EFAULT");
    // Nothing was left behind at the IOVA.
    await expectFail(vm.v.unmapIoas({ ioasId, iova: MOCK_APERTURE_START, length: 2n * PAGE }), "ENOENT");
    expect(await map(vm, ioasId, { userVa: 16n * MIB - PAGE, length: PAGE, iova: MOCK_APERTURE_START })).toBe(MOCK_APERTURE_START);
  });

  it("without a domain the EFAULT is deferred: the AllocHwpt that adds the first domain fails with EFAULT and changes nothing", async () => {
    const vm = await env.vtdVm({}, 16n * MIB);
    const dev = await bind(vm);
    const id = await ioas(vm);
    const iova = await map(vm, id, { userVa: 16n * MIB - PAGE, length: 2n * PAGE });
    await expectFailUnchanged(vm, { ioas: [id] }, () => vm.v.allocHwpt({ devId: dev, ptId: id }), "EFAULT");
    await expectFailUnchanged(vm, { ioas: [id] }, () => vm.v.allocHwpt({ devId: dev, ptId: id, nestParent: true }), "EFAULT");
    // The IOAS holds no HWPT reference: it can still be destroyed... after fixing the area the HWPT is allocated.
    await vm.v.unmapIoas({ ioasId: id, iova, length: 2n * PAGE });
    await pagingHwpt(vm, dev, id);
  });

  it("without a domain the EFAULT is deferred: the AttachDevice that creates an automatic domain fails with EFAULT and changes nothing", async () => {
    const vm = await env.mockVm({}, 32n * MIB);
    const dev = await bind(vm);
    const id = await ioas(vm);
    // A FIXED IOVA inside the mock aperture, so that only the pin can fail.
    await map(vm, id, { userVa: 32n * MIB - PAGE, length: 2n * PAGE, iova: MOCK_APERTURE_START });
    await expectFailUnchanged(vm, { ioas: [id] }, () => vm.v.attachDevice({ devId: dev, ptId: id }), "EFAULT");
    // The device is still detached: after the area is fixed it attaches, getting the id that failed.
    const next = await nextId(vm);
    await vm.v.unmapIoas({ ioasId: id, iova: MOCK_APERTURE_START, length: 2n * PAGE });
    expect((await vm.v.attachDevice({ devId: dev, ptId: id })).hwptId).toBe(next);
  });
});

describe("UnmapIoas (iommufd-semantics.md §3.7)", () => {
  it("looks the IOAS up first: an unknown IOAS is ENOENT whatever iova and length say", async () => {
    const vm = await env.mockVm();
    await expectFail(vm.v.unmapIoas({ ioasId: 5, iova: U64_MAX, length: U64_MAX }), "ENOENT");
    await expectFail(vm.v.unmapIoas({ ioasId: 5, iova: 0n, length: 0n }), "ENOENT");
  });

  it("iova 0, length U64_MAX unmaps everything and returns the bytes; an empty IOAS gives 0", async () => {
    const vm = await env.mockVm();
    const id = await ioas(vm);
    expect(await unmapAllBytes(vm, id)).toBe(0n);
    await map(vm, id, { length: 3n * PAGE });
    await map(vm, id, { length: 5n * PAGE, iova: 0x100000n });
    expect(await unmapAllBytes(vm, id)).toBe(8n * PAGE);
    expect(await unmapAllBytes(vm, id)).toBe(0n);
  });

  it("iova or length U64_MAX (other than the unmap-all pair) is EOVERFLOW; length 0 is EINVAL; iova + length - 1 wrapping is EOVERFLOW", async () => {
    const vm = await env.mockVm();
    const id = await ioas(vm);
    await expectFail(vm.v.unmapIoas({ ioasId: id, iova: PAGE, length: U64_MAX }), "EOVERFLOW");
    await expectFail(vm.v.unmapIoas({ ioasId: id, iova: U64_MAX, length: PAGE }), "EOVERFLOW");
    await expectFail(vm.v.unmapIoas({ ioasId: id, iova: PAGE, length: 0n }), "EINVAL");
    await expectFail(vm.v.unmapIoas({ ioasId: id, iova: U64_MAX - PAGE, length: 2n * PAGE }), "EOVERFLOW");
  });

  it("a range with no area is NOT_FOUND/ENOENT", async () => {
    const vm = await env.mockVm();
    const id = await ioas(vm);
    await expectFail(vm.v.unmapIoas({ ioasId: id, iova: PAGE, length: PAGE }), "ENOENT");
    await map(vm, id, { iova: 0x10000n });
    await expectFail(vm.v.unmapIoas({ ioasId: id, iova: 0x11000n, length: PAGE }), "ENOENT");
  });

  it("areas are never split: a range covering part of an area is ENOENT and unmaps nothing, not even the areas it covers whole", async () => {
    const vm = await env.mockVm();
    const id = await ioas(vm);
    await map(vm, id, { iova: 0x10000n, length: 2n * PAGE });
    await map(vm, id, { iova: 0x12000n, length: 2n * PAGE });
    await expectFail(vm.v.unmapIoas({ ioasId: id, iova: 0x10000n, length: 3n * PAGE }), "ENOENT");
    await expectFail(vm.v.unmapIoas({ ioasId: id, iova: 0x11000n, length: PAGE }), "ENOENT");
    expect(await unmapAllBytes(vm, id)).toBe(4n * PAGE);
  });

  it("a range covering several whole areas unmaps them all and returns their total length", async () => {
    const vm = await env.mockVm();
    const id = await ioas(vm);
    await map(vm, id, { iova: 0x10000n, length: 2n * PAGE });
    await map(vm, id, { iova: 0x20000n, length: 3n * PAGE });
    await map(vm, id, { iova: 0x40000n, length: PAGE });
    expect((await vm.v.unmapIoas({ ioasId: id, iova: 0x8000n, length: 0x20000n })).length).toBe(5n * PAGE);
    expect(await unmapAllBytes(vm, id)).toBe(PAGE);
  });
});

describe("CopyIoas (iommufd-semantics.md §3.6)", () => {
  async function twoIoas(vm: Vm) {
    const src = await ioas(vm);
    const dst = await ioas(vm);
    await map(vm, src, { iova: 0x10000n, length: 4n * PAGE, userVa: 0x200000n });
    return { src, dst };
  }

  it("maps the pages behind the source range into the destination; dst_iova is echoed or allocated", async () => {
    const vm = await env.mockVm();
    const { src, dst } = await twoIoas(vm);
    expect((await vm.v.copyIoas({ dstIoasId: dst, srcIoasId: src, srcIova: 0x11000n, length: 2n * PAGE, dstIova: 0x50000n, readable: true })).dstIova).toBe(0x50000n);
    const auto = (await vm.v.copyIoas({ dstIoasId: dst, srcIoasId: src, srcIova: 0x10000n, length: PAGE, readable: true, writeable: true })).dstIova;
    expect(auto).not.toBe(0n);
    expect(await unmapAllBytes(vm, dst)).toBe(3n * PAGE);
  });

  it("a source range over several contiguous areas is copied as one", async () => {
    const vm = await env.mockVm();
    const { src, dst } = await twoIoas(vm);
    await map(vm, src, { iova: 0x14000n, length: PAGE, userVa: 0x900000n });
    await vm.v.copyIoas({ dstIoasId: dst, srcIoasId: src, srcIova: 0x12000n, length: 3n * PAGE, dstIova: 0x12000n, readable: true });
    expect(await unmapAllBytes(vm, dst)).toBe(3n * PAGE);
  });

  it("checks EOVERFLOW (length, src_iova or dst_iova U64_MAX) before EINVAL (no R/W) before ENOENT (source IOAS)", async () => {
    const vm = await env.mockVm();
    await expectFail(vm.v.copyIoas({ dstIoasId: 8, srcIoasId: 9, srcIova: 0n, length: U64_MAX }), "EOVERFLOW");
    await expectFail(vm.v.copyIoas({ dstIoasId: 8, srcIoasId: 9, srcIova: U64_MAX, length: PAGE }), "EOVERFLOW");
    await expectFail(vm.v.copyIoas({ dstIoasId: 8, srcIoasId: 9, srcIova: 0n, length: PAGE, dstIova: U64_MAX }), "EOVERFLOW");
    await expectFail(vm.v.copyIoas({ dstIoasId: 8, srcIoasId: 9, srcIova: 0n, length: PAGE }), "EINVAL");
    await expectFail(vm.v.copyIoas({ dstIoasId: 8, srcIoasId: 9, srcIova: 0n, length: PAGE, readable: true }), "ENOENT");
  });

  it("checks length 0 (EINVAL) on the source, before the destination lookup", async () => {
    const vm = await env.mockVm();
    const { src } = await twoIoas(vm);
    await expectFail(vm.v.copyIoas({ dstIoasId: 99, srcIoasId: src, srcIova: 0x10000n, length: 0n, readable: true }), "EINVAL");
  });

  it("a source range not fully covered by areas is ENOENT; an unknown destination is ENOENT", async () => {
    const vm = await env.mockVm();
    const { src, dst } = await twoIoas(vm);
    await expectFail(vm.v.copyIoas({ dstIoasId: dst, srcIoasId: src, srcIova: 0x12000n, length: 4n * PAGE, readable: true }), "ENOENT");
    await expectFail(vm.v.copyIoas({ dstIoasId: dst, srcIoasId: src, srcIova: 0x0n, length: PAGE, readable: true }), "ENOENT");
    await expectFail(vm.v.copyIoas({ dstIoasId: 99, srcIoasId: src, srcIova: 0x10000n, length: PAGE, readable: true }), "ENOENT");
    expect(await unmapAllBytes(vm, dst)).toBe(0n);
  });

  it("applies the MAP placement rules on the destination: FIXED over an area is EEXIST and changes nothing", async () => {
    const vm = await env.mockVm();
    const { src, dst } = await twoIoas(vm);
    await map(vm, dst, { iova: 0x30000n });
    await expectFailUnchanged(
      vm,
      { ioas: [src, dst] },
      () => vm.v.copyIoas({ dstIoasId: dst, srcIoasId: src, srcIova: 0x10000n, length: 2n * PAGE, dstIova: 0x2f000n, readable: true }),
      "EEXIST",
    );
    expect(await unmapAllBytes(vm, dst)).toBe(PAGE);
  });

  it("copying read-only pages as WRITEABLE is PERMISSION_DENIED/EPERM (§9: MAP WRITEABLE on read-only memory)", async () => {
    const vm = await env.mockVm();
    const src = await ioas(vm);
    const dst = await ioas(vm);
    await map(vm, src, { iova: 0x10000n, readable: true, writeable: false });
    await expectFailUnchanged(vm, { ioas: [dst] }, () => vm.v.copyIoas({ dstIoasId: dst, srcIoasId: src, srcIova: 0x10000n, length: PAGE, readable: true, writeable: true }), "EPERM");
    await vm.v.copyIoas({ dstIoasId: dst, srcIoasId: src, srcIova: 0x10000n, length: PAGE, readable: true });
    expect(await unmapAllBytes(vm, dst)).toBe(PAGE);
  });
});

describe("AllowIovas (iommufd-semantics.md §3.4)", () => {
  it("an unknown IOAS is ENOENT", async () => {
    const vm = await env.mockVm();
    await expectFail(vm.v.allowIovas({ ioasId: 3, ranges: [] }), "ENOENT");
  });

  it("start >= last is EINVAL (a one-byte range included); ranges overlapping each other are EINVAL", async () => {
    const vm = await env.mockVm();
    const id = await ioas(vm);
    await expectFail(vm.v.allowIovas({ ioasId: id, ranges: [{ start: 0x2000n, last: 0x1000n }] }), "EINVAL");
    await expectFail(vm.v.allowIovas({ ioasId: id, ranges: [{ start: 0x2000n, last: 0x2000n }] }), "EINVAL");
    await expectFail(
      vm.v.allowIovas({
        ioasId: id,
        ranges: [
          { start: 0x10000n, last: 0x1ffffn },
          { start: 0x1f000n, last: 0x2ffffn },
        ],
      }),
      "EINVAL",
    );
  });

  it("restricts automatic IOVA allocation; an empty list lifts the restriction", async () => {
    const vm = await env.mockVm();
    const id = await ioas(vm);
    await vm.v.allowIovas({ ioasId: id, ranges: [{ start: 0x400000n, last: 0x7fffffn }] });
    expect(await map(vm, id)).toBe(0x400000n);
    await vm.v.allowIovas({ ioasId: id, ranges: [] });
    expect(await map(vm, id)).toBe(PAGE);
  });

  it("a range intersecting a reserved range is FAILED_PRECONDITION/EADDRINUSE and the old list is kept", async () => {
    const vm = await env.mockVm();
    const { ioasId } = await mockIoasWithDomain(vm);
    await vm.v.allowIovas({ ioasId, ranges: [{ start: 0x2000000n, last: 0x2ffffffn }] });
    await expectFail(vm.v.allowIovas({ ioasId, ranges: [{ start: 0x1000n, last: 0x2000000n }] }), "EADDRINUSE");
    expect(await map(vm, ioasId)).toBe(0x2000000n);
  });

  it("a domain whose aperture would reserve an allowed range cannot be added: AllocHwpt is EADDRINUSE and changes nothing", async () => {
    const vm = await env.mockVm();
    const dev = await bind(vm);
    const id = await ioas(vm);
    await vm.v.allowIovas({ ioasId: id, ranges: [{ start: 0x1000n, last: 0x1fffn }] });
    await expectFailUnchanged(vm, { ioas: [id] }, () => vm.v.allocHwpt({ devId: dev, ptId: id }), "EADDRINUSE");
    await expectFailUnchanged(vm, { ioas: [id] }, () => vm.v.attachDevice({ devId: dev, ptId: id }), "EADDRINUSE");
  });
});

describe("SetOption / GetOption (iommufd-semantics.md §3.8; api.md Fine points)", () => {
  it("checks the option (EOPNOTSUPP) before the IOAS lookup (ENOENT) before the value (EINVAL)", async () => {
    const vm = await env.mockVm();
    const id = await ioas(vm);
    await expectFail(vm.v.setOption({ option: IommuOption.UNSPECIFIED, objectId: 99, value: 7n }), "EOPNOTSUPP");
    await expectFail(vm.v.setOption({ option: 42 as IommuOption, objectId: 99, value: 7n }), "EOPNOTSUPP");
    await expectFail(vm.v.getOption({ option: IommuOption.UNSPECIFIED, objectId: 99 }), "EOPNOTSUPP");
    await expectFail(vm.v.setOption({ option: IommuOption.HUGE_PAGES, objectId: 99, value: 7n }), "ENOENT");
    await expectFail(vm.v.setOption({ option: IommuOption.HUGE_PAGES, objectId: id, value: 7n }), "EINVAL");
  });

  it("HUGE_PAGES takes an IOAS id: 0, missing ids and other objects are ENOENT", async () => {
    const vm = await env.mockVm();
    const dev = await bind(vm);
    await expectFail(vm.v.getOption({ option: IommuOption.HUGE_PAGES, objectId: 0 }), "ENOENT");
    await expectFail(vm.v.getOption({ option: IommuOption.HUGE_PAGES, objectId: 9 }), "ENOENT");
    await expectFail(vm.v.getOption({ option: IommuOption.HUGE_PAGES, objectId: dev }), "ENOENT");
    await expectFail(vm.v.setOption({ option: IommuOption.HUGE_PAGES, objectId: dev, value: 0n }), "ENOENT");
  });

  it("HUGE_PAGES defaults to 1; SET answers the value now in force; 0 raises the alignment to 4096 and 1 restores it", async () => {
    const vm = await env.mockVm();
    const id = await ioas(vm);
    expect((await vm.v.getOption({ option: IommuOption.HUGE_PAGES, objectId: id })).value).toBe(1n);
    expect((await vm.v.setOption({ option: IommuOption.HUGE_PAGES, objectId: id, value: 0n })).value).toBe(0n);
    expect((await vm.v.getOption({ option: IommuOption.HUGE_PAGES, objectId: id })).value).toBe(0n);
    expect(await ranges(vm, id)).toEqual({ ranges: [[0n, U64_MAX]], alignment: PAGE });
    await expectFail(vm.v.mapIoas(mapReq(id, { length: 2048n })), "EINVAL");
    expect((await vm.v.setOption({ option: IommuOption.HUGE_PAGES, objectId: id, value: 1n })).value).toBe(1n);
    expect(await ranges(vm, id)).toEqual(FRESH);
  });

  it("a value other than 0 or 1 is EINVAL and changes nothing", async () => {
    const vm = await env.mockVm();
    const id = await ioas(vm);
    await expectFailUnchanged(vm, { ioas: [id] }, () => vm.v.setOption({ option: IommuOption.HUGE_PAGES, objectId: id, value: 2n }), "EINVAL");
    expect((await vm.v.getOption({ option: IommuOption.HUGE_PAGES, objectId: id })).value).toBe(1n);
  });

  it("HUGE_PAGES 0 with areas not aligned to 4096 is EADDRINUSE and changes nothing", async () => {
    const vm = await env.mockVm();
    const id = await ioas(vm);
    await map(vm, id, { iova: 0x10000n, length: 0x800n });
    await expectFailUnchanged(vm, { ioas: [id] }, () => vm.v.setOption({ option: IommuOption.HUGE_PAGES, objectId: id, value: 0n }), "EADDRINUSE");
    expect((await vm.v.getOption({ option: IommuOption.HUGE_PAGES, objectId: id })).value).toBe(1n);
  });

  it("HUGE_PAGES 0 while domains already have pages mapped is EINVAL (iopt_disable_large_pages) and changes nothing", async () => {
    const vm = await env.vtdVm();
    const dev = await bind(vm);
    const id = await ioas(vm);
    await pagingHwpt(vm, dev, id);
    await map(vm, id);
    await expectFailUnchanged(vm, { ioas: [id] }, () => vm.v.setOption({ option: IommuOption.HUGE_PAGES, objectId: id, value: 0n }), "EINVAL");
    expect((await vm.v.getOption({ option: IommuOption.HUGE_PAGES, objectId: id })).value).toBe(1n);
  });
});
