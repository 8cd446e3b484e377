/**
 * --state-dir and --snapshot-interval with real server processes and real
 * signals: a graceful restart brings every VM back as it was (same tenant,
 * vm_id and state, observed through the API as in the in-process snapshot
 * tests), a crash loses only what came after the last periodic snapshot,
 * damaged files and leftovers of interrupted writes do not stop a start,
 * DestroyVm removes the VM's file.
 */
import { mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as grpc from "@grpc/grpc-js";
import { afterEach, describe, expect, it, type TestContext } from "vitest";
import { IommufdClient } from "../../client/client.js";
import { IommuModel } from "../../gen/iommufd/v1/vm_pb.js";
import { MIB } from "../integration/helpers.js";
import { type Built, buildMockVm, buildVtdVm, further, listed, observe, pattern, vmIds, vmOn } from "../integration/snapshot-helpers.js";
import { TENANT_A, TENANT_B, useTestPki } from "./certs.js";
import { EPHEMERAL, killServers, type LogLine, type ServerProcess, startServerProcess } from "./server-process.js";

const testPki = useTestPki();

const dirs: string[] = [];
const clients: IommufdClient[] = [];
afterEach(async () => {
  killServers();
  for (const c of clients.splice(0)) c.close();
  for (const d of dirs.splice(0)) await rm(d, { recursive: true, force: true });
});

async function stateDir(): Promise<string> {
  const d = await mkdtemp(join(tmpdir(), "iommufd-state-"));
  dirs.push(d);
  return d;
}

function connect(p: ServerProcess, options?: ConstructorParameters<typeof IommufdClient>[1]): IommufdClient {
  const c = new IommufdClient(p.target, options);
  clients.push(c);
  return c;
}

/** The file of a VM of the implicit tenant (README "Restarts"). */
const fileOf = (dir: string, vmId: string) => join(dir, `default.${vmId}.vmsnap`);

/** Polls `probe` until it returns true; fails naming `what` after a bound far above any normal wait. */
async function until(what: string, probe: () => Promise<boolean>, ms = 30_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await probe())) {
    if (Date.now() > deadline) throw new Error(`${what} within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function readOrEmpty(path: string): Promise<Buffer> {
  return readFile(path).catch(() => Buffer.alloc(0));
}

/**
 * Every VM of `names` on `restored` is the VM whose pre-shutdown export is
 * `before[name]`: the restored VM re-exports to the same bytes, and it is
 * indistinguishable through the API (observe(), further()) from a fresh
 * import of those bytes.
 */
async function expectRestored(restored: IommufdClient, built: Record<string, Built>, before: Record<string, Buffer>): Promise<void> {
  for (const [name, { probe }] of Object.entries(built)) {
    const vm = vmOn(restored, name, probe.model);
    expect(await vm.v.exportVm(), `${name} re-exports as it was saved`).toEqual(before[name]);
    await restored.importVm({ vmId: `${name}-ref`, snapshot: before[name] });
    const ref = vmOn(restored, `${name}-ref`, probe.model);
    expect(await observe(vm, probe)).toEqual(await observe(ref, probe));
    expect(await further(vm, probe)).toEqual(await further(ref, probe));
  }
}

const logged = (lines: LogLine[], pred: (l: LogLine) => boolean) => lines.filter(pred);

describe("--state-dir: graceful restart", () => {
  it("SIGTERM writes every VM; a start with the same --state-dir brings them back with the same vm_id and state", async () => {
    const dir = await stateDir();
    const args = [...EPHEMERAL, "--state-dir", dir, "--snapshot-interval", "off"];
    const p1 = await startServerProcess(args);
    const c1 = connect(p1);
    const built = { "st-mock": await buildMockVm(c1, "st-mock"), "st-vtd": await buildVtdVm(c1, "st-vtd") };
    // A VM destroyed before the shutdown does not come back.
    await c1.createVm({ vmId: "st-gone", model: IommuModel.MOCK, guestMemoryBytes: MIB });
    await c1.destroyVm({ vmId: "st-gone" });
    // Observed before the shutdown too: the saved state includes what observing did.
    for (const [name, b] of Object.entries(built)) await observe(vmOn(c1, name, b.probe.model), b.probe);
    const before: Record<string, Buffer> = {};
    for (const name of Object.keys(built)) before[name] = await c1.vm(name).exportVm();
    const listing = await Promise.all(Object.entries(built).map(([name, b]) => listed(vmOn(c1, name, b.probe.model))));

    expect(await p1.kill("SIGTERM")).toEqual({ code: 0, signal: null });
    expect((await readdir(dir)).sort()).toEqual(["default.st-mock.vmsnap", "default.st-vtd.vmsnap"]);
    // The files are the ExportVm streams.
    for (const name of Object.keys(built)) expect(await readFile(fileOf(dir, name))).toEqual(before[name]);

    const p2 = await startServerProcess(args);
    const c2 = connect(p2);
    expect(await vmIds(c2)).toEqual(["st-mock", "st-vtd"]);
    expect(await Promise.all(Object.entries(built).map(([name, b]) => listed(vmOn(c2, name, b.probe.model))))).toEqual(listing);
    expect(logged(p2.lines, (l) => l.restored === 2 && l.failed === 0)).toHaveLength(1);
    await expectRestored(c2, built, before);
    expect(await p2.kill("SIGINT")).toEqual({ code: 0, signal: null });
  }, 120_000);

  it("DestroyVm removes the VM's file (here written by a periodic snapshot)", async () => {
    const dir = await stateDir();
    const p = await startServerProcess([...EPHEMERAL, "--state-dir", dir, "--snapshot-interval", "200ms"]);
    const c = connect(p);
    await c.createVm({ vmId: "doomed", model: IommuModel.MOCK, guestMemoryBytes: MIB });
    await c.createVm({ vmId: "kept", model: IommuModel.MOCK, guestMemoryBytes: MIB });
    await until("a periodic snapshot of both VMs", async () => (await readdir(dir)).filter((f) => f.endsWith(".vmsnap")).length === 2);
    await c.destroyVm({ vmId: "doomed" });
    await until("the destroyed VM's file to go", async () => !(await readdir(dir)).includes("default.doomed.vmsnap"));
    expect(await p.kill("SIGKILL")).toMatchObject({ signal: "SIGKILL" });
    const p2 = await startServerProcess([...EPHEMERAL, "--state-dir", dir, "--snapshot-interval", "off"]);
    expect(await vmIds(connect(p2))).toEqual(["kept"]);
  }, 60_000);

  it("each tenant's VMs come back to that tenant (mutual TLS; same vm_id in two tenants)", async (ctx: TestContext) => {
    const p = testPki.require(ctx);
    const dir = await stateDir();
    const args = [...EPHEMERAL, "--state-dir", dir, "--snapshot-interval", "off", "--tls-cert", p.server.certFile, "--tls-key", p.server.keyFile, "--tls-client-ca", p.ca.certFile];
    const as = (proc: ServerProcess, who: typeof p.tenantA) => connect(proc, { credentials: grpc.credentials.createSsl(p.ca.cert, who.key, who.cert) });
    const p1 = await startServerProcess(args);
    const [a1, b1] = [as(p1, p.tenantA), as(p1, p.tenantB)];
    await a1.createVm({ vmId: "same", model: IommuModel.MOCK, guestMemoryBytes: MIB });
    await a1.vm("same").writeGuestMemory({ gpa: 0n, data: pattern(4096, 1) });
    await b1.createVm({ vmId: "same", model: IommuModel.INTEL_VTD, guestMemoryBytes: 2n * MIB });
    await b1.vm("same").writeGuestMemory({ gpa: 0n, data: pattern(4096, 2) });
    await b1.createVm({ vmId: "only-b", model: IommuModel.MOCK, guestMemoryBytes: MIB });
    expect(await p1.kill("SIGTERM")).toEqual({ code: 0, signal: null });
    expect((await readdir(dir)).filter((f) => f.endsWith(".vmsnap"))).toHaveLength(3);

    const p2 = await startServerProcess(args);
    const [a2, b2] = [as(p2, p.tenantA), as(p2, p.tenantB)];
    expect((await a2.listVms({})).vms.map((v) => [v.vmId, v.tenant, v.model])).toEqual([["same", TENANT_A, IommuModel.MOCK]]);
    expect((await b2.listVms({})).vms.map((v) => [v.vmId, v.tenant, v.model])).toEqual([
      ["only-b", TENANT_B, IommuModel.MOCK],
      ["same", TENANT_B, IommuModel.INTEL_VTD],
    ]);
    expect(Buffer.from((await a2.vm("same").readGuestMemory({ gpa: 0n, length: 4096 })).data)).toEqual(Buffer.from(pattern(4096, 1)));
    expect(Buffer.from((await b2.vm("same").readGuestMemory({ gpa: 0n, length: 4096 })).data)).toEqual(Buffer.from(pattern(4096, 2)));
    expect(await p2.kill("SIGTERM")).toEqual({ code: 0, signal: null });
  }, 120_000);
});

describe("--snapshot-interval: a crash", () => {
  it("after SIGKILL the VMs are back as of their last periodic snapshot; what came after is lost", async () => {
    const dir = await stateDir();
    const args = [...EPHEMERAL, "--state-dir", dir, "--snapshot-interval", "1s"];
    // A periodic snapshot could land between the last change and the kill;
    // then that run proves nothing about loss and is repeated.
    for (let attempt = 1; ; attempt++) {
      await rm(dir, { recursive: true, force: true });
      const p1 = await startServerProcess(args);
      const c1 = connect(p1);
      const built = { "cr-mock": await buildMockVm(c1, "cr-mock"), "cr-vtd": await buildVtdVm(c1, "cr-vtd") };
      // Wait until the files hold exactly the VMs as they are now.
      const saved: Record<string, Buffer> = {};
      for (const name of Object.keys(built)) {
        saved[name] = await c1.vm(name).exportVm();
        await until(`a periodic snapshot of ${name}`, async () => (await readOrEmpty(fileOf(dir, name))).equals(saved[name]));
      }
      // Changes after that snapshot, then the crash.
      await c1.vm("cr-mock").writeGuestMemory({ gpa: 0n, data: pattern(4096, 99) });
      const { ioasId: lateIoas } = await c1.vm("cr-vtd").allocIoas();
      await c1.createVm({ vmId: "cr-late", model: IommuModel.MOCK, guestMemoryBytes: MIB });
      expect(await p1.kill("SIGKILL")).toMatchObject({ signal: "SIGKILL" });
      const files = await readdir(dir);
      const unchanged = (await Promise.all(Object.keys(built).map(async (n) => (await readOrEmpty(fileOf(dir, n))).equals(saved[n])))).every(Boolean);
      if ((!unchanged || files.includes("default.cr-late.vmsnap")) && attempt < 3) continue;
      expect(unchanged, "the files changed after the last change three times running").toBe(true);

      const p2 = await startServerProcess([...EPHEMERAL, "--state-dir", dir, "--snapshot-interval", "off"]);
      const c2 = connect(p2);
      expect(await vmIds(c2)).toEqual(["cr-mock", "cr-vtd"]);
      // The late changes are gone: RAM as before, the late IOAS id free again.
      expect(Buffer.from((await c2.vm("cr-mock").readGuestMemory({ gpa: 0n, length: 4096 })).data)).toEqual(Buffer.from(pattern(4096, 1)));
      expect((await c2.vm("cr-vtd").allocIoas()).ioasId).toBe(lateIoas);
      await c2.vm("cr-vtd").destroy({ id: lateIoas });
      await expectRestored(c2, built, saved);
      return;
    }
  }, 180_000);

  it("a damaged file and a partial temp file: the server starts, logs both, removes the temp file and restores the others", async () => {
    const dir = await stateDir();
    const args = [...EPHEMERAL, "--state-dir", dir, "--snapshot-interval", "off"];
    const p1 = await startServerProcess(args);
    const c1 = connect(p1);
    const built = { "ok-mock": await buildMockVm(c1, "ok-mock"), "ok-vtd": await buildVtdVm(c1, "ok-vtd") };
    await c1.createVm({ vmId: "hurt", model: IommuModel.MOCK, guestMemoryBytes: MIB });
    await c1.vm("hurt").writeGuestMemory({ gpa: 0n, data: pattern(8192, 5) });
    const before: Record<string, Buffer> = {};
    for (const name of Object.keys(built)) before[name] = await c1.vm(name).exportVm();
    expect(await p1.kill("SIGTERM")).toEqual({ code: 0, signal: null });

    // One flipped byte in a page of "hurt"; half of a newer "ok-mock" left by a crash mid-write;
    // a file cut short under a snapshot name; an unrelated file.
    const hurt = await readFile(fileOf(dir, "hurt"));
    hurt[hurt.length - 100] ^= 0x40;
    await writeFile(fileOf(dir, "hurt"), hurt);
    const temp = `${fileOf(dir, "ok-mock")}.tmp`;
    await writeFile(temp, before["ok-mock"].subarray(0, before["ok-mock"].length >> 1));
    const cut = fileOf(dir, "cut");
    await writeFile(cut, before["ok-vtd"].subarray(0, 1000));
    await writeFile(join(dir, "README"), "not a snapshot\n");

    const p2 = await startServerProcess(args);
    const c2 = connect(p2);
    expect(await vmIds(c2)).toEqual(["ok-mock", "ok-vtd"]);
    // Logged: each damaged file as an error naming it, the temp file, and the totals.
    for (const file of [fileOf(dir, "hurt"), cut]) expect(logged(p2.lines, (l) => l.file === file && (l.level ?? 0) >= 50)).toHaveLength(1);
    expect(logged(p2.lines, (l) => l.file === temp && (l.level ?? 0) >= 40)).toHaveLength(1);
    expect(logged(p2.lines, (l) => l.restored === 2 && l.failed === 2)).toHaveLength(1);
    // The temp file is gone; the damaged ones stay for inspection; the rest is untouched.
    expect((await readdir(dir)).sort()).toEqual(["README", "default.cut.vmsnap", "default.hurt.vmsnap", "default.ok-mock.vmsnap", "default.ok-vtd.vmsnap"]);
    await expectRestored(c2, built, before);
    expect(await p2.kill("SIGTERM")).toEqual({ code: 0, signal: null });
  }, 120_000);

  it("--snapshot-interval is validated; one beyond a timer's range is refused or honoured, never turned into 1 ms", async () => {
    for (const bad of ["soon", "0s", "-1s", "1.5s", "10"]) {
      await expect(startServerProcess([...EPHEMERAL, "--state-dir", await stateDir(), "--snapshot-interval", bad])).rejects.toThrow(/exited \(2\)/);
    }
    const dir = await stateDir();
    const started = await startServerProcess([...EPHEMERAL, "--state-dir", dir, "--snapshot-interval", "600h"]).catch((e: Error) => e);
    if (started instanceof Error) {
      expect(started.message).toMatch(/exited \(2\)/);
      return;
    }
    const c = connect(started);
    await c.createVm({ vmId: "quiet", model: IommuModel.MOCK, guestMemoryBytes: MIB });
    // 600 h from now is far away: nothing may be written in the next second and a half.
    await new Promise((r) => setTimeout(r, 1500));
    expect(await readdir(dir)).toEqual([]);
    expect(await started.kill("SIGTERM")).toEqual({ code: 0, signal: null });
    expect(await readdir(dir)).toEqual(["default.quiet.vmsnap"]);
  }, 60_000);
});
