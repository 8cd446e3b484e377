import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { IommuModel } from "../../gen/iommufd/v1/vm_pb.js";
import { IommuOption } from "../../gen/iommufd/v1/ioas_pb.js";
import { SZ_2M, SZ_4K, Stage1PageTable } from "../../client/pagetable.js";
import { startTestServer, type TestServer } from "../helpers/server.js";

let t: TestServer;
beforeAll(async () => {
  t = await startTestServer();
});
afterAll(() => t.close());

const GIB = 1n << 30n;

async function nestedVm(vmId: string, hugePages: boolean, mapBytes = GIB) {
  await t.client.createVm({ vmId, model: IommuModel.INTEL_VTD, guestMemoryBytes: GIB });
  const vm = t.client.vm(vmId);
  const { ioasId } = await vm.allocIoas();
  if (!hugePages) await vm.setOption({ option: IommuOption.HUGE_PAGES, objectId: ioasId, value: 0n });
  await vm.mapIoas({ ioasId, userVa: 0n, length: mapBytes, iova: 0n, readable: true, writeable: true });
  const { devId } = await vm.bindDevice({ name: "dev0" });
  const { hwptId: parent } = await vm.allocHwpt({ devId, ptId: ioasId, nestParent: true });
  const s1 = new Stage1PageTable(vm, { tableBase: 0x100000n, tableBytes: 0x100000n });
  const { hwptId } = await vm.allocHwpt({ devId, ptId: parent, data: { case: "vtdS1", value: { pgtblAddr: s1.root, addrWidth: 48 } } });
  await vm.attachDevice({ devId, ptId: hwptId });
  return { vm, devId, s1, hwptId };
}

describe("translate smoke", () => {
  it("4/4 nested walk reads 24 entries, then hits", async () => {
    const { vm, devId, s1 } = await nestedVm("tr1", false);
    await s1.map(0x4000_0000_0000n & 0n, 0x800000n, SZ_4K);
    const r = await vm.translate({ devId, iovas: [0x123n, 0x456n] });
    expect(r.faults).toEqual([]);
    expect(r.addresses).toEqual([0x800123n, 0x800456n]);
    expect(r.memoryReferences).toEqual([24, 0]);
    expect(r.iotlbHits).toBe(1);
  });
  it("2M stage-1 leaf over 4K stage-2: 19", async () => {
    const { vm, devId, s1 } = await nestedVm("tr2", false);
    await s1.map(0x200000n, 0x400000n, SZ_2M);
    const r = await vm.translate({ devId, iovas: [0x212345n] });
    expect(r.addresses).toEqual([0x412345n]);
    expect(r.memoryReferences).toEqual([19]);
  });
  it("4K stage-1 over 2M stage-2: 19", async () => {
    // Half a GiB: no 1 GiB leaf fits, so stage 2 uses 2 MiB pages.
    const { vm, devId, s1 } = await nestedVm("tr3", true, GIB / 2n);
    await s1.map(0x1000n, 0x600000n, SZ_4K);
    const r = await vm.translate({ devId, iovas: [0x1000n], write: true });
    expect(r.memoryReferences).toEqual([19]);
    expect(await s1.readEntry(0x1000n, 1) & 0x60n).toBe(0x60n);
  });
});
