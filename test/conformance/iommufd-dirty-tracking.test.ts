/**
 * Port of FIXTURE(iommufd_dirty_tracking) from tools/testing/selftests/iommu/iommufd.c (v6.17), all nine
 * FIXTURE_VARIANTs (guide §6).
 *
 * Not expressible: IOMMU_HWPT_SET_DIRTY_TRACKING, IOMMU_HWPT_GET_DIRTY_BITMAP and IOMMU_TEST_OP_DIRTY (no dirty
 * tracking RPCs), and MOCK_FLAGS_DEVICE_HUGE_IOVA (1 MiB mock pages): the *_huge variants bind the same device
 * as the others. The variants' buffer sizes only matter to get_dirty_bitmap*.
 */
import { describe, expect, it } from "vitest";
import type { VmMethods } from "../../client/client.js";
import { IOMMU_HW_CAP_DIRTY_TRACKING, MOCK_APERTURE_START, MOCK_PAGE_SIZE, MockVm, expectErrno, useTestServer, vmIdFor, withFixture } from "./helpers.js";

const server = useTestServer();

/** FIXTURE_VARIANT(iommufd_dirty_tracking) */
interface DirtyVariant {
  bufferSize: bigint;
  hugepages: boolean;
}

const KiB = 1024n;
const MiB = 1024n * KiB;
const VARIANTS: [string, DirtyVariant][] = [
  ["domain_dirty8k", { bufferSize: 8n * KiB, hugepages: false }],
  ["domain_dirty16k", { bufferSize: 16n * KiB, hugepages: false }],
  ["domain_dirty64k", { bufferSize: 64n * KiB, hugepages: false }],
  ["domain_dirty128k", { bufferSize: 128n * KiB, hugepages: false }],
  ["domain_dirty320k", { bufferSize: 320n * KiB, hugepages: false }],
  ["domain_dirty64M", { bufferSize: 64n * MiB, hugepages: false }],
  ["domain_dirty64M_huge", { bufferSize: 64n * MiB, hugepages: true }],
  ["domain_dirty128M", { bufferSize: 128n * MiB, hugepages: false }],
  ["domain_dirty128M_huge", { bufferSize: 128n * MiB, hugepages: true }],
];

/** guide §1.2: self->buffer (HUGEPAGE-aligned) at 2 MiB in a 256 MiB guest. */
const SELF_BUFFER = 0x200000n;
const DIRTY_GUEST_MEMORY = 0x10000000n;

/** FIXTURE(iommufd_dirty_tracking); the device id stands in for stdev_id and idev_id. */
interface DirtyFixture {
  vm: MockVm;
  v: VmMethods;
  ioasId: number;
  hwptId: number;
  idevId: number;
}

describe.each(VARIANTS)("iommufd_dirty_tracking (%s)", (variantName, variant) => {
  /** FIXTURE_SETUP(iommufd_dirty_tracking) */
  const setup = (test: string) => async (): Promise<DirtyFixture> => {
    // buffer_size < MOCK_PAGE_SIZE would SKIP: never the case for these variants
    expect(variant.bufferSize >= MOCK_PAGE_SIZE).toBe(true);
    const vm = await MockVm.open(server(), vmIdFor("dirty", variantName, test), DIRTY_GUEST_MEMORY);
    const { ioasId } = await vm.v.allocIoas();
    // Enable 1M mock IOMMU hugepages — left out: MOCK_FLAGS_DEVICE_HUGE_IOVA has no BindDevice counterpart.
    const { devId, hwptId } = await vm.mockDomain(ioasId);
    return { vm, v: vm.v, ioasId, hwptId, idevId: devId };
  };

  const testF = (test: string, body: (f: DirtyFixture) => Promise<void>) =>
    it(`${test} — kernel TEST_F(iommufd_dirty_tracking, ${test})`, () => withFixture(setup(test), body));

  testF("enforce_dirty", async ({ vm, v, ioasId, idevId }) => {
    // Regular case
    const hwptId = (await v.allocHwpt({ devId: idevId, ptId: ioasId, dirtyTracking: true })).hwptId;
    const stddev = await vm.mockDomain(hwptId);
    expect(stddev.hwptId).toBe(hwptId);
    await vm.mockDomainErr("EINVAL", hwptId, { noDirty: true });
    await v.unbindDevice({ devId: stddev.devId });
    await v.destroy({ id: hwptId });

    // IOMMU device does not support dirty tracking
    const { ioasId: ioasId2 } = await v.allocIoas();
    const noDirty = await vm.mockDomain(ioasId2, { noDirty: true });
    await expectErrno(v.allocHwpt({ devId: noDirty.devId, ptId: ioasId2, dirtyTracking: true }), "EOPNOTSUPP");
    await v.unbindDevice({ devId: noDirty.devId });
  });

  testF("set_dirty_tracking", async ({ vm, v, ioasId, idevId }) => {
    const hwptId = (await v.allocHwpt({ devId: idevId, ptId: ioasId, dirtyTracking: true })).hwptId;
    const stddev = await vm.mockDomain(hwptId);
    expect(stddev.hwptId).toBe(hwptId);
    // Left out: test_cmd_set_dirty_tracking(hwpt_id, true / false) (no IOMMU_HWPT_SET_DIRTY_TRACKING RPC).
    await v.unbindDevice({ devId: stddev.devId });
    await v.destroy({ id: hwptId });
  });

  testF("device_dirty_capability", async ({ vm, v, ioasId, idevId }) => {
    const hwptId = (await v.allocHwpt({ devId: idevId, ptId: ioasId })).hwptId;
    const stddev = await vm.mockDomain(hwptId);
    expect(stddev.hwptId).toBe(hwptId);
    const caps = (await v.hwInfo({ devId: idevId })).capabilities;
    expect(caps & IOMMU_HW_CAP_DIRTY_TRACKING).toBe(IOMMU_HW_CAP_DIRTY_TRACKING);
    await v.unbindDevice({ devId: stddev.devId });
    await v.destroy({ id: hwptId });
  });

  /** get_dirty_bitmap and get_dirty_bitmap_no_clear share everything the API can express. */
  const dirtyBitmapTest = async ({ vm, v, idevId }: DirtyFixture) => {
    const { ioasId } = await v.allocIoas();
    await vm.mapFixed(ioasId, SELF_BUFFER, variant.bufferSize, MOCK_APERTURE_START);
    // The first domain of this IOAS: the area is pinned now and must not fault.
    const hwptId = (await v.allocHwpt({ devId: idevId, ptId: ioasId, dirtyTracking: true })).hwptId;
    // Left out: SET_DIRTY_TRACKING and test_mock_dirty_bitmaps (IOMMU_TEST_OP_DIRTY + GET_DIRTY_BITMAP on an
    // aligned, a PAGE_SIZE-unaligned and a u64-unaligned bitmap).
    await v.destroy({ id: hwptId });
  };

  testF("get_dirty_bitmap", dirtyBitmapTest);
  testF("get_dirty_bitmap_no_clear", dirtyBitmapTest);
});
