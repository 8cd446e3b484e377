import { fail, IommuError } from "../../errno.js";
import { faultPoint } from "../../fail-nth.js";
import { type DmaBatch, depthBucket } from "../../translate/dma-batch.js";
import { FAULT } from "../../translate/fault.js";
import type { IovaRange } from "../../iova.js";
import {
  copyStructFromUserArray,
  IOMMU_HW_INFO_TYPE_DEFAULT,
  IOMMU_HW_INFO_TYPE_SELFTEST,
  IOMMU_HWPT_DATA_SELFTEST,
  IOMMU_HWPT_INVALIDATE_DATA_SELFTEST,
  IOMMU_TEST_INVALIDATE_FLAG_ALL,
  type UserDataArray,
} from "../../uapi.js";
import type {
  DeviceInfo,
  HwptAllocFlags,
  IommuDomain,
  IommuDriver,
  IommuProt,
  IotlbDump,
  NestedDomain,
  PagingDomain,
  UserData,
} from "../driver.js";

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
/** MOCK_NESTED_DOMAIN_IOTLB_NUM / _ID_MAX */
export const MOCK_NESTED_DOMAIN_IOTLB_NUM = 4;
/** IOMMU_HW_INFO_SELFTEST_REGVAL */
export const IOMMU_HW_INFO_SELFTEST_REGVAL = 0xdeadbeef;

const PERM_R = 1;
const PERM_W = 2;
const MOCK_PAGE_BYTES = Number(MOCK_IO_PAGE_SIZE);

/**
 * struct mock_iommu_domain: a paging domain with the selftest geometry and a
 * flat table at MOCK_IO_PAGE_SIZE granularity (the mock's xarray of PFNs):
 * IOVA page -> host page * 4 + permissions.
 */
class MockPagingDomain implements PagingDomain {
  readonly type = "paging";
  readonly aperture = MOCK_APERTURE;
  readonly pgsizeMin = MOCK_IO_PAGE_SIZE;
  readonly pfns = new Map<number, number>();

  constructor(
    readonly dirtyTracking: boolean,
    readonly nestParent: boolean,
  ) {}

  map(iova: bigint, hostAddr: bigint, length: bigint, prot: IommuProt, _largePages: boolean): () => void {
    // mock_domain_map_pages(): xa_store() of the pfns (it unmaps what it stored on failure).
    faultPoint("mock_domain_map_pages");
    const first = Number(iova / MOCK_IO_PAGE_SIZE);
    const host = Number(hostAddr / MOCK_IO_PAGE_SIZE);
    const perm = (prot.read ? PERM_R : 0) | (prot.write ? PERM_W : 0);
    for (let i = 0; i < Number(length / MOCK_IO_PAGE_SIZE); i++) this.pfns.set(first + i, (host + i) * 4 + perm);
    return () => this.unmap(iova, length);
  }

  unmap(iova: bigint, length: bigint): void {
    const first = Number(iova / MOCK_IO_PAGE_SIZE);
    for (let i = 0; i < Number(length / MOCK_IO_PAGE_SIZE); i++) this.pfns.delete(first + i);
  }

  free(): void {}
}

/**
 * struct mock_iommu_domain_nested: no page table, four "iotlb" values the
 * tests set at allocation and clear by invalidation.
 */
class MockNestedDomain implements NestedDomain {
  readonly type = "nested";
  readonly iotlb = new Uint32Array(MOCK_NESTED_DOMAIN_IOTLB_NUM);

  constructor(
    readonly parent: PagingDomain,
    iotlb: number,
  ) {
    this.iotlb.fill(iotlb);
  }

  /** mock_domain_cache_invalidate_user() */
  cacheInvalidateUser(array: UserDataArray, start: number, end: number): number {
    if (array.type !== IOMMU_HWPT_INVALIDATE_DATA_SELFTEST) {
      throw new IommuError("EINVAL", `invalidation data_type ${array.type} is not IOMMU_HWPT_INVALIDATE_DATA_SELFTEST`, 0);
    }
    let processed = start;
    try {
      for (let i = start; i < end; i++) {
        // struct iommu_hwpt_invalidate_selftest, min_last iotlb_id: exactly 8 bytes
        const inv = copyStructFromUserArray(array, IOMMU_HWPT_INVALIDATE_DATA_SELFTEST, i, 8, 8);
        const flags = inv.getUint32(0, true);
        const iotlbId = inv.getUint32(4, true);
        if (flags & ~IOMMU_TEST_INVALIDATE_FLAG_ALL) fail("EOPNOTSUPP", `entry ${i}: unknown flags 0x${flags.toString(16)}`);
        if (iotlbId >= MOCK_NESTED_DOMAIN_IOTLB_NUM) fail("EINVAL", `entry ${i}: iotlb_id ${iotlbId} > ${MOCK_NESTED_DOMAIN_IOTLB_NUM - 1}`);
        faultPoint("mock_domain_cache_invalidate_user");
        if (flags & IOMMU_TEST_INVALIDATE_FLAG_ALL) this.iotlb.fill(0);
        else this.iotlb[iotlbId] = 0;
        processed++;
      }
    } catch (e) {
      if (e instanceof IommuError) throw e.withEntriesHandled(processed);
      throw e;
    }
    return processed;
  }

  free(): void {}
}

export class MockDriver implements IommuDriver {
  readonly pasidWidth = MOCK_PASID_WIDTH;
  /** The mock has no IOTLB. */
  readonly iotlbOccupancy = 0;
  readonly iotlbEntriesInvalidated = 0;
  /** mdev->pasid_1024_fake_error, per device. */
  private readonly pasidFakeError = new WeakSet<DeviceInfo>();

  /** mock_domain_alloc_paging_flags(): 6.17 takes no user data. */
  allocPaging(dev: DeviceInfo, flags: HwptAllocFlags, userData: UserData | undefined): PagingDomain {
    if (userData !== undefined) fail("EOPNOTSUPP", "the mock driver takes no user data for a paging domain");
    if (flags.dirtyTracking && !dev.dirtyTrackingCapable) fail("EOPNOTSUPP", "the device has no dirty tracking");
    faultPoint("mock_domain_alloc_paging_flags");
    return new MockPagingDomain(flags.dirtyTracking, flags.nestParent);
  }

  /** mock_domain_alloc_nested(): type IOMMU_HWPT_DATA_SELFTEST, exactly 4 bytes. */
  allocNested(_dev: DeviceInfo, parent: PagingDomain, _flags: HwptAllocFlags, userData: UserData): NestedDomain {
    if (!(parent instanceof MockPagingDomain)) fail("EINVAL", "the parent is not a mock paging domain");
    if (userData.type !== IOMMU_HWPT_DATA_SELFTEST) fail("EOPNOTSUPP", `data_type 0x${userData.type.toString(16)} is not IOMMU_HWPT_DATA_SELFTEST`);
    // iommu_copy_struct_from_user(min_last = iotlb): struct iommu_hwpt_selftest is 4 bytes.
    if (userData.data.length !== 4) fail("EINVAL", `data_len ${userData.data.length} is not 4 (struct iommu_hwpt_selftest)`);
    const iotlb = new DataView(userData.data.buffer, userData.data.byteOffset, 4).getUint32(0, true);
    faultPoint("mock_domain_alloc_nested");
    return new MockNestedDomain(parent, iotlb);
  }

  /** mock_domain_nop_attach() and mock_domain_set_dev_pasid_nop() */
  attachDev(domain: IommuDomain, dev: DeviceInfo, pasid: number, old: IommuDomain | undefined): void {
    if (pasid === 0) {
      // Only the RID path (mock_domain_nop_attach()) checks dirty tracking.
      if (domain.type === "paging" && domain.dirtyTracking && !dev.dirtyTrackingCapable) {
        fail("EINVAL", "a device without dirty tracking cannot attach to a dirty-tracking domain");
      }
      return;
    }
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

  selftestPasidFakeError(dev: DeviceInfo): boolean {
    return this.pasidFakeError.has(dev);
  }

  restoreSelftestPasidFakeError(dev: DeviceInfo, armed: boolean): void {
    if (armed) this.pasidFakeError.add(dev);
    else this.pasidFakeError.delete(dev);
  }

  detachDev(dev: DeviceInfo, pasid: number): void {
    if (pasid === IOMMU_TEST_PASID_FAKE_ERROR) this.pasidFakeError.delete(dev);
  }

  /** mock_domain_hw_info(): struct iommu_test_hw_info {flags 0, test_reg 0xdeadbeef}. */
  hwInfo(_dev: DeviceInfo, type: number): { type: number; data: Uint8Array } {
    if (type !== IOMMU_HW_INFO_TYPE_DEFAULT && type !== IOMMU_HW_INFO_TYPE_SELFTEST) {
      fail("EOPNOTSUPP", `hw_info type 0x${type.toString(16)} is not supported by the mock IOMMU`);
    }
    const view = new DataView(new ArrayBuffer(8));
    view.setUint32(4, IOMMU_HW_INFO_SELFTEST_REGVAL, true);
    return { type: IOMMU_HW_INFO_TYPE_SELFTEST, data: new Uint8Array(view.buffer) };
  }

  /**
   * DMA through a mock domain: one lookup in the paging table (a nested
   * domain's stage 1 is the identity over its parent's). The mock has no
   * IOTLB, so every access is a miss that reads one entry.
   */
  translate(domain: IommuDomain, _pasid: number, batch: DmaBatch, start: number, end: number): void {
    const table = (domain.type === "paging" ? domain : domain.parent) as MockPagingDomain;
    batch.mode = domain.type === "paging" ? "stage2" : "nested";
    const { iovaLo, iovaHi, addr, refs, write } = batch;
    for (let i = start; i < end; i++) {
      batch.misses++;
      refs[i] = 1;
      batch.references++;
      batch.depthCounts[depthBucket(1)]++;
      const entry = iovaHi[i] === 0 ? table.pfns.get(Math.floor(iovaLo[i] / MOCK_PAGE_BYTES)) : undefined;
      const code =
        entry === undefined ? FAULT.S2_NOT_PRESENT : write && !(entry & PERM_W) ? FAULT.NO_WRITE : !write && !(entry & PERM_R) ? FAULT.NO_READ : 0;
      if (code !== 0) {
        batch.recordFault(i, code);
      } else {
        addr[i] = Math.floor(entry! / 4) * MOCK_PAGE_BYTES + (iovaLo[i] % MOCK_PAGE_BYTES);
      }
    }
  }

  restoreSelftestIotlb(domain: NestedDomain, values: readonly number[]): void {
    if (domain instanceof MockNestedDomain) domain.iotlb.set(values.slice(0, MOCK_NESTED_DOMAIN_IOTLB_NUM));
  }

  /** IOMMU_TEST_OP_MD_CHECK_IOTLB reads a mock nested domain's iotlb values. */
  dumpIotlb(domain: IommuDomain): IotlbDump {
    if (!(domain instanceof MockNestedDomain)) fail("ENOENT", "not a mock nested HWPT");
    return { selftestIotlb: [...domain.iotlb], entries: [] };
  }
}
