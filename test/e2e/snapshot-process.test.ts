/**
 * ExportVm / ImportVm between two real server processes (`npm start`):
 * the rich VMs of the in-process tests move from one process to the other
 * and are then indistinguishable through the API; a large VM streams over
 * many messages (export piped straight into import); and a crafted
 * snapshot cannot take a process down.
 */
import { createHash } from "node:crypto";
import { afterEach, describe, expect, it } from "vitest";
import { IommufdClient } from "../../client/client.js";
import { IommuModel } from "../../gen/iommufd/v1/vm_pb.js";
import { expectFail, MIB } from "../integration/helpers.js";
import { buildMockVm, buildVtdVm, encodeRecords, further, observe, recordsOf, vmIds, vmOn } from "../integration/snapshot-helpers.js";
import { EPHEMERAL, killServers, type ServerProcess, startServerProcess } from "./server-process.js";

afterEach(killServers);

const clients: IommufdClient[] = [];
afterEach(() => {
  for (const c of clients.splice(0)) c.close();
});

async function twoProcesses(): Promise<[ServerProcess, IommufdClient, ServerProcess, IommufdClient]> {
  const [p1, p2] = await Promise.all([startServerProcess(EPHEMERAL), startServerProcess(EPHEMERAL)]);
  const c1 = new IommufdClient(p1.target);
  const c2 = new IommufdClient(p2.target);
  clients.push(c1, c2);
  return [p1, c1, p2, c2];
}

describe("snapshots between server processes", () => {
  it("rich MOCK and nested VT-d VMs exported from one process and imported into another: same objects, translations, RAM, counters", async () => {
    const [p1, c1, p2, c2] = await twoProcesses();
    for (const [name, build] of [
      ["proc-mock", buildMockVm],
      ["proc-vtd", buildVtdVm],
    ] as const) {
      const { vm, probe } = await build(c1, name);
      const stream = await vm.v.exportVm();
      expect((await c2.importVm({ snapshot: stream })).vm?.vmId).toBe(name);
      const copy = vmOn(c2, name, probe.model);
      expect(await copy.v.exportVm()).toEqual(stream);
      expect(await observe(copy, probe)).toEqual(await observe(vm, probe));
      expect(await further(copy, probe)).toEqual(await further(vm, probe));
    }
    expect(await vmIds(c2)).toEqual(["proc-mock", "proc-vtd"]);
    expect(await p1.kill("SIGTERM")).toEqual({ code: 0, signal: null });
    expect(await p2.kill("SIGTERM")).toEqual({ code: 0, signal: null });
  }, 120_000);

  it("a VM with 40 MiB of touched RAM streams from one process's ExportVm straight into the other's ImportVm", async () => {
    const [p1, c1, p2, c2] = await twoProcesses();
    await c1.createVm({ vmId: "big", model: IommuModel.INTEL_VTD, guestMemoryBytes: 64n * MIB });
    const vm = c1.vm("big");
    const chunk = Buffer.alloc(8 << 20);
    for (let i = 0; i < 5; i++) {
      for (let j = 0; j < chunk.length; j += 4) chunk.writeUInt32LE(((i << 24) ^ j ^ 0x9e3779b9) >>> 0, j);
      await vm.writeGuestMemory({ gpa: BigInt(i) * 8n * MIB + 4096n, data: chunk });
    }
    const { ioasId } = await vm.allocIoas();
    await vm.mapIoas({ ioasId, iova: 0n, userVa: 0n, length: 64n * MIB, readable: true, writeable: true });
    let chunks = 0;
    async function* counted() {
      for await (const c of c1.exportVmChunks({ vmId: "big" })) {
        chunks++;
        yield c;
      }
    }
    await c2.importVm({ vmId: "big-copy", snapshot: counted() });
    expect(chunks).toBeGreaterThan(10);
    const digest = async (c: IommufdClient, vmId: string) => {
      const h = createHash("sha256");
      for (let gpa = 0n; gpa < 64n * MIB; gpa += 8n * MIB) h.update((await c.vm(vmId).readGuestMemory({ gpa, length: 8 << 20 })).data);
      return h.digest("hex");
    };
    expect(await digest(c2, "big-copy")).toBe(await digest(c1, "big"));
    expect(await c2.vm("big-copy").getIovaRanges({ ioasId })).toEqual(await vm.getIovaRanges({ ioasId }));
    expect(await p1.kill("SIGTERM")).toEqual({ code: 0, signal: null });
    expect(await p2.kill("SIGTERM")).toEqual({ code: 0, signal: null });
  }, 120_000);

  it("a crafted snapshot whose object id is near 2^31 is refused, and the process keeps serving", async () => {
    const [p1, c1, p2, c2] = await twoProcesses();
    const { vm, probe } = await buildMockVm(c1, "src");
    const records = recordsOf(await vm.v.exportVm());
    const header = records[0].record;
    if (header.case !== "header") throw new Error("no header");
    header.value.objects.find((o) => o.id === probe.ids.nested3)!.id = 0x7fff_fff0;
    const crafted = encodeRecords(records);
    const refused = await c2.importVm({ vmId: "crafted", snapshot: crafted }).then(
      () => "imported",
      (e: { errno?: string }) => e.errno ?? String(e),
    );
    // Ids beyond the object quota cannot have been handed out: not a VM this server can hold.
    expect(["EINVAL", "EDQUOT"]).toContain(refused);
    expect(await vmIds(c2)).toEqual([]);
    await expectFail(c2.vm("crafted").getStats(), "ENOENT");
    expect(await p1.kill("SIGTERM")).toEqual({ code: 0, signal: null });
    expect(await p2.kill("SIGTERM")).toEqual({ code: 0, signal: null });
  }, 60_000);
});
