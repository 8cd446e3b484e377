import { spawnSync } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startTestServer, type TestServer } from "../helpers/server.js";
import { BUF, execFileAsync, REPO_ROOT, skipBecause } from "./support.js";

// Debian's python3 with its dist-packages; the `python3` on PATH may be a
// pyenv shim that cannot import the Debian modules.
const PYTHON = "/usr/bin/python3";
const INSTALL = "apt-get install -y python3-grpcio python3-protobuf";

function pythonGrpcMissing(): string | undefined {
  const probe = spawnSync(PYTHON, ["-c", "import grpc, google.protobuf"], { encoding: "utf8" });
  if (probe.status === 0) return undefined;
  const why = probe.error?.message ?? probe.stderr.trim().split("\n").at(-1);
  return `Python gRPC client unavailable (${why}); install with: ${INSTALL}`;
}

/** What python_client.py prints: responses as proto JSON with proto field names. */
interface PythonResult {
  create_vm: { vm: Record<string, unknown> };
  alloc_ioas: { ioas_id: number };
  map_ioas: { iova: string };
  error: {
    code: string;
    status_code?: number;
    details_count: number;
    error_info: { reason: string; domain: string; metadata: Record<string, string> }[];
  } | null;
}

const missing = pythonGrpcMissing();
let t: TestServer | undefined;
let tmp: string | undefined;
let result: PythonResult;

beforeAll(async () => {
  if (missing) return;
  t = await startTestServer();
  tmp = await mkdtemp(join(tmpdir(), "iommufd-e2e-py-"));
  const descriptorSet = join(tmp, "iommufd.binpb");
  await execFileAsync(BUF, ["build", "-o", descriptorSet], { cwd: REPO_ROOT });
  const { stdout } = await execFileAsync(PYTHON, [join(REPO_ROOT, "test/e2e/python_client.py"), t.server.address, descriptorSet], {
    timeout: 60_000,
  });
  result = JSON.parse(stdout) as PythonResult;
}, 90_000);

afterAll(async () => {
  await t?.close();
  if (tmp) await rm(tmp, { recursive: true, force: true });
});

describe("Python C-core gRPC client", () => {
  it("creates a VM, allocates an IOAS and maps with auto IOVA", (ctx) => {
    if (missing) skipBecause(ctx, missing);
    expect(result.create_vm.vm).toEqual({
      vm_id: "py",
      model: "IOMMU_MODEL_MOCK",
      guest_memory_bytes: String(16 << 20),
      options: { iotlb_entries: 4096, paging_structure_caches: false, five_level: false },
    });
    expect(result.alloc_ioas).toEqual({ ioas_id: 1 });
    expect(result.map_ioas).toEqual({ iova: String(0x100000) });
  });

  it("decodes grpc-status-details-bin into google.rpc.Status with one ErrorInfo", (ctx) => {
    if (missing) skipBecause(ctx, missing);
    expect(result.error).toEqual({
      code: "NOT_FOUND",
      status_code: 5,
      details_count: 1,
      error_info: [{ reason: "ENOENT", domain: "iommufd.v1", metadata: { errno: "2" } }],
    });
  });
});
