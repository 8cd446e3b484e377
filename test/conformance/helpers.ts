/**
 * Shared pieces of the conformance suite: a port of the Linux iommufd selftests
 * (tools/testing/selftests/iommu/iommufd.c, v6.17) to the gRPC API.
 *
 * Conventions (see /work/selftest-port-guide.md §1):
 * - every kernel TEST_F opens a fresh /dev/iommu: every port test creates its own VM
 *   (model MOCK) and ends with DestroyVm, which stands in for teardown_iommufd
 *   (its MD_CHECK_REFS pin check is not expressible);
 * - user_va is an offset into guest RAM; the kernel's 2 MiB-aligned `buffer` is BUF;
 * - test_cmd_mock_domain() is BindDevice + AttachDevice; there is no stdev object, the
 *   device id plays its role.
 */
import { afterAll, beforeAll, expect } from "vitest";
import type { VmMethods } from "../../client/client.js";
import { IommuModel } from "../../gen/iommufd/v1/vm_pb.js";
import { expectErrno } from "../helpers/errors.js";
import { startTestServer, type TestServer } from "../helpers/server.js";

export { expectErrno };

// ---- constants (tools/testing/selftests/iommu/iommufd.c, drivers/iommu/iommufd/iommufd_test.h) ----

export const PAGE_SIZE = 0x1000n;
export const MOCK_PAGE_SIZE = PAGE_SIZE / 2n;
export const HUGEPAGE_SIZE = 0x200000n;
export const BUFFER_SIZE = PAGE_SIZE * 16n;
export const MOCK_APERTURE_START = 1n << 24n;
export const MOCK_APERTURE_LAST = (1n << 31n) - 1n;
export const U64_MAX = (1n << 64n) - 1n;

export const IOMMU_HWPT_DATA_NONE = 0;
export const IOMMU_HWPT_DATA_SELFTEST = 0xdead;
export const IOMMU_TEST_IOTLB_DEFAULT = 0xbadbeef;
export const MOCK_NESTED_DOMAIN_IOTLB_ID_MAX = 3;
export const IOMMU_HWPT_INVALIDATE_DATA_SELFTEST = 0xdeadbeef;
export const IOMMU_HWPT_INVALIDATE_DATA_SELFTEST_INVALID = 0xdadbeef;
export const IOMMU_TEST_INVALIDATE_FLAG_ALL = 1;
/** sizeof(struct iommu_hwpt_invalidate_selftest) */
export const INV_SELFTEST_LEN = 8;
export const IOMMU_HW_INFO_TYPE_SELFTEST = 0xfeedbeef;
export const IOMMU_HW_INFO_SELFTEST_REGVAL = 0xdeadbeef;
export const IOMMU_HW_CAP_DIRTY_TRACKING = 1n;
export const MOCK_PASID_WIDTH = 20;
export const IOMMU_TEST_PASID_RESERVED = 1024;

// ---- guest memory layout of the port (guide §1.2) ----

/** Stand-in for the kernel's global `buffer` (2 MiB aligned, BUFFER_SIZE long). */
export const BUF = 0x200000n;
/** Stand-in for per-test mmap()s. */
export const MBUF = 0x400000n;
/** guest_memory_bytes of most fixtures. */
export const GUEST_MEMORY = 0x1000000n;

// ---- server and VMs ----

/** One server per test file. */
export function useTestServer(): () => TestServer {
  let server: TestServer | undefined;
  beforeAll(async () => {
    server = await startTestServer();
  });
  afterAll(async () => {
    await server?.close();
  });
  return () => {
    if (!server) throw new Error("test server not started");
    return server;
  };
}

const usedVmIds = new Set<string>();

function fnv1a(text: string): string {
  let h = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) {
    h ^= text.charCodeAt(i);
    h = Math.imul(h, 0x01000193) >>> 0;
  }
  return h.toString(16).padStart(8, "0");
}

/** A vm_id (DNS label) derived from the kernel fixture, variant and test names; unique per file. */
export function vmIdFor(...parts: string[]): string {
  const full = parts
    .join("-")
    .toLowerCase()
    .replace(/[^a-z0-9]+/g, "-")
    .replace(/^-+|-+$/g, "");
  const id = full.length <= 63 ? full : `${full.slice(0, 54).replace(/-+$/, "")}-${fnv1a(full)}`;
  if (usedVmIds.has(id)) throw new Error(`duplicate vm_id ${id}`);
  usedVmIds.add(id);
  return id;
}

export interface MockDevice {
  devId: number;
  hwptId: number;
}

export interface DeviceFlags {
  /** MOCK_FLAGS_DEVICE_PASID */
  pasid?: boolean;
  /** MOCK_FLAGS_DEVICE_NO_DIRTY (the kernel's default mock device supports dirty tracking) */
  noDirty?: boolean;
}

/** One VM = one open /dev/iommu of the MOCK model. */
export class MockVm {
  readonly v: VmMethods;
  private names = 0;

  constructor(
    readonly server: TestServer,
    readonly vmId: string,
  ) {
    this.v = server.client.vm(vmId);
  }

  static async open(server: TestServer, vmId: string, guestMemoryBytes = GUEST_MEMORY): Promise<MockVm> {
    await server.client.createVm({ vmId, model: IommuModel.MOCK, guestMemoryBytes });
    return new MockVm(server, vmId);
  }

  /** teardown_iommufd(): closing the fd destroys everything. */
  async close(): Promise<void> {
    await this.server.client.destroyVm({ vmId: this.vmId });
  }

  /** BindDevice of a new mock device (the first half of IOMMU_TEST_OP_MOCK_DOMAIN(_FLAGS)). */
  async bind(flags: DeviceFlags = {}): Promise<number> {
    const { devId } = await this.v.bindDevice({
      name: `mock${this.names++}`,
      pasidCapable: flags.pasid ?? false,
      dirtyTrackingCapable: !(flags.noDirty ?? false),
    });
    return devId;
  }

  /** test_cmd_mock_domain(_flags)(pt_id): a new mock device attached to pt_id. */
  async mockDomain(ptId: number, flags: DeviceFlags = {}): Promise<MockDevice> {
    const devId = await this.bind(flags);
    const { hwptId } = await this.v.attachDevice({ devId, ptId });
    return { devId, hwptId };
  }

  /** test_err_mock_domain(_flags)(errno, pt_id): the attach fails and nothing remains. */
  async mockDomainErr(errno: string, ptId: number, flags: DeviceFlags = {}): Promise<void> {
    const devId = await this.bind(flags);
    await expectErrno(this.v.attachDevice({ devId, ptId }), errno);
    await this.v.unbindDevice({ devId });
  }

  /** test_cmd_mock_domain_replace(stdev, pt_id) → the HWPT now attached. */
  async replace(devId: number, ptId: number): Promise<number> {
    const { hwptId } = await this.v.attachDevice({ devId, ptId, replace: true });
    return hwptId;
  }

  /** test_ioctl_ioas_map(buf, len, &iova): automatic IOVA, read/write. */
  async map(ioasId: number, userVa: bigint, length: bigint): Promise<bigint> {
    const { iova } = await this.v.mapIoas({ ioasId, userVa, length, readable: true, writeable: true });
    return iova;
  }

  /** test_ioctl_ioas_map_fixed(buf, len, iova). */
  async mapFixed(ioasId: number, userVa: bigint, length: bigint, iova: bigint): Promise<void> {
    const r = await this.v.mapIoas({ ioasId, userVa, length, iova, readable: true, writeable: true });
    expect(r.iova).toBe(iova);
  }

  /** test_ioctl_ioas_unmap(iova, len) → bytes unmapped. */
  async unmap(ioasId: number, iova: bigint, length: bigint): Promise<bigint> {
    const r = await this.v.unmapIoas({ ioasId, iova, length });
    return r.length;
  }

  /** Vm.object_count, read through ListVms. */
  async objectCount(): Promise<number> {
    let pageToken = "";
    do {
      const r = await this.server.client.listVms({ pageSize: 1000, pageToken });
      const vm = r.vms.find((x) => x.vmId === this.vmId);
      if (vm) return vm.objectCount;
      pageToken = r.nextPageToken;
    } while (pageToken);
    throw new Error(`vm ${this.vmId} not listed`);
  }
}

// ---- selftest data encodings ----

/** Little-endian u32 words. */
export function le32(...words: number[]): Uint8Array {
  const out = new Uint8Array(words.length * 4);
  const view = new DataView(out.buffer);
  words.forEach((w, i) => view.setUint32(i * 4, w >>> 0, true));
  return out;
}

/** struct iommu_hwpt_invalidate_selftest[] {u32 flags; u32 iotlb_id;} as the kernel lays it out. */
export function selftestInvArray(entries: { flags: number; iotlbId: number }[]): Uint8Array {
  return le32(...entries.flatMap((e) => [e.flags, e.iotlbId]));
}

/** test_cmd_hwpt_check_iotlb_all / check_iotlb(i): the four iotlb values of a mock nested HWPT. */
export async function expectIotlb(v: VmMethods, hwptId: number, expected: number[]): Promise<void> {
  const r = await v.dumpIotlb({ hwptId });
  expect(r.selftestIotlb, `iotlb of nested hwpt ${hwptId}`).toEqual(expected);
}

/** Runs `body` on a fresh fixture and always tears the VM down (asserting DestroyVm succeeds). */
export async function withFixture<F extends { vm: MockVm }>(setup: () => Promise<F>, body: (f: F) => Promise<void>): Promise<void> {
  const f = await setup();
  try {
    await body(f);
  } catch (e) {
    await f.vm.close().catch(() => undefined);
    throw e;
  }
  await f.vm.close();
}
