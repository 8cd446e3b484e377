import { fail } from "../../errno.js";
import type { IovaRange } from "../../iova.js";
import type { DeviceInfo, HwptAllocFlags, IommuDomain, IommuDriver, IommuProt, PagingDomain, UserData } from "../driver.js";

/**
 * The selftest mock IOMMU (drivers/iommu/iommufd/selftest.c, iommufd_test.h):
 * what the kernel's own iommufd selftests run against, so that their cases can
 * be ported one to one.
 */

/** MOCK_APERTURE_START / MOCK_APERTURE_LAST */
export const MOCK_APERTURE: IovaRange = { start: 1n << 24n, last: (1n << 31n) - 1n };
/** MOCK_IO_PAGE_SIZE: PAGE_SIZE / 2, so the IOAS alignment becomes 2048. */
export const MOCK_IO_PAGE_SIZE = 2048n;
/** MOCK_PASID_WIDTH */
export const MOCK_PASID_WIDTH = 20;
/** The PASID whose replace the mock fails once with ENOMEM (mock_domain_set_dev_pasid_nop()). */
export const IOMMU_TEST_PASID_FAKE_ERROR = 1024;

/** struct mock_iommu_domain: a paging domain with the selftest geometry. */
class MockPagingDomain implements PagingDomain {
  readonly type = "paging";
  readonly aperture = MOCK_APERTURE;
  readonly pgsizeMin = MOCK_IO_PAGE_SIZE;

  constructor(
    readonly dirtyTracking: boolean,
    readonly nestParent: boolean,
  ) {}

  map(_iova: bigint, _hostAddr: bigint, _length: bigint, _prot: IommuProt, _largePages: boolean): void {}

  unmap(_iova: bigint, _length: bigint): void {}
}

export class MockDriver implements IommuDriver {
  readonly pasidWidth = MOCK_PASID_WIDTH;
  /** mdev->pasid_1024_fake_error, per device. */
  private readonly pasidFakeError = new WeakSet<DeviceInfo>();

  /** mock_domain_alloc_paging_flags(): 6.17 takes no user data. */
  allocPaging(dev: DeviceInfo, flags: HwptAllocFlags, userData: UserData | undefined): PagingDomain {
    if (userData !== undefined) fail("EOPNOTSUPP", "the mock driver takes no user data for a paging domain");
    if (flags.dirtyTracking && !dev.dirtyTrackingCapable) fail("EOPNOTSUPP", "the device has no dirty tracking");
    return new MockPagingDomain(flags.dirtyTracking, flags.nestParent);
  }

  /** mock_domain_nop_attach() and mock_domain_set_dev_pasid_nop() */
  attachDev(domain: IommuDomain, dev: DeviceInfo, pasid: number, old: IommuDomain | undefined): void {
    if (domain.type === "paging" && domain.dirtyTracking && !dev.dirtyTrackingCapable) {
      fail("EINVAL", "a device without dirty tracking cannot attach to a dirty-tracking domain");
    }
    if (pasid === 0) return;
    // iommu_attach_device_pasid(): the PASID must fit the device's PASID width.
    if (!dev.pasidCapable || pasid >= 2 ** MOCK_PASID_WIDTH) fail("EINVAL", `PASID ${pasid} is not supported by the device`);
    if (pasid === IOMMU_TEST_PASID_FAKE_ERROR) {
      // The first attach arms a fake error that the next replace consumes, so
      // the selftests can check that a failed replace keeps the old domain.
      if (!this.pasidFakeError.has(dev)) {
        this.pasidFakeError.add(dev);
      } else if (old !== undefined) {
        this.pasidFakeError.delete(dev);
        fail("ENOMEM", `fake error replacing PASID ${pasid}`);
      }
    }
  }

  detachDev(dev: DeviceInfo, pasid: number): void {
    if (pasid === IOMMU_TEST_PASID_FAKE_ERROR) this.pasidFakeError.delete(dev);
  }
}
