/**
 * The error contract of api.md "Errors", checked on the wire: a
 * google.rpc.Status in grpc-status-details-bin holding exactly one
 * google.rpc.ErrorInfo (reason = errno name, domain "iommufd.v1",
 * metadata.errno = the Linux number, entries_handled only on Invalidate),
 * the gRPC code of each errno, and no INTERNAL/UNKNOWN for malformed input.
 */
import { create, fromBinary, type MessageInitShape, toBinary } from "@bufbuild/protobuf";
import { anyUnpack } from "@bufbuild/protobuf/wkt";
import * as grpc from "@grpc/grpc-js";
import { beforeAll, describe, expect, it } from "vitest";
import type { RpcName } from "../../client/client.js";
import { ErrorInfoSchema, QuotaFailureSchema } from "../../gen/google/rpc/error_details_pb.js";
import { StatusSchema } from "../../gen/google/rpc/status_pb.js";
import { IommufdService } from "../../gen/iommufd/v1/service_pb.js";
import {
  bind,
  type Errno,
  ERRNO,
  GRPC_CODE,
  ioas,
  map,
  MIB,
  mapReq,
  MOCK_APERTURE_START,
  nestingSetup,
  PAGE,
  pagingHwpt,
  selftestInv,
  serverEnv,
  U64_MAX,
  type Vm,
} from "./helpers.js";

const env = serverEnv("errors");

interface WireError {
  code: grpc.status;
  details: string;
  statusCode: number;
  detailTypes: string[];
  reason: string;
  domain: string;
  metadata: Record<string, string>;
  quotaFailure: boolean;
}

function methodOf(rpc: RpcName) {
  const m = IommufdService.methods.find((x) => x.localName === rpc);
  if (!m) throw new Error(`no RPC ${rpc}`);
  return m;
}

/** A unary call with raw request bytes, answering the decoded status of a failure (or "ok"). */
function rawCall(rpc: RpcName, bytes: Uint8Array): Promise<WireError | "ok"> {
  const m = methodOf(rpc);
  return new Promise((resolve) => {
    env.client.grpc.makeUnaryRequest(
      `/${IommufdService.typeName}/${m.name}`,
      (b: Buffer) => b,
      (b: Buffer) => b,
      Buffer.from(bytes),
      (err: grpc.ServiceError | null) => {
        if (!err) return resolve("ok");
        const [bin] = err.metadata?.get("grpc-status-details-bin") ?? [];
        const status = bin instanceof Buffer ? fromBinary(StatusSchema, bin) : create(StatusSchema);
        const infos = status.details.map((d) => anyUnpack(d, ErrorInfoSchema)).filter((x) => x !== undefined);
        resolve({
          code: err.code,
          details: err.details,
          statusCode: status.code,
          detailTypes: status.details.map((d) => d.typeUrl),
          reason: infos[0]?.reason ?? "",
          domain: infos[0]?.domain ?? "",
          metadata: { ...(infos[0]?.metadata ?? {}) },
          quotaFailure: status.details.some((d) => anyUnpack(d, QuotaFailureSchema) !== undefined),
        });
      },
    );
  });
}

/** A request (init shape) encoded with the RPC's schema and sent through rawCall. */
function call(rpc: RpcName, request: object): Promise<WireError | "ok"> {
  const m = methodOf(rpc);
  return rawCall(rpc, toBinary(m.input, create(m.input, request as MessageInitShape<typeof m.input>)));
}

/** The whole ErrorInfo contract of api.md for one failure. */
function expectWireError(result: WireError | "ok", errno: Errno, invalidate = false): WireError {
  expect(result, `expected ${errno}`).not.toBe("ok");
  const e = result as WireError;
  expect(e.reason, e.details).toBe(errno);
  expect(e.code).toBe(GRPC_CODE[errno]);
  expect(e.statusCode, "google.rpc.Status.code").toBe(GRPC_CODE[errno]);
  expect(e.detailTypes).toEqual(["type.googleapis.com/google.rpc.ErrorInfo"]);
  expect(e.domain).toBe("iommufd.v1");
  expect(e.metadata.errno).toBe(String(ERRNO[errno]));
  expect(Object.keys(e.metadata).sort()).toEqual(invalidate ? ["entries_handled", "errno"] : ["errno"]);
  expect(e.quotaFailure).toBe(false);
  expect(e.details.length).toBeGreaterThan(0);
  return e;
}

describe("one failure per reachable errno, on the wire (api.md Errors table)", () => {
  let vm: Vm;
  const vmReq = () => ({ vmId: vm.id });
  beforeAll(async () => {
    vm = await env.mockVm({}, 32n * MIB);
  });

  it("EINVAL → INVALID_ARGUMENT (malformed vm_id)", async () => {
    expectWireError(await call("allocIoas", { vmId: "Not_A_Label" }), "EINVAL");
  });

  it("ENOENT → NOT_FOUND (unknown VM; unknown object)", async () => {
    expectWireError(await call("allocIoas", { vmId: "missing" }), "ENOENT");
    expectWireError(await call("destroy", { ...vmReq(), id: 42 }), "ENOENT");
  });

  it("EEXIST → ALREADY_EXISTS (CreateVm of an existing id; FIXED map over an area)", async () => {
    expectWireError(await call("createVm", { vmId: vm.id, model: 1, guestMemoryBytes: PAGE }), "EEXIST");
    const id = await ioas(vm);
    await map(vm, id, { iova: 0x10000n });
    expectWireError(await call("mapIoas", { ...vmReq(), ...mapReq(id, { iova: 0x10000n }) }), "EEXIST");
  });

  it("EBUSY → FAILED_PRECONDITION (Destroy of a device)", async () => {
    const dev = await bind(vm);
    expectWireError(await call("destroy", { ...vmReq(), id: dev }), "EBUSY");
  });

  it("EADDRINUSE → FAILED_PRECONDITION (AllowIovas over a reserved range)", async () => {
    const dev = await bind(vm);
    const id = await ioas(vm);
    await pagingHwpt(vm, dev, id);
    expectWireError(await call("allowIovas", { ...vmReq(), ioasId: id, ranges: [{ start: 0n, last: 0xfffn }] }), "EADDRINUSE");
  });

  it("EOPNOTSUPP → UNIMPLEMENTED (unset IOMMU option)", async () => {
    expectWireError(await call("getOption", { ...vmReq(), objectId: 1 }), "EOPNOTSUPP");
  });

  it("EFAULT → OUT_OF_RANGE (guest memory outside RAM)", async () => {
    expectWireError(await call("readGuestMemory", { ...vmReq(), gpa: 32n * MIB, length: 1 }), "EFAULT");
  });

  it("EOVERFLOW → OUT_OF_RANGE (MapIoas length U64_MAX)", async () => {
    expectWireError(await call("mapIoas", { ...vmReq(), ioasId: 1, length: U64_MAX, readable: true }), "EOVERFLOW");
  });

  it("ENOSPC → RESOURCE_EXHAUSTED without a QuotaFailure (no free IOVA)", async () => {
    const id = await ioas(vm);
    await vm.v.allowIovas({ ioasId: id, ranges: [{ start: 0x10000n, last: 0x10fffn }] });
    await map(vm, id);
    expectWireError(await call("mapIoas", { ...vmReq(), ...mapReq(id) }), "ENOSPC");
  });

  it("ENOMEM → RESOURCE_EXHAUSTED (the mock's PASID 1024 replace fault injection)", async () => {
    const dev = await bind(vm, { pasid: true });
    const id = await ioas(vm);
    const a = await pagingHwpt(vm, dev, id, { pasid: true });
    const b = await pagingHwpt(vm, dev, id, { pasid: true });
    await vm.v.attachDevice({ devId: dev, ptId: a, pasid: 1024 });
    expectWireError(await call("attachDevice", { ...vmReq(), devId: dev, ptId: b, pasid: 1024, replace: true }), "ENOMEM");
  });

  it("EPERM → PERMISSION_DENIED (copying read-only pages as writeable)", async () => {
    const src = await ioas(vm);
    const dst = await ioas(vm);
    await map(vm, src, { iova: MOCK_APERTURE_START, readable: true, writeable: false });
    expectWireError(await call("copyIoas", { ...vmReq(), dstIoasId: dst, srcIoasId: src, srcIova: MOCK_APERTURE_START, length: PAGE, readable: true, writeable: true }), "EPERM");
  });
});

describe("entries_handled in ErrorInfo (api.md Hardware page tables)", () => {
  it("an Invalidate failure carries entries_handled: 0 for an early failure, the count for a failing entry", async () => {
    const vm = await env.mockVm();
    const { nested } = await nestingSetup(vm);
    const early = expectWireError(await call("invalidate", { vmId: vm.id, hwptId: 999, requests: selftestInv([{ iotlbId: 0 }]) }), "ENOENT", true);
    expect(early.metadata.entries_handled).toBe("0");
    const late = expectWireError(await call("invalidate", { vmId: vm.id, hwptId: nested, requests: selftestInv([{ iotlbId: 0 }, { iotlbId: 3 }, { iotlbId: 4 }]) }), "EINVAL", true);
    expect(late.metadata.entries_handled).toBe("2");
  });

  it("an Invalidate with no oneof case set is EINVAL with entries_handled 0", async () => {
    const vm = await env.mockVm();
    expectWireError(await call("invalidate", { vmId: vm.id, hwptId: 1 }), "EINVAL", true);
  });
});

describe("malformed input never yields INTERNAL or UNKNOWN (api.md Errors)", () => {
  const GARBAGE: [string, Uint8Array][] = [
    ["a truncated varint", new Uint8Array([0x10, 0xff])],
    ["a length beyond the end", new Uint8Array([0x0a, 0x7f, 0x61])],
    ["an invalid wire type", new Uint8Array([0x0f])],
    ["field number 0", new Uint8Array([0x00, 0x01])],
    ["a truncated fixed64", new Uint8Array([0x09, 1, 2, 3])],
  ];

  it.each(GARBAGE)("request bytes with %s are INVALID_ARGUMENT/EINVAL with a proper ErrorInfo", async (_what, bytes) => {
    for (const rpc of ["createVm", "allocIoas", "mapIoas", "invalidate", "allocHwpt"] as const) {
      // A failed Invalidate always reports entries_handled: 0 before any entry.
      expectWireError(await rawCall(rpc, bytes), "EINVAL", rpc === "invalidate");
    }
  });

  it("a vm_id that is not valid UTF-8 is EINVAL", async () => {
    // field 1 (vm_id), length 2, bytes 0xc3 0x28: invalid UTF-8.
    const result = await rawCall("allocIoas", new Uint8Array([0x0a, 0x02, 0xc3, 0x28]));
    expectWireError(result, "EINVAL");
  });

  it("unknown fields are ignored (proto3), not errors", async () => {
    const vm = await env.mockVm();
    const m = methodOf("allocIoas");
    const known = toBinary(m.input, create(m.input, { vmId: vm.id }));
    // field 99, varint 1
    const bytes = new Uint8Array([...known, 0x98, 0x06, 0x01]);
    expect(await rawCall("allocIoas", bytes)).toBe("ok");
  });

  it("extreme values in every numeric field of the IOAS/HWPT RPCs give errno results, never INTERNAL", async () => {
    const vm = await env.vtdVm();
    const dev = await bind(vm);
    const id = await ioas(vm);
    const requests: [RpcName, object][] = [
      ["mapIoas", { ioasId: id, userVa: U64_MAX, length: U64_MAX - 1n, iova: U64_MAX - 1n, readable: true }],
      ["mapIoas", { ioasId: id, userVa: U64_MAX - 1n, length: PAGE, readable: true }],
      ["unmapIoas", { ioasId: id, iova: U64_MAX - 1n, length: U64_MAX - 1n }],
      ["copyIoas", { dstIoasId: 0xffffffff, srcIoasId: id, srcIova: U64_MAX - 1n, length: U64_MAX - 1n, readable: true }],
      ["allowIovas", { ioasId: id, ranges: [{ start: 0n, last: U64_MAX }] }],
      ["allocHwpt", { devId: dev, ptId: 0xffffffff }],
      ["attachDevice", { devId: dev, ptId: id, pasid: 0xffffffff }],
      ["hwInfo", { devId: dev, dataType: 0xffffffff }],
      ["readGuestMemory", { gpa: U64_MAX, length: 0xffffffff }],
      ["invalidate", { hwptId: 0xffffffff, requests: { case: "raw", value: { dataType: 0xffffffff, entryLen: 0xffffffff, entryNum: 0xffffffff, data: new Uint8Array(3) } } }],
      ["setOption", { option: 1, objectId: id, value: U64_MAX }],
      ["listVms", { pageSize: 0xffffffff }],
    ];
    for (const [rpc, request] of requests) {
      const result = await call(rpc, { vmId: vm.id, ...request });
      if (result === "ok") continue;
      expect([grpc.status.INTERNAL, grpc.status.UNKNOWN], `${rpc}: ${result.details}`).not.toContain(result.code);
      expect(Object.keys(ERRNO), `${rpc}: ${result.details}`).toContain(result.reason);
      expect(result.code).toBe(GRPC_CODE[result.reason as Errno]);
    }
  });
});
