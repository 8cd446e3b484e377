/**
 * Port of FIXTURE(iommufd_mock_domain) from tools/testing/selftests/iommu/iommufd.c (v6.17), all six
 * FIXTURE_VARIANTs (guide §5).
 *
 * Not expressible anywhere in this fixture: check_mock_iova (MD_CHECK_MAP reads the mock page table),
 * check_refs (MD_CHECK_REFS page pin counts), DEV_CHECK_CACHE_ALL, access objects. The *_file variants use
 * IOAS_MAP_FILE on a memfd, which has no RPC: they map guest RAM like their non-file counterparts. The
 * *_hugepage variants only change the size of the mmap()ed buffer (there are no THPs in guest RAM).
 */
import { describe, expect, it } from "vitest";
import type { VmMethods } from "../../client/client.js";
import {
  BUF,
  BUFFER_SIZE,
  expectErrno,
  GUEST_MEMORY,
  HUGEPAGE_SIZE,
  MBUF,
  MOCK_APERTURE_START,
  MOCK_PAGE_SIZE,
  MockVm,
  PAGE_SIZE,
  useTestServer,
  vmIdFor,
  withFixture,
} from "./helpers.js";

const server = useTestServer();

/** FIXTURE_VARIANT(iommufd_mock_domain) */
interface MockDomainVariant {
  mockDomains: number;
  hugepages: boolean;
  file: boolean;
}

const VARIANTS: [string, MockDomainVariant][] = [
  ["one_domain", { mockDomains: 1, hugepages: false, file: false }],
  ["two_domains", { mockDomains: 2, hugepages: false, file: false }],
  ["one_domain_hugepage", { mockDomains: 1, hugepages: true, file: false }],
  ["two_domains_hugepage", { mockDomains: 2, hugepages: true, file: false }],
  ["one_domain_file", { mockDomains: 1, hugepages: false, file: true }],
  ["one_domain_file_hugepage", { mockDomains: 1, hugepages: true, file: true }],
];

/** FIXTURE(iommufd_mock_domain); the device ids stand in for stdev_ids[] and idev_ids[] alike. */
interface MockDomainFixture {
  vm: MockVm;
  v: VmMethods;
  ioasId: number;
  hwptId: number;
  hwptIds: number[];
  devIds: number[];
  mmapBufSize: bigint;
}

describe.each(VARIANTS)("iommufd_mock_domain (%s)", (variantName, variant) => {
  /** FIXTURE_SETUP(iommufd_mock_domain) */
  const setup = (test: string) => async (): Promise<MockDomainFixture> => {
    const vm = await MockVm.open(server(), vmIdFor("mock-domain", variantName, test));
    const { ioasId } = await vm.v.allocIoas();
    const hwptIds: number[] = [];
    const devIds: number[] = [];
    for (let i = 0; i !== variant.mockDomains; i++) {
      const d = await vm.mockDomain(ioasId);
      devIds.push(d.devId);
      hwptIds.push(d.hwptId);
    }
    const mmapBufSize = variant.hugepages ? HUGEPAGE_SIZE * 2n : PAGE_SIZE * 8n;
    return { vm, v: vm.v, ioasId, hwptId: hwptIds[0], hwptIds, devIds, mmapBufSize };
  };

  const testF = (test: string, body: (f: MockDomainFixture) => Promise<void>, timeout?: number) =>
    it(`${test} — kernel TEST_F(iommufd_mock_domain, ${test})`, () => withFixture(setup(test), body), timeout);

  it("FIXTURE_SETUP object ids — guide §5.1 (the second device re-uses the auto HWPT)", () =>
    withFixture(setup("setup_ids"), async (f) => {
      expect(f.ioasId).toBe(1);
      expect(f.devIds).toEqual(variant.mockDomains === 1 ? [2] : [2, 4]);
      expect(f.hwptIds).toEqual(variant.mockDomains === 1 ? [3] : [3, 3]);
    }));

  testF("basic", async ({ vm, v, ioasId, mmapBufSize: bufSize }) => {
    // Simple one page map (file variants: IOAS_MAP_FILE(mfd, 0, PAGE_SIZE), mapped from guest RAM instead)
    expect(await vm.map(ioasId, BUF, PAGE_SIZE)).toBe(MOCK_APERTURE_START);
    if (variant.file) {
      // Left out: IOAS_MAP_FILE beyond the file size and after ftruncate(0) → EINVAL (no MapFile RPC).
      return;
    }
    // buf = mmap(buf_size) is memory the test unmaps again: here, the last buf_size bytes of guest RAM.
    const buf = GUEST_MEMORY - bufSize / 2n;
    // EFAULT half way through mapping (the second half of buf is past the end of guest RAM)
    await expectErrno(v.mapIoas({ ioasId, userVa: buf, length: bufSize, readable: true, writeable: true }), "EFAULT");
    // EFAULT on first page (none of buf is guest RAM)
    await expectErrno(v.mapIoas({ ioasId, userVa: GUEST_MEMORY, length: bufSize, readable: true, writeable: true }), "EFAULT");
  });

  testF("ro_unshare", async ({ v, ioasId }) => {
    // Left out: the MAP_PRIVATE file page and both check_mock_iova PFN checks (before/after the COW write).
    const buf = MBUF;
    await v.mapIoas({ ioasId, userVa: buf, length: PAGE_SIZE, readable: true, writeable: false });
    // memset(buf, 1, PAGE_SIZE)
    await v.writeGuestMemory({ gpa: buf, data: new Uint8Array(Number(PAGE_SIZE)).fill(1) });
  });

  /** The loops of all_aligns / all_aligns_copy: every (start, length) the kernel maps. */
  function* allAligns(bufSize: bigint): Generator<{ start: bigint; length: bigint }> {
    const testStep = variant.hugepages ? bufSize / 16n : MOCK_PAGE_SIZE;
    for (let start = 0n; start < bufSize; start += testStep) {
      // hugepage variants: end starts at buf_size, so the inner loop never runs
      for (let end = variant.hugepages ? bufSize : start + MOCK_PAGE_SIZE; end < bufSize; end += MOCK_PAGE_SIZE) {
        yield { start, length: end - start };
      }
    }
  }

  testF("all_aligns", async ({ vm, ioasId, mmapBufSize }) => {
    // Left out: check_mock_iova and check_refs after each map.
    const buf = MBUF;
    for (const { start, length } of allAligns(mmapBufSize)) {
      const iova = await vm.map(ioasId, buf + start, length);
      // guide §1.6: an automatic IOVA keeps user_va's offset within the page
      expect(iova % PAGE_SIZE).toBe((buf + start) % PAGE_SIZE);
      expect(await vm.unmap(ioasId, iova, length)).toBe(length);
    }
  });

  testF(
    "all_aligns_copy",
    async ({ vm, v, ioasId, hwptId, mmapBufSize }) => {
      // Left out: check_mock_iova and check_refs while the second domain exists.
      const buf = MBUF;
      for (const { start, length } of allAligns(mmapBufSize)) {
        const iova = await vm.map(ioasId, buf + start, length);

        // Add and destroy a domain while the area exists: the new device re-uses the IOAS' auto HWPT
        const mock = await vm.mockDomain(ioasId);
        expect(mock.hwptId).toBe(hwptId);
        await v.unbindDevice({ devId: mock.devId });

        expect(await vm.unmap(ioasId, iova, length)).toBe(length);
      }
    },
    60_000,
  );

  testF("user_copy", async ({ vm, v, ioasId }) => {
    // Left out: the access object pinning the source pages (CREATE_ACCESS, ACCESS_PAGES, ACCESS_REPLACE_IOAS) and
    // check_mock_iova after each copy. File variants map guest RAM instead of the memfd.
    const buf = BUF;
    // flags = FIXED_IOVA | WRITEABLE, dst = the fixture's IOAS at MOCK_APERTURE_START, length BUFFER_SIZE
    const copy = (srcIoasId: number, srcIova: bigint) =>
      v.copyIoas({ dstIoasId: ioasId, srcIoasId, srcIova, length: BUFFER_SIZE, dstIova: MOCK_APERTURE_START, readable: false, writeable: true });

    // Pin the pages in an IOAS with no domains then copy to an IOAS with domains
    const { ioasId: srcIoasId } = await v.allocIoas();
    let srcIova = await vm.map(srcIoasId, buf, BUFFER_SIZE);
    expect((await copy(srcIoasId, srcIova)).dstIova).toBe(MOCK_APERTURE_START);

    // Now replace the ioas with a new one
    const { ioasId: newIoasId } = await v.allocIoas();
    srcIova = await vm.map(newIoasId, buf, BUFFER_SIZE);

    // Destroy the old ioas and cleanup copied mapping
    expect(await vm.unmap(ioasId, MOCK_APERTURE_START, BUFFER_SIZE)).toBe(BUFFER_SIZE);
    await v.destroy({ id: srcIoasId });

    // Then run the same test again with the new ioas
    expect((await copy(newIoasId, srcIova)).dstIova).toBe(MOCK_APERTURE_START);

    await v.destroy({ id: newIoasId });
  });

  testF("replace", async ({ vm, v, ioasId: fixtureIoasId, devIds, hwptIds }) => {
    const { ioasId } = await v.allocIoas();

    // A new auto HWPT, allocated before the old one is released (guide §5.7: 5 for one domain, 6 for two)
    const newAuto = await vm.replace(devIds[0], ioasId);
    expect(newAuto).toBe(variant.mockDomains === 1 ? 5 : 6);

    // Replacing the IOAS causes the prior HWPT to be deallocated, thus we should get enoent when we try to use it.
    if (variant.mockDomains === 1) await expectErrno(v.attachDevice({ devId: devIds[0], ptId: hwptIds[0], replace: true }), "ENOENT");

    expect(await vm.replace(devIds[0], ioasId)).toBe(newAuto);
    if (variant.mockDomains >= 2) {
      expect(await vm.replace(devIds[0], hwptIds[1])).toBe(hwptIds[1]);
      expect(await vm.replace(devIds[0], hwptIds[1])).toBe(hwptIds[1]);
      expect(await vm.replace(devIds[0], hwptIds[0])).toBe(hwptIds[0]);
    }

    // one domain: a new auto HWPT at the lowest free id (3); two domains: the surviving auto HWPT 3
    expect(await vm.replace(devIds[0], fixtureIoasId)).toBe(3);
    await v.destroy({ id: ioasId });
  });

  testF("alloc_hwpt", async ({ vm, v, ioasId, devIds }) => {
    for (let i = 0; i !== variant.mockDomains; i++) {
      // Left out: flags ~IOMMU_HWPT_ALLOC_NEST_PARENT → EOPNOTSUPP (unknown flag bits are not expressible).
      const hwpt0 = (await v.allocHwpt({ devId: devIds[i], ptId: ioasId })).hwptId;
      const hwpt1 = (await v.allocHwpt({ devId: devIds[i], ptId: ioasId, nestParent: true })).hwptId;

      // Do a hw_pagetable rotation test
      expect(await vm.replace(devIds[i], hwpt0)).toBe(hwpt0);
      await expectErrno(v.destroy({ id: hwpt0 }), "EBUSY");
      expect(await vm.replace(devIds[i], hwpt1)).toBe(hwpt1);
      await expectErrno(v.destroy({ id: hwpt1 }), "EBUSY");
      // back to an auto HWPT: id 3 (one domain: re-created at the lowest free id; two: the other device's)
      expect(await vm.replace(devIds[i], ioasId)).toBe(3);
      await v.destroy({ id: hwpt1 });

      const mock = await vm.mockDomain(hwpt0);
      expect(mock.hwptId).toBe(hwpt0);
      await v.unbindDevice({ devId: mock.devId });
      await v.destroy({ id: hwpt0 });
    }
  });
});
