import { fromBinary } from "@bufbuild/protobuf";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ErrorInfoSchema } from "../../gen/google/rpc/error_details_pb.js";
import { startTestServer, type TestServer } from "../helpers/server.js";
import { BUF, execFileAsync, REPO_ROOT } from "./support.js";

let t: TestServer;
beforeAll(async () => {
  t = await startTestServer();
});
afterAll(() => t.close());

interface CurlResult {
  exitCode: number;
  stdout: string;
  stderr: string;
}

/** Runs `buf curl` (gRPC over cleartext HTTP/2, schema by server reflection) against the test server. */
async function bufCurl(args: string[]): Promise<CurlResult> {
  const argv = ["curl", "--protocol", "grpc", "--http2-prior-knowledge", ...args];
  try {
    const { stdout, stderr } = await execFileAsync(BUF, argv, { cwd: REPO_ROOT, timeout: 30_000 });
    return { exitCode: 0, stdout, stderr };
  } catch (e) {
    const { code, stdout, stderr } = e as { code: unknown; stdout: string; stderr: string };
    if (typeof code !== "number") throw e;
    return { exitCode: code, stdout, stderr };
  }
}

async function call(method: string, request: object, ...flags: string[]): Promise<unknown> {
  const r = await bufCurl([...flags, "-d", JSON.stringify(request), `http://${t.server.address}/${method}`]);
  expect(r.exitCode, r.stderr).toBe(0);
  return JSON.parse(r.stdout);
}

describe("buf curl (Go client, schema from reflection)", () => {
  it("lists exactly the iommufd and health services", async () => {
    const r = await bufCurl(["--list-services", `http://${t.server.address}`]);
    expect(r.exitCode, r.stderr).toBe(0);
    expect(r.stdout.trim().split("\n").sort()).toEqual(["grpc.health.v1.Health", "iommufd.v1.IommufdService"]);
  });

  it.each(["", "iommufd.v1.IommufdService"])("Health/Check(%j) is SERVING", async (service) => {
    expect(await call("grpc.health.v1.Health/Check", { service })).toEqual({ status: "SERVING" });
  });

  it("calls CreateVm, AllocIoas and GetIovaRanges with uint64 as JSON strings", async () => {
    const created = await call("iommufd.v1.IommufdService/CreateVm", {
      vm_id: "curl",
      model: "IOMMU_MODEL_INTEL_VTD",
      guest_memory_bytes: String(1 << 30),
    });
    expect(created).toEqual({
      vm: {
        vmId: "curl",
        model: "IOMMU_MODEL_INTEL_VTD",
        guestMemoryBytes: String(1 << 30),
        options: { iotlbEntries: 4096, pagingStructureCaches: false, fiveLevel: false },
      },
    });
    expect(await call("iommufd.v1.IommufdService/AllocIoas", { vm_id: "curl" })).toEqual({ ioasId: 1 });
    // An IOAS without domains or reserved ranges spans the whole 64-bit space.
    const ranges = await call("iommufd.v1.IommufdService/GetIovaRanges", { vm_id: "curl", ioas_id: 1 }, "--emit-defaults");
    expect(ranges).toEqual({ ranges: [{ start: "0", last: "18446744073709551615" }], alignment: "1" });
  });

  it("reports a failed call with its ErrorInfo detail", async () => {
    const r = await bufCurl(["-d", JSON.stringify({ vm_id: "curl", ioas_id: 99 }), `http://${t.server.address}/iommufd.v1.IommufdService/GetIovaRanges`]);
    expect(r.exitCode).not.toBe(0);
    const error = JSON.parse(r.stderr) as { code: string; details: { type: string; value: string }[] };
    expect(error.code).toBe("not_found");
    expect(error.details.map((d) => d.type)).toEqual(["google.rpc.ErrorInfo"]);
    const info = fromBinary(ErrorInfoSchema, Buffer.from(error.details[0].value, "base64"));
    expect(info.reason).toBe("ENOENT");
    expect(info.metadata).toEqual({ errno: "2" });
  });
});
