/**
 * Quotas and limits (issue 6 item 3, api.md Errors): each limit of
 * server/core/limits.ts, and the message size, hit exactly at its value
 * (succeeds) and one unit beyond (RESOURCE_EXHAUSTED, ErrorInfo EDQUOT with
 * errno 122, and one google.rpc.QuotaFailure violation whose subject says
 * what the quota applies to and whose description names the limit and its
 * value). After each failure the test checks that nothing was half-created:
 * object ids and object_count, ListVms, guest RAM, mappings, IOTLB and
 * counters are as before, and the next success takes the id (or the place)
 * the failed call would have taken.
 *
 * ImportVm creates VMs, objects, mappings and touched RAM too: each limit
 * it could exceed is also checked on an import (of a snapshot made here, or
 * on a server with the default limits), and a refused import must leave
 * nothing behind.
 *
 * Each describe block runs its own server with that one limit set small, so
 * the tests are fast and the other limits stay out of the way. Without TLS
 * every caller is the one implicit tenant ("tenant:default"); one block uses
 * mutual TLS to show that tenant quotas are per tenant.
 */
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { anyUnpack } from "@bufbuild/protobuf/wkt";
import * as grpc from "@grpc/grpc-js";
import { afterAll, afterEach, beforeAll, describe, expect, it, type TestContext } from "vitest";
import { IommufdClient, IommufdError, type RpcName } from "../../client/client.js";
import { FS_A, SZ_2M } from "../../client/pagetable.js";
import { ErrorInfoSchema, QuotaFailureSchema } from "../../gen/google/rpc/error_details_pb.js";
import { type Status, StatusSchema } from "../../gen/google/rpc/status_pb.js";
import { IommufdService } from "../../gen/iommufd/v1/service_pb.js";
import { type Config, DEFAULT_CONFIG } from "../../server/config.js";
import type { Limits } from "../../server/core/limits.js";
import { createTestPki, opensslMissing, TENANT_A, TENANT_B, type TestPki } from "../e2e/certs.js";
import { skipBecause } from "../e2e/support.js";
import { startTestServer, type TestServer } from "../helpers/server.js";
import {
  bind,
  dumpIotlb,
  ERRNO,
  expectFail,
  expectInvalidateFail,
  GRPC_CODE,
  IommuModel,
  ioas,
  map,
  MIB,
  MOCK_APERTURE_START,
  objectCount,
  PAGE,
  pagingHwpt,
  selftestInv,
  type Vm,
  vtdInv,
} from "./helpers.js";
import { createNestedVm, expectFaults, stats } from "./translate-helpers.js";

const KIB = 1024;

// ---------------------------------------------------------------------------
// Servers with one small limit

interface QuotaEnv {
  readonly t: TestServer;
  readonly client: IommufdClient;
  /** A VM (1 MiB of RAM unless told otherwise) as the fixtures of helpers.ts use it. */
  vm(id: string, model?: IommuModel, guestMemoryBytes?: bigint, options?: { iotlbEntries?: number }): Promise<Vm>;
}

/** A server for the enclosing describe block with `limits` over the defaults; every VM is destroyed after each test. */
function quotaServer(limits: Partial<Limits>, config: Partial<Config> = {}): QuotaEnv {
  let t: TestServer | undefined;
  beforeAll(async () => {
    t = await startTestServer({ ...config, limits: { ...DEFAULT_CONFIG.limits, ...limits } });
  });
  afterAll(async () => {
    await t?.close();
  });
  afterEach(async () => {
    for (const vm of await listVmIds(env.client)) await env.client.destroyVm({ vmId: vm });
  });
  const env: QuotaEnv = {
    get t() {
      if (!t) throw new Error("server not started");
      return t;
    },
    get client() {
      return env.t.client;
    },
    async vm(id, model = IommuModel.MOCK, guestMemoryBytes = MIB, options = {}) {
      await env.client.createVm({ vmId: id, model, guestMemoryBytes, options });
      return { id, v: env.client.vm(id), client: env.client, model };
    },
  };
  return env;
}

async function listVmIds(client: IommufdClient): Promise<string[]> {
  const { vms, nextPageToken } = await client.listVms({ pageSize: 1000 });
  expect(nextPageToken).toBe("");
  return vms.map((vm) => vm.vmId).sort();
}

// ---------------------------------------------------------------------------
// The EDQUOT contract

type LimitName = keyof Limits | "maxMessageBytes";

/** The one QuotaFailure violation of an EDQUOT error: its subject, and a description naming `limit` and its value. */
function expectViolation(e: IommufdError, limit: LimitName, value: number, subject: string | RegExp): void {
  expect(e.quotaFailure, `a QuotaFailure on ${e.message}`).toBeDefined();
  const violations = e.quotaFailure!.violations;
  expect(violations, "exactly one QuotaFailure violation").toHaveLength(1);
  const [v] = violations;
  if (typeof subject === "string") expect(v.subject).toBe(subject);
  else expect(v.subject).toMatch(subject);
  expect(v.description, "the description names the limit").toMatch(new RegExp(`\\b${limit}\\b`));
  expect(v.description, "the description gives the limit's value").toMatch(new RegExp(`\\b${value}\\b`));
}

/**
 * Awaits a call that must hit `limit`: RESOURCE_EXHAUSTED, ErrorInfo
 * EDQUOT/122 and the QuotaFailure of expectViolation.
 */
async function expectQuota(call: Promise<unknown>, limit: LimitName, value: number, subject: string | RegExp): Promise<IommufdError> {
  const e = await expectFail(call, "EDQUOT");
  expect(e.code).toBe(grpc.status.RESOURCE_EXHAUSTED);
  expect(e.errnoValue).toBe(122);
  expectViolation(e, limit, value, subject);
  return e;
}

/** The same for Invalidate, whose failures also carry entries_handled (0: the count is checked before any entry). */
async function expectInvalidateQuota(call: Promise<unknown>, value: number): Promise<IommufdError> {
  const e = await expectInvalidateFail(call, "EDQUOT", 0);
  expectViolation(e, "invalidateEntries", value, "request");
  return e;
}

const TENANT = "tenant:default";
const vmSubject = (vmId: string) => `vm:${vmId}`;

/** A failed unary call at the wire level: its status and the google.rpc.Status of grpc-status-details-bin. */
interface RawFailure {
  readonly error: IommufdError;
  readonly code: grpc.status;
  readonly status: Status | undefined;
}

/** A unary call with raw request bytes: the response bytes, or the failure. */
function rawUnary(client: IommufdClient, rpc: RpcName, bytes: Uint8Array): Promise<Buffer | RawFailure> {
  const method = IommufdService.methods.find((m) => m.localName === rpc)!;
  return new Promise((resolve) => {
    client.grpc.makeUnaryRequest(
      `/${IommufdService.typeName}/${method.name}`,
      (b: Buffer) => b,
      (b: Buffer) => b,
      Buffer.from(bytes),
      (err: grpc.ServiceError | null, response?: Buffer) => {
        if (!err) return resolve(response!);
        const [bin] = err.metadata?.get("grpc-status-details-bin") ?? [];
        resolve({ error: IommufdError.from(err), code: err.code, status: bin instanceof Buffer ? fromBinary(StatusSchema, bin) : undefined });
      },
    );
  });
}

/** A raw call that must fail; its failure. */
async function rawFailure(client: IommufdClient, rpc: RpcName, bytes: Uint8Array): Promise<RawFailure> {
  const outcome = await rawUnary(client, rpc, bytes);
  if (Buffer.isBuffer(outcome)) throw new Error(`${rpc} of ${bytes.length} bytes succeeded; expected a failure`);
  return outcome as RawFailure;
}

/** The request of `rpc` encoded with protobuf-es. */
function encode<K extends RpcName>(rpc: K, request: object): Uint8Array {
  const method = IommufdService.methods.find((m) => m.localName === rpc)!;
  return toBinary(method.input, create(method.input, request as never));
}

/**
 * `bytes` followed by an unknown length-delimited field (number 15), sized
 * so that the whole message is exactly `total` bytes. Unknown fields are
 * legal protobuf and ignored by the server, so only the size changes.
 */
function paddedTo(bytes: Uint8Array, total: number): Buffer {
  for (let pad = Math.max(0, total - bytes.length - 6); pad <= total; pad++) {
    const len = varint(pad);
    if (bytes.length + 1 + len.length + pad === total) return Buffer.concat([bytes, Buffer.from([(15 << 3) | 2]), len, Buffer.alloc(pad, 0x5a)]);
  }
  throw new Error(`cannot pad ${bytes.length} bytes to ${total}`);
}

function varint(n: number): Buffer {
  const out: number[] = [];
  while (n >= 0x80) {
    out.push((n & 0x7f) | 0x80);
    n = Math.floor(n / 128);
  }
  out.push(n);
  return Buffer.from(out);
}

async function readBytes(vm: Vm, gpa: bigint, length: number): Promise<Buffer> {
  return Buffer.from((await vm.v.readGuestMemory({ gpa, length })).data);
}

const pageOf = (n: number) => BigInt(n) * PAGE;

/**
 * The ExportVm snapshot of a VM made on a server with the default limits
 * (so it can hold more than the server under test allows): `setup` fills it.
 */
async function foreignSnapshot(model: IommuModel, guestMemoryBytes: bigint, setup: (vm: Vm) => Promise<unknown> = async () => {}, options: { iotlbEntries?: number } = {}): Promise<Buffer> {
  const other = await startTestServer();
  try {
    await other.client.createVm({ vmId: "src", model, guestMemoryBytes, options });
    await setup({ id: "src", v: other.client.vm("src"), client: other.client, model });
    return await other.client.exportVm({ vmId: "src" });
  } finally {
    await other.close();
  }
}

// ---------------------------------------------------------------------------

describe("vmsPerTenant = 3", () => {
  const env = quotaServer({ vmsPerTenant: 3 });

  it("the 3rd VM is created; a 4th is EDQUOT for the tenant and is not created", async () => {
    await env.vm("q-a");
    await env.vm("q-b", IommuModel.INTEL_VTD);
    await env.vm("q-c");
    expect(await listVmIds(env.client)).toEqual(["q-a", "q-b", "q-c"]);

    await expectQuota(env.client.createVm({ vmId: "q-d", model: IommuModel.MOCK, guestMemoryBytes: MIB }), "vmsPerTenant", 3, TENANT);

    expect(await listVmIds(env.client)).toEqual(["q-a", "q-b", "q-c"]);
    await expectFail(env.client.getStats({ vmId: "q-d" }), "ENOENT");
    await expectFail(env.client.destroyVm({ vmId: "q-d" }), "ENOENT");
  });

  it("destroying a VM gives its slot back: the VM the failed call asked for is created next, then the limit holds again", async () => {
    for (const id of ["q-a", "q-b", "q-c"]) await env.vm(id);
    await expectQuota(env.client.createVm({ vmId: "q-d", model: IommuModel.MOCK, guestMemoryBytes: MIB }), "vmsPerTenant", 3, TENANT);
    await env.client.destroyVm({ vmId: "q-b" });
    const { vm } = await env.client.createVm({ vmId: "q-d", model: IommuModel.MOCK, guestMemoryBytes: MIB });
    expect(vm).toMatchObject({ vmId: "q-d", objectCount: 0 });
    expect(await listVmIds(env.client)).toEqual(["q-a", "q-c", "q-d"]);
    await expectQuota(env.client.createVm({ vmId: "q-b", model: IommuModel.MOCK, guestMemoryBytes: MIB }), "vmsPerTenant", 3, TENANT);
  });

  it("ImportVm counts as a VM: refused at the limit, leaving nothing; after a destroy, the same import succeeds", async () => {
    for (const id of ["q-a", "q-b", "q-c"]) await env.vm(id);
    const snapshot = await env.client.exportVm({ vmId: "q-a" });
    await expectQuota(env.client.importVm({ vmId: "q-d", snapshot }), "vmsPerTenant", 3, TENANT);
    expect(await listVmIds(env.client)).toEqual(["q-a", "q-b", "q-c"]);
    await env.client.destroyVm({ vmId: "q-b" });
    expect((await env.client.importVm({ vmId: "q-d", snapshot })).vm?.vmId).toBe("q-d");
    expect(await listVmIds(env.client)).toEqual(["q-a", "q-c", "q-d"]);
  });
});

describe("guestMemoryBytesPerVm = 1 MiB", () => {
  const LIMIT = 1 << 20;
  const env = quotaServer({ guestMemoryBytesPerVm: LIMIT });

  it("a VM of exactly 1 MiB is created; 1 MiB + 4 KiB (the next valid size) is EDQUOT for that VM and nothing is created", async () => {
    const { vm } = await env.client.createVm({ vmId: "q-at", model: IommuModel.MOCK, guestMemoryBytes: BigInt(LIMIT) });
    expect(vm?.guestMemoryBytes).toBe(BigInt(LIMIT));

    for (const model of [IommuModel.MOCK, IommuModel.INTEL_VTD]) {
      await expectQuota(
        env.client.createVm({ vmId: "q-over", model, guestMemoryBytes: BigInt(LIMIT) + PAGE }),
        "guestMemoryBytesPerVm",
        LIMIT,
        vmSubject("q-over"),
      );
    }
    expect(await listVmIds(env.client)).toEqual(["q-at"]);
    // The id is free: the same VM within the limit is created.
    await env.client.createVm({ vmId: "q-over", model: IommuModel.MOCK, guestMemoryBytes: BigInt(LIMIT) });
    expect(await listVmIds(env.client)).toEqual(["q-at", "q-over"]);
  });

  it("ImportVm of a 1 MiB + 4 KiB VM is EDQUOT and creates nothing", async () => {
    const snapshot = await foreignSnapshot(IommuModel.MOCK, BigInt(LIMIT) + PAGE);
    await expectQuota(env.client.importVm({ vmId: "q-imp", snapshot }), "guestMemoryBytesPerVm", LIMIT, vmSubject("q-imp"));
    expect(await listVmIds(env.client)).toEqual([]);
  });
});

describe("guestMemoryBytesPerTenant = 4 MiB (declared RAM summed over the tenant's VMs)", () => {
  const LIMIT = 4 << 20;
  const env = quotaServer({ guestMemoryBytesPerTenant: LIMIT });

  it("VMs of 1 MiB and 3 MiB fill it exactly; one more page in any VM is EDQUOT for the tenant", async () => {
    await env.vm("q-a", IommuModel.MOCK, MIB);
    await env.vm("q-b", IommuModel.INTEL_VTD, 3n * MIB);
    await expectQuota(env.client.createVm({ vmId: "q-c", model: IommuModel.MOCK, guestMemoryBytes: PAGE }), "guestMemoryBytesPerTenant", LIMIT, TENANT);
    expect(await listVmIds(env.client)).toEqual(["q-a", "q-b"]);
  });

  it("destroying a VM gives its share back, and only its share", async () => {
    await env.vm("q-a", IommuModel.MOCK, MIB);
    await env.vm("q-b", IommuModel.MOCK, 3n * MIB);
    await env.client.destroyVm({ vmId: "q-a" });
    await expectQuota(env.client.createVm({ vmId: "q-c", model: IommuModel.MOCK, guestMemoryBytes: MIB + PAGE }), "guestMemoryBytesPerTenant", LIMIT, TENANT);
    await env.vm("q-c", IommuModel.MOCK, MIB);
    await expectQuota(env.client.createVm({ vmId: "q-d", model: IommuModel.MOCK, guestMemoryBytes: PAGE }), "guestMemoryBytesPerTenant", LIMIT, TENANT);
    expect(await listVmIds(env.client)).toEqual(["q-b", "q-c"]);
  });

  it("a single VM of the whole 4 MiB is within it (the per-VM limit is another one)", async () => {
    await env.vm("q-all", IommuModel.MOCK, BigInt(LIMIT));
    await expectQuota(env.client.createVm({ vmId: "q-more", model: IommuModel.MOCK, guestMemoryBytes: PAGE }), "guestMemoryBytesPerTenant", LIMIT, TENANT);
  });

  it("ImportVm adds its declared RAM: refused over the sum, leaving nothing; within it once a VM is gone", async () => {
    await env.vm("q-a", IommuModel.MOCK, MIB);
    await env.vm("q-b", IommuModel.MOCK, 3n * MIB);
    const snapshot = await env.client.exportVm({ vmId: "q-a" });
    await expectQuota(env.client.importVm({ vmId: "q-c", snapshot }), "guestMemoryBytesPerTenant", LIMIT, TENANT);
    expect(await listVmIds(env.client)).toEqual(["q-a", "q-b"]);
    await env.client.destroyVm({ vmId: "q-a" });
    await env.client.importVm({ vmId: "q-c", snapshot });
    await expectQuota(env.client.createVm({ vmId: "q-d", model: IommuModel.MOCK, guestMemoryBytes: PAGE }), "guestMemoryBytesPerTenant", LIMIT, TENANT);
  });
});

describe("touchedBytesPerVm = 16 KiB (4 pages written)", () => {
  const LIMIT = 16 * KIB;
  const env = quotaServer({ touchedBytesPerVm: LIMIT });

  it("4 written pages are within it; a write that would touch a 5th page is EDQUOT for the VM and writes nothing", async () => {
    const vm = await env.vm("q-touch");
    // Reading costs nothing: untouched RAM reads as zero without being touched.
    expect((await readBytes(vm, 0n, 256 * KIB)).every((b) => b === 0)).toBe(true);
    await vm.v.writeGuestMemory({ gpa: 0x10n, data: Buffer.from([1]) }); // page 0
    await vm.v.writeGuestMemory({ gpa: pageOf(1) + 0xfffn, data: Buffer.from([2]) }); // page 1
    await vm.v.writeGuestMemory({ gpa: pageOf(2), data: Buffer.alloc(2 * 4096, 3) }); // pages 2 and 3

    // Rewriting touched pages adds nothing.
    await vm.v.writeGuestMemory({ gpa: 0n, data: Buffer.alloc(4 * 4096, 4) });

    // Pages 3 (touched) and 4 (not): the whole write fails, page 3 keeps its bytes.
    await expectQuota(vm.v.writeGuestMemory({ gpa: pageOf(3) + 0x800n, data: Buffer.alloc(4096, 5) }), "touchedBytesPerVm", LIMIT, vmSubject("q-touch"));
    expect((await readBytes(vm, pageOf(3), 4096)).every((b) => b === 4)).toBe(true);
    expect((await readBytes(vm, pageOf(4), 4096)).every((b) => b === 0)).toBe(true);
    await expectQuota(vm.v.writeGuestMemory({ gpa: pageOf(100), data: Buffer.from([6]) }), "touchedBytesPerVm", LIMIT, vmSubject("q-touch"));
  });

  it("a failed write consumes nothing: with one page left, a 2-page write fails and the page is still there to write", async () => {
    const vm = await env.vm("q-left");
    await vm.v.writeGuestMemory({ gpa: 0n, data: Buffer.alloc(3 * 4096, 1) });
    await expectQuota(vm.v.writeGuestMemory({ gpa: pageOf(3), data: Buffer.alloc(2 * 4096, 2) }), "touchedBytesPerVm", LIMIT, vmSubject("q-left"));
    await vm.v.writeGuestMemory({ gpa: pageOf(3), data: Buffer.alloc(4096, 2) });
    expect((await readBytes(vm, pageOf(3), 2 * 4096)).equals(Buffer.concat([Buffer.alloc(4096, 2), Buffer.alloc(4096, 0)]))).toBe(true);
  });

  it("is per VM: another VM has its own 4 pages", async () => {
    const a = await env.vm("q-one");
    const b = await env.vm("q-two");
    await a.v.writeGuestMemory({ gpa: 0n, data: Buffer.alloc(LIMIT, 1) });
    await b.v.writeGuestMemory({ gpa: 0n, data: Buffer.alloc(LIMIT, 2) });
    await expectQuota(b.v.writeGuestMemory({ gpa: BigInt(LIMIT), data: Buffer.from([1]) }), "touchedBytesPerVm", LIMIT, vmSubject("q-two"));
  });

  it("ImportVm of a VM with 5 written pages is EDQUOT and leaves nothing", async () => {
    const snapshot = await foreignSnapshot(IommuModel.MOCK, MIB, (vm) => vm.v.writeGuestMemory({ gpa: 0n, data: Buffer.alloc(5 * 4096, 1) }));
    await expectQuota(env.client.importVm({ vmId: "q-imp", snapshot }), "touchedBytesPerVm", LIMIT, vmSubject("q-imp"));
    expect(await listVmIds(env.client)).toEqual([]);
  });
});

describe("touchedBytesPerTenant = 32 KiB (written pages summed over the tenant's VMs)", () => {
  const LIMIT = 32 * KIB;
  const env = quotaServer({ touchedBytesPerTenant: LIMIT });

  it("5 pages in one VM and 3 in another fill it exactly; any new page in any VM is EDQUOT for the tenant", async () => {
    const a = await env.vm("q-a");
    const b = await env.vm("q-b");
    await a.v.writeGuestMemory({ gpa: 0n, data: Buffer.alloc(5 * 4096, 1) });
    await b.v.writeGuestMemory({ gpa: 0n, data: Buffer.alloc(3 * 4096, 2) });

    await expectQuota(b.v.writeGuestMemory({ gpa: pageOf(3), data: Buffer.from([9]) }), "touchedBytesPerTenant", LIMIT, TENANT);
    await expectQuota(a.v.writeGuestMemory({ gpa: pageOf(7), data: Buffer.from([9]) }), "touchedBytesPerTenant", LIMIT, TENANT);
    const c = await env.vm("q-c");
    await expectQuota(c.v.writeGuestMemory({ gpa: 0n, data: Buffer.from([9]) }), "touchedBytesPerTenant", LIMIT, TENANT);
    expect((await readBytes(b, pageOf(3), 4096)).every((x) => x === 0)).toBe(true);
    // Touched pages can still be rewritten.
    await b.v.writeGuestMemory({ gpa: 0n, data: Buffer.alloc(3 * 4096, 7) });
  });

  it("destroying a VM gives its pages back, and only its pages", async () => {
    const a = await env.vm("q-a");
    const b = await env.vm("q-b");
    await a.v.writeGuestMemory({ gpa: 0n, data: Buffer.alloc(5 * 4096, 1) });
    await b.v.writeGuestMemory({ gpa: 0n, data: Buffer.alloc(3 * 4096, 2) });
    await env.client.destroyVm({ vmId: "q-a" });

    await expectQuota(b.v.writeGuestMemory({ gpa: pageOf(3), data: Buffer.alloc(6 * 4096, 3) }), "touchedBytesPerTenant", LIMIT, TENANT);
    await b.v.writeGuestMemory({ gpa: pageOf(3), data: Buffer.alloc(5 * 4096, 3) });
    await expectQuota(b.v.writeGuestMemory({ gpa: pageOf(8), data: Buffer.from([4]) }), "touchedBytesPerTenant", LIMIT, TENANT);
    // A VM created after the destroy starts from the tenant's usage, not from zero.
    const c = await env.vm("q-c");
    await expectQuota(c.v.writeGuestMemory({ gpa: 0n, data: Buffer.from([5]) }), "touchedBytesPerTenant", LIMIT, TENANT);
  });

  it("ImportVm adds its written pages: refused over the sum and gives back what it had taken; fits exactly once a VM is gone", async () => {
    const a = await env.vm("q-a");
    const b = await env.vm("q-b");
    await a.v.writeGuestMemory({ gpa: 0n, data: Buffer.alloc(5 * 4096, 1) });
    await b.v.writeGuestMemory({ gpa: 0n, data: Buffer.alloc(3 * 4096, 2) });
    const snapshot = await env.client.exportVm({ vmId: "q-a" });
    await expectQuota(env.client.importVm({ vmId: "q-c", snapshot }), "touchedBytesPerTenant", LIMIT, TENANT);
    expect(await listVmIds(env.client)).toEqual(["q-a", "q-b"]);

    // a's 5 pages go; the import of its 5 pages then fills the tenant exactly.
    await env.client.destroyVm({ vmId: "q-a" });
    await env.client.importVm({ vmId: "q-c", snapshot });
    expect((await readBytes({ ...a, id: "q-c", v: env.client.vm("q-c") }, 0n, 5 * 4096)).every((x) => x === 1)).toBe(true);
    await expectQuota(b.v.writeGuestMemory({ gpa: pageOf(3), data: Buffer.from([3]) }), "touchedBytesPerTenant", LIMIT, TENANT);
  });
});

describe("objectsPerVm = 4", () => {
  const LIMIT = 4;
  const env = quotaServer({ objectsPerVm: LIMIT });

  /** A mock VM at the limit: device 1, IOAS 2, paging HWPT 3 on it, IOAS 4. */
  async function full(id: string) {
    const vm = await env.vm(id);
    const dev = await bind(vm, { name: "0000:00:01.0" });
    const ioasId = await ioas(vm);
    await map(vm, ioasId, { iova: MOCK_APERTURE_START });
    const hwpt = await pagingHwpt(vm, dev, ioasId);
    const spare = await ioas(vm);
    expect([dev, ioasId, hwpt, spare]).toEqual([1, 2, 3, 4]);
    expect(await objectCount(vm)).toBe(LIMIT);
    return { vm, dev, ioasId, hwpt, spare };
  }

  it("at 4 objects, every call that would create a 5th is EDQUOT for the VM and creates nothing", async () => {
    const { vm, dev, ioasId, hwpt } = await full("q-obj");
    const subject = vmSubject("q-obj");
    await expectQuota(vm.v.allocIoas(), "objectsPerVm", LIMIT, subject);
    await expectQuota(vm.v.bindDevice({ name: "0000:00:02.0" }), "objectsPerVm", LIMIT, subject);
    await expectQuota(vm.v.allocHwpt({ devId: dev, ptId: ioasId }), "objectsPerVm", LIMIT, subject);
    // Attaching to an IOAS would create an auto domain: refused, and the device stays blocked.
    await expectQuota(vm.v.attachDevice({ devId: dev, ptId: ioasId }), "objectsPerVm", LIMIT, subject);
    const blocked = await vm.v.translate({ devId: dev, iovas: [MOCK_APERTURE_START] });
    expect(blocked.faults.map((f) => f.reasonName)).toEqual(["BLOCKED"]);
    expect(await objectCount(vm)).toBe(LIMIT);

    // Attaching to the existing HWPT creates nothing, so it is allowed at the limit.
    expect((await vm.v.attachDevice({ devId: dev, ptId: hwpt })).hwptId).toBe(hwpt);
    const mapped = await vm.v.translate({ devId: dev, iovas: [MOCK_APERTURE_START + 0x10n] });
    expect(mapped.faults).toEqual([]);
    expect(mapped.addresses).toEqual([0x10n]);
    expect(await objectCount(vm)).toBe(LIMIT);
  });

  it("after a destroy, the next object takes the id the failed call would have had, and the failed device name is free", async () => {
    const { vm, spare } = await full("q-ids");
    await expectQuota(vm.v.bindDevice({ name: "0000:00:02.0" }), "objectsPerVm", LIMIT, vmSubject("q-ids"));
    await vm.v.destroy({ id: spare });
    expect(await objectCount(vm)).toBe(LIMIT - 1);
    expect((await vm.v.bindDevice({ name: "0000:00:02.0" })).devId).toBe(spare);
    expect(await objectCount(vm)).toBe(LIMIT);
    await expectQuota(vm.v.allocIoas(), "objectsPerVm", LIMIT, vmSubject("q-ids"));
  });

  it("is per VM: another VM has its own 4 objects", async () => {
    await full("q-first");
    const other = await env.vm("q-second");
    for (let i = 1; i <= LIMIT; i++) expect(await ioas(other)).toBe(i);
    await expectQuota(other.v.allocIoas(), "objectsPerVm", LIMIT, vmSubject("q-second"));
  });

  it("ImportVm of a VM with 5 objects is EDQUOT and leaves nothing; one with 4 imports", async () => {
    const five = await foreignSnapshot(IommuModel.MOCK, MIB, async (vm) => {
      for (let i = 0; i < 5; i++) await ioas(vm);
    });
    await expectQuota(env.client.importVm({ vmId: "q-imp", snapshot: five }), "objectsPerVm", LIMIT, vmSubject("q-imp"));
    expect(await listVmIds(env.client)).toEqual([]);

    await full("q-four");
    const { vm } = await env.client.importVm({ vmId: "q-copy", snapshot: await env.client.exportVm({ vmId: "q-four" }) });
    expect(vm?.objectCount).toBe(LIMIT);
  });
});

describe("mappedBytesPerIoas = 64 KiB", () => {
  const LIMIT = 64 * KIB;
  const L = BigInt(LIMIT);
  const env = quotaServer({ mappedBytesPerIoas: LIMIT });

  /** A VT-d VM whose device is attached to a paging HWPT on the IOAS, so that stage 2 is observable with Translate. */
  async function attached(id: string) {
    const vm = await env.vm(id, IommuModel.INTEL_VTD, MIB);
    const dev = await bind(vm);
    const ioasId = await ioas(vm);
    const hwpt = await pagingHwpt(vm, dev, ioasId);
    await vm.v.attachDevice({ devId: dev, ptId: hwpt });
    return { vm, dev, ioasId, subject: new RegExp(`^vm:${id}/ioas:${ioasId}$`) };
  }

  it("two 32 KiB areas fill it exactly; one more page is EDQUOT for the IOAS and maps nothing", async () => {
    const { vm, dev, ioasId, subject } = await attached("q-map");
    await map(vm, ioasId, { iova: 0n, userVa: 0n, length: L / 2n });
    await map(vm, ioasId, { iova: 0x10000n, userVa: 0x8000n, length: L / 2n });

    await expectQuota(vm.v.mapIoas({ ioasId, iova: 0x20000n, userVa: 0x20000n, length: PAGE, readable: true, writeable: true }), "mappedBytesPerIoas", LIMIT, subject);
    await expectQuota(vm.v.mapIoas({ ioasId, userVa: 0x20000n, length: PAGE, readable: true, writeable: true }), "mappedBytesPerIoas", LIMIT, subject);

    // Nothing at 0x20000: stage 2 does not translate it and there is no area to unmap.
    const r = await vm.v.translate({ devId: dev, iovas: [0x20010n, 0x10010n] });
    expectFaults(r, [0x20010n, 0x10010n], { 0: 0x79 });
    expect(r.addresses[1]).toBe(0x8010n);
    await expectFail(vm.v.unmapIoas({ ioasId, iova: 0x20000n, length: PAGE }), "ENOENT");
    expect(await objectCount(vm)).toBe(3);

    // Unmapping an area gives its bytes back: the failed mapping now fits, at the place it asked for.
    expect((await vm.v.unmapIoas({ ioasId, iova: 0x10000n, length: L / 2n })).length).toBe(L / 2n);
    expect(await map(vm, ioasId, { iova: 0x20000n, userVa: 0x20000n, length: PAGE })).toBe(0x20000n);
    expect((await vm.v.translate({ devId: dev, iovas: [0x20010n] })).addresses).toEqual([0x20010n]);
    await map(vm, ioasId, { iova: 0x30000n, userVa: 0x30000n, length: L / 2n - PAGE });
    await expectQuota(vm.v.mapIoas({ ioasId, iova: 0x40000n, userVa: 0n, length: PAGE, readable: true, writeable: true }), "mappedBytesPerIoas", LIMIT, subject);
    expect((await vm.v.unmapIoas({ ioasId, iova: 0n, length: (1n << 64n) - 1n })).length).toBe(L);
  });

  it("a single mapping of 64 KiB fits, 64 KiB + 4 KiB does not", async () => {
    const { vm, ioasId, subject } = await attached("q-single");
    await expectQuota(vm.v.mapIoas({ ioasId, iova: 0n, userVa: 0n, length: L + PAGE, readable: true, writeable: true }), "mappedBytesPerIoas", LIMIT, subject);
    await map(vm, ioasId, { iova: 0n, userVa: 0n, length: L });
  });

  it("CopyIoas into a full IOAS is EDQUOT too; another IOAS of the same VM has its own 64 KiB", async () => {
    const { vm, ioasId: full, dev, subject } = await attached("q-copy");
    await map(vm, full, { iova: 0n, userVa: 0n, length: L });
    const other = await ioas(vm);
    await map(vm, other, { iova: 0x100000n, userVa: 0x10000n, length: L });
    await expectQuota(
      vm.v.copyIoas({ dstIoasId: full, srcIoasId: other, srcIova: 0x100000n, length: PAGE, dstIova: 0x100000n, readable: true, writeable: true }),
      "mappedBytesPerIoas",
      LIMIT,
      subject,
    );
    expectFaults(await vm.v.translate({ devId: dev, iovas: [0x100000n] }), [0x100000n], { 0: 0x79 });
    // The copy succeeds into a third IOAS, whose quota is its own.
    const third = await ioas(vm);
    expect((await vm.v.copyIoas({ dstIoasId: third, srcIoasId: other, srcIova: 0x100000n, length: L, dstIova: 0n, readable: true, writeable: true })).dstIova).toBe(0n);
  });

  it("ImportVm of an IOAS with 64 KiB + 4 KiB mapped is EDQUOT and leaves nothing; one with 64 KiB imports", async () => {
    const over = await foreignSnapshot(IommuModel.INTEL_VTD, MIB, async (vm) => map(vm, await ioas(vm), { iova: 0n, userVa: 0n, length: L + PAGE }));
    await expectQuota(env.client.importVm({ vmId: "q-imp", snapshot: over }), "mappedBytesPerIoas", LIMIT, /^vm:q-imp\/ioas:1$/);
    expect(await listVmIds(env.client)).toEqual([]);

    const { vm, ioasId } = await attached("q-at");
    await map(vm, ioasId, { iova: 0n, userVa: 0n, length: L });
    await env.client.importVm({ vmId: "q-copy", snapshot: await env.client.exportVm({ vmId: "q-at" }) });
    const copy = env.client.vm("q-copy");
    await expectQuota(copy.mapIoas({ ioasId, iova: L, userVa: 0n, length: PAGE, readable: true, writeable: true }), "mappedBytesPerIoas", LIMIT, new RegExp(`^vm:q-copy/ioas:${ioasId}$`));
  });
});

describe("iotlbEntriesPerVm = 8192", () => {
  const LIMIT = 8192;
  const env = quotaServer({ iotlbEntriesPerVm: LIMIT });

  it("a VM with iotlb_entries 8192 is created; 8193 is EDQUOT for that VM and nothing is created", async () => {
    const { vm } = await env.client.createVm({ vmId: "q-tlb", model: IommuModel.INTEL_VTD, guestMemoryBytes: MIB, options: { iotlbEntries: LIMIT } });
    expect(vm?.options?.iotlbEntries).toBe(LIMIT);
    await expectQuota(
      env.client.createVm({ vmId: "q-big", model: IommuModel.INTEL_VTD, guestMemoryBytes: MIB, options: { iotlbEntries: LIMIT + 1 } }),
      "iotlbEntriesPerVm",
      LIMIT,
      vmSubject("q-big"),
    );
    expect(await listVmIds(env.client)).toEqual(["q-tlb"]);
    // The default (4096) and 0 (no IOTLB) are within it; the refused id is free.
    expect((await env.client.createVm({ vmId: "q-big", model: IommuModel.INTEL_VTD, guestMemoryBytes: MIB })).vm?.options?.iotlbEntries).toBe(4096);
    await env.client.createVm({ vmId: "q-none", model: IommuModel.INTEL_VTD, guestMemoryBytes: MIB, options: { iotlbEntries: 0 } });
  });

  it("ImportVm of a VM with iotlb_entries 8193 is EDQUOT and creates nothing", async () => {
    const snapshot = await foreignSnapshot(IommuModel.INTEL_VTD, MIB, async () => {}, { iotlbEntries: LIMIT + 1 });
    await expectQuota(env.client.importVm({ vmId: "q-imp", snapshot }), "iotlbEntriesPerVm", LIMIT, vmSubject("q-imp"));
    expect(await listVmIds(env.client)).toEqual([]);
  });
});

describe("translateBatch = 16", () => {
  const LIMIT = 16;
  const env = quotaServer({ translateBatch: LIMIT });
  const pages = (base: bigint, n: number) => Array.from({ length: n }, (_, i) => base + BigInt(i) * PAGE + 0x10n);

  it("16 IOVAs are translated; 17 are EDQUOT per request, and none of them is translated, cached or counted", async () => {
    const nv = await createNestedVm(env.t, "q-dma", { guestBytes: 64n * MIB });
    await nv.s1.map(0x200000n, 0x400000n, SZ_2M);
    await nv.s1.map(0x400000n, 0x600000n, SZ_2M);

    const ok = await nv.vm.translate({ devId: nv.devId, iovas: pages(0x200000n, LIMIT) });
    expect(ok.faults).toEqual([]);
    expect(ok.addresses).toEqual(pages(0x400000n, LIMIT));

    const before = { stats: await stats(nv.vm), iotlb: await dumpIotlb({ id: nv.vmId, v: nv.vm, client: env.client, model: IommuModel.INTEL_VTD }, nv.nestedId) };
    await expectQuota(nv.vm.translate({ devId: nv.devId, iovas: pages(0x400000n, LIMIT + 1) }), "translateBatch", LIMIT, "request");
    expect(await stats(nv.vm)).toEqual(before.stats);
    expect(await dumpIotlb({ id: nv.vmId, v: nv.vm, client: env.client, model: IommuModel.INTEL_VTD }, nv.nestedId)).toEqual(before.iotlb);
    // No walk happened: the second leaf's Accessed bit is still clear.
    expect((await nv.s1.readEntry(0x400000n, 2)) & FS_A).toBe(0n);

    // The same IOVAs in two requests within the limit.
    const first = await nv.vm.translate({ devId: nv.devId, iovas: pages(0x400000n, LIMIT) });
    const last = await nv.vm.translate({ devId: nv.devId, iovas: pages(0x400000n + BigInt(LIMIT) * PAGE, 1) });
    expect([...first.addresses, ...last.addresses]).toEqual(pages(0x600000n, LIMIT + 1));
    expect((await nv.s1.readEntry(0x400000n, 2)) & FS_A).toBe(FS_A);
  });

  it("the batch size is checked before the device is looked up", async () => {
    const vm = await env.vm("q-nodev");
    await expectQuota(vm.v.translate({ devId: 99, iovas: pages(0n, LIMIT + 1) }), "translateBatch", LIMIT, "request");
    await expectFail(vm.v.translate({ devId: 99, iovas: pages(0n, LIMIT) }), "ENOENT");
  });
});

describe("invalidateEntries = 8", () => {
  const LIMIT = 8;
  const env = quotaServer({ invalidateEntries: LIMIT });
  const entries = (n: number, base = 0x10_0000_0000n) => Array.from({ length: n }, (_, i) => ({ addr: base + BigInt(i) * PAGE, npages: 1n }));

  it("VT-d: 8 entries are handled; 9 are EDQUOT with entries_handled 0, and nothing is invalidated or counted", async () => {
    const nv = await createNestedVm(env.t, "q-inv", { guestBytes: 64n * MIB });
    await nv.s1.map(0x200000n, 0x400000n, SZ_2M);
    const vm: Vm = { id: nv.vmId, v: nv.vm, client: env.client, model: IommuModel.INTEL_VTD };
    await nv.vm.translate({ devId: nv.devId, iovas: [0x200000n, 0x201000n] });

    expect((await nv.vm.invalidate({ hwptId: nv.nestedId, requests: vtdInv(entries(LIMIT)) })).entriesHandled).toBe(LIMIT);
    const before = { stats: await stats(nv.vm), iotlb: await dumpIotlb(vm, nv.nestedId) };
    expect(before.iotlb.entries).toHaveLength(2);
    expect(before.stats.invalidationEntries).toBe(LIMIT);

    // Nine entries, the first of which covers the cached translations.
    const nine = [{ addr: 0x200000n, npages: 512n }, ...entries(LIMIT)];
    await expectInvalidateQuota(nv.vm.invalidate({ hwptId: nv.nestedId, requests: vtdInv(nine) }), LIMIT);
    // The raw form counts entry_num, before reading any entry (here only one is present in data).
    const raw = { case: "raw" as const, value: { dataType: 0, entryLen: 24, entryNum: LIMIT + 1, data: new Uint8Array(24) } };
    await expectInvalidateQuota(nv.vm.invalidate({ hwptId: nv.nestedId, requests: raw }), LIMIT);
    expect(await dumpIotlb(vm, nv.nestedId)).toEqual(before.iotlb);
    expect(await stats(nv.vm)).toEqual(before.stats);

    // ...and before the HWPT is looked up.
    await expectInvalidateQuota(nv.vm.invalidate({ hwptId: 999, requests: vtdInv(entries(LIMIT + 1)) }), LIMIT);
  });

  it("selftest (MOCK): 8 entries are handled; 9 are EDQUOT and the mock IOTLB keeps its values", async () => {
    const vm = await env.vm("q-mock-inv");
    const dev = await bind(vm);
    const ioasId = await ioas(vm);
    const parent = await pagingHwpt(vm, dev, ioasId, { nestParent: true });
    const { hwptId } = await vm.v.allocHwpt({ devId: dev, ptId: parent, data: { case: "selftest", value: { iotlb: 0xbadbeef } } });
    const all = (n: number) => Array.from({ length: n }, (_, i) => ({ iotlbId: i % 4, all: i === n - 1 }));

    await expectInvalidateQuota(vm.v.invalidate({ hwptId, requests: selftestInv(all(LIMIT + 1)) }), LIMIT);
    expect((await dumpIotlb(vm, hwptId)).selftestIotlb).toEqual([0xbadbeef, 0xbadbeef, 0xbadbeef, 0xbadbeef]);
    expect((await vm.v.invalidate({ hwptId, requests: selftestInv(all(LIMIT)) })).entriesHandled).toBe(LIMIT);
    expect((await dumpIotlb(vm, hwptId)).selftestIotlb).toEqual([0, 0, 0, 0]);
  });
});

describe("guestIoBytes = 4 KiB (WriteGuestMemory / ReadGuestMemory)", () => {
  const LIMIT = 4 * KIB;
  const env = quotaServer({ guestIoBytes: LIMIT });

  it("a 4096-byte write and read pass; 4097 bytes is EDQUOT per request and writes nothing", async () => {
    const vm = await env.vm("q-io");
    const data = Buffer.alloc(LIMIT, 0xa5);
    await vm.v.writeGuestMemory({ gpa: 0x800n, data });
    expect((await readBytes(vm, 0x800n, LIMIT)).equals(data)).toBe(true);

    await expectQuota(vm.v.writeGuestMemory({ gpa: 0x10000n, data: Buffer.alloc(LIMIT + 1, 0x5a) }), "guestIoBytes", LIMIT, "request");
    expect((await readBytes(vm, 0x10000n, LIMIT)).every((b) => b === 0)).toBe(true);
    await expectQuota(vm.v.readGuestMemory({ gpa: 0n, length: LIMIT + 1 }), "guestIoBytes", LIMIT, "request");
  });

  it("the size is checked before the range: an oversize request beyond guest RAM is EDQUOT, not EFAULT", async () => {
    const vm = await env.vm("q-range");
    await expectQuota(vm.v.writeGuestMemory({ gpa: 2n * MIB, data: Buffer.alloc(LIMIT + 1) }), "guestIoBytes", LIMIT, "request");
    await expectQuota(vm.v.readGuestMemory({ gpa: 2n * MIB, length: LIMIT + 1 }), "guestIoBytes", LIMIT, "request");
    await expectFail(vm.v.writeGuestMemory({ gpa: 2n * MIB, data: Buffer.alloc(LIMIT) }), "EFAULT");
  });
});

describe("maxMessageBytes = 4 KiB (both directions)", () => {
  const LIMIT = 4 * KIB;
  const env = quotaServer({}, { maxMessageBytes: LIMIT });

  /** The whole EDQUOT contract on the wire: code, exactly an ErrorInfo and a QuotaFailure in google.rpc.Status. */
  function expectMessageQuota(f: RawFailure): void {
    expect(f.code, f.error.message).toBe(grpc.status.RESOURCE_EXHAUSTED);
    expect(f.status, `grpc-status-details-bin of ${f.error.message}`).toBeDefined();
    expect(f.status!.code).toBe(grpc.status.RESOURCE_EXHAUSTED);
    expect(f.status!.details.map((d) => d.typeUrl).sort()).toEqual(["type.googleapis.com/google.rpc.ErrorInfo", "type.googleapis.com/google.rpc.QuotaFailure"]);
    const info = anyUnpack(f.status!.details.find((d) => d.typeUrl.endsWith("ErrorInfo"))!, ErrorInfoSchema)!;
    expect(info).toMatchObject({ reason: "EDQUOT", domain: "iommufd.v1", metadata: { errno: String(ERRNO.EDQUOT) } });
    const quota = anyUnpack(f.status!.details.find((d) => d.typeUrl.endsWith("QuotaFailure"))!, QuotaFailureSchema)!;
    expect(quota.violations).toHaveLength(1);
    expectViolation(f.error, "maxMessageBytes", LIMIT, "request");
  }

  it("a 4096-byte AllocIoas request is served; 4097 bytes is EDQUOT and allocates nothing, so the next IOAS takes the id", async () => {
    const vm = await env.vm("q-msg");
    const request = encode("allocIoas", { vmId: "q-msg" });
    const ok = await rawUnary(env.client, "allocIoas", paddedTo(request, LIMIT));
    expect(ok).toBeInstanceOf(Buffer);
    expect((await rawUnary(env.client, "allocIoas", request)) as Buffer).toEqual(Buffer.from([0x08, 2]));

    expectMessageQuota(await rawFailure(env.client, "allocIoas", paddedTo(request, LIMIT + 1)));
    expect(await objectCount(vm)).toBe(2);
    expect(await ioas(vm)).toBe(3);
  });

  it("the same for WriteGuestMemory (nothing is written) and for Translate (its own codec)", async () => {
    const vm = await env.vm("q-msg-io");
    const data = Buffer.alloc(1000, 0x77);
    const write = encode("writeGuestMemory", { vmId: "q-msg-io", gpa: 0n, data });
    expect(await rawUnary(env.client, "writeGuestMemory", paddedTo(write, LIMIT))).toBeInstanceOf(Buffer);
    expect((await readBytes(vm, 0n, 1000)).equals(data)).toBe(true);
    const elsewhere = encode("writeGuestMemory", { vmId: "q-msg-io", gpa: 0x10000n, data });
    expectMessageQuota(await rawFailure(env.client, "writeGuestMemory", paddedTo(elsewhere, LIMIT + 1)));
    expect((await readBytes(vm, 0x10000n, 1000)).every((b) => b === 0)).toBe(true);

    const dev = await bind(vm);
    const translate = encode("translate", { vmId: "q-msg-io", devId: dev, iovas: [0x1000n, 0x2000n] });
    expect(await rawUnary(env.client, "translate", paddedTo(translate, LIMIT))).toBeInstanceOf(Buffer);
    expectMessageQuota(await rawFailure(env.client, "translate", paddedTo(translate, LIMIT + 1)));
    expect((await stats(vm.v)).translations).toBe(2);
  });

  it("a response of exactly 4096 bytes is sent; one of 4097 bytes is EDQUOT naming the limit", async () => {
    const vm = await env.vm("q-resp");
    // ReadGuestMemoryResponse: tag (1) + length varint (2) + data.
    expect((await vm.v.readGuestMemory({ gpa: 0n, length: LIMIT - 3 })).data).toHaveLength(LIMIT - 3);
    await expectQuota(vm.v.readGuestMemory({ gpa: 0n, length: LIMIT - 2 }), "maxMessageBytes", LIMIT, "response");
  });

  it("a request beyond the limit + 1 MiB is refused by the transport before it is read (README: Transport errors), and allocates nothing", async () => {
    const vm = await env.vm("q-huge");
    const request = encode("allocIoas", { vmId: "q-huge" });
    const f = await rawFailure(env.client, "allocIoas", paddedTo(request, 2 << 20));
    expect(f.code, f.error.message).toBe(grpc.status.RESOURCE_EXHAUSTED);
    expect((await vm.v.allocIoas()).ioasId).toBe(1);
  });
});

// ---------------------------------------------------------------------------

describe("tenant quotas are per tenant (mutual TLS: each client identity is a tenant)", () => {
  const LIMITS = { vmsPerTenant: 2, guestMemoryBytesPerTenant: 3 << 20, touchedBytesPerTenant: 8 * KIB };
  let pki: TestPki | undefined;
  let whyNot = "";
  let t: TestServer | undefined;
  let a: IommufdClient;
  let b: IommufdClient;

  beforeAll(async () => {
    whyNot = (await opensslMissing()) ?? "";
    if (whyNot) return;
    pki = await createTestPki();
    t = await startTestServer({
      tls: { cert: pki.server.cert, key: pki.server.key, clientCa: pki.ca.cert },
      limits: { ...DEFAULT_CONFIG.limits, ...LIMITS },
    }, { credentials: grpc.credentials.createSsl(pki.ca.cert, pki.tenantA.key, pki.tenantA.cert) });
    a = t.client;
    b = new IommufdClient(t.server.address, { credentials: grpc.credentials.createSsl(pki.ca.cert, pki.tenantB.key, pki.tenantB.cert) });
  }, 60_000);
  afterAll(async () => {
    b?.close();
    await t?.close();
    await pki?.pki.remove();
  });

  const ready = (ctx: TestContext) => {
    if (!t) skipBecause(ctx, whyNot || "no test certificates");
  };

  it("tenant A at each of its limits does not limit tenant B, and A's violations name A", async (ctx) => {
    ready(ctx);
    // VMs: A's two VMs (1 MiB each) fill its VM quota.
    await a.createVm({ vmId: "shared-1", model: IommuModel.MOCK, guestMemoryBytes: MIB });
    await a.createVm({ vmId: "shared-2", model: IommuModel.MOCK, guestMemoryBytes: MIB });
    await expectQuota(a.createVm({ vmId: "shared-3", model: IommuModel.MOCK, guestMemoryBytes: PAGE }), "vmsPerTenant", 2, `tenant:${TENANT_A}`);
    // Touched RAM: A writes its 2 pages.
    await a.vm("shared-1").writeGuestMemory({ gpa: 0n, data: Buffer.alloc(8 * KIB, 1) });
    await expectQuota(a.vm("shared-2").writeGuestMemory({ gpa: 0n, data: Buffer.from([1]) }), "touchedBytesPerTenant", 8 * KIB, `tenant:${TENANT_A}`);

    // B has the same vm_ids in its own namespace, and all of its own quotas.
    await b.createVm({ vmId: "shared-1", model: IommuModel.MOCK, guestMemoryBytes: 2n * MIB });
    await expectQuota(b.createVm({ vmId: "shared-2", model: IommuModel.MOCK, guestMemoryBytes: 2n * MIB }), "guestMemoryBytesPerTenant", 3 << 20, `tenant:${TENANT_B}`);
    await b.createVm({ vmId: "shared-2", model: IommuModel.MOCK, guestMemoryBytes: MIB });
    await b.vm("shared-2").writeGuestMemory({ gpa: 0n, data: Buffer.alloc(8 * KIB, 2) });
    await expectQuota(b.vm("shared-1").writeGuestMemory({ gpa: 0n, data: Buffer.from([2]) }), "touchedBytesPerTenant", 8 * KIB, `tenant:${TENANT_B}`);

    // A destroying a VM gives A its slot and its pages back, and B nothing.
    await a.destroyVm({ vmId: "shared-1" });
    await a.vm("shared-2").writeGuestMemory({ gpa: 0n, data: Buffer.alloc(8 * KIB, 3) });
    await a.createVm({ vmId: "shared-1", model: IommuModel.MOCK, guestMemoryBytes: MIB });
    await expectQuota(b.vm("shared-1").writeGuestMemory({ gpa: 0n, data: Buffer.from([2]) }), "touchedBytesPerTenant", 8 * KIB, `tenant:${TENANT_B}`);
  });
});

// Every quota error above came through the typed client; this checks one
// more on the wire, as api.md words it (exactly ErrorInfo + QuotaFailure).
describe("the EDQUOT status on the wire", () => {
  const env = quotaServer({ objectsPerVm: 1 });

  it("holds exactly one ErrorInfo (EDQUOT, 122, domain iommufd.v1) and one QuotaFailure", async () => {
    await env.vm("q-wire");
    await env.client.vm("q-wire").allocIoas();
    const f = await rawFailure(env.client, "allocIoas", encode("allocIoas", { vmId: "q-wire" }));
    expect(f.code).toBe(GRPC_CODE.EDQUOT);
    expect(f.status!.details.map((d) => d.typeUrl)).toEqual(["type.googleapis.com/google.rpc.ErrorInfo", "type.googleapis.com/google.rpc.QuotaFailure"]);
    const info = anyUnpack(f.status!.details[0], ErrorInfoSchema)!;
    expect(info.reason).toBe("EDQUOT");
    expect(info.domain).toBe("iommufd.v1");
    expect({ ...info.metadata }).toEqual({ errno: "122" });
    const quota = anyUnpack(f.status!.details[1], QuotaFailureSchema)!;
    expect(quota.violations.map((v) => ({ subject: v.subject, description: v.description }))).toEqual([{ subject: "vm:q-wire", description: expect.stringMatching(/\bobjectsPerVm\b.*\b1\b/) }]);
  });
});
