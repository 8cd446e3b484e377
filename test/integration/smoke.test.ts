import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { IommuModel } from "../../gen/iommufd/v1/vm_pb.js";
import { expectErrno } from "../helpers/errors.js";
import { startTestServer, type TestServer } from "../helpers/server.js";

let t: TestServer;
beforeAll(async () => {
  t = await startTestServer();
});
afterAll(() => t.close());

describe("smoke", () => {
  it("creates a VM, an IOAS and maps", async () => {
    const { vm } = await t.client.createVm({ vmId: "smoke", model: IommuModel.MOCK, guestMemoryBytes: 1n << 24n });
    expect(vm?.options?.iotlbEntries).toBe(4096);
    const v = t.client.vm("smoke");
    const { ioasId } = await v.allocIoas();
    expect(ioasId).toBe(1);
    const { iova } = await v.mapIoas({ ioasId, userVa: 0n, length: 1n << 20n, readable: true, writeable: true });
    expect(iova).toBe(1n << 20n);
    await expectErrno(v.destroy({ id: 99 }), "ENOENT");
  });
});
