import { type ChildProcess, spawn, spawnSync } from "node:child_process";
import { mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { IommufdClient } from "../../client/client.js";
import { SZ_4K, Stage1PageTable } from "../../client/pagetable.js";
import { IommuModel } from "../../gen/iommufd/v1/vm_pb.js";
import { startTestServer, type TestServer } from "../helpers/server.js";
import { REPO_ROOT, skipBecause } from "./support.js";

/**
 * The metrics contract against real Prometheus tools: promtool lints a live
 * scrape, and a real Prometheus server scraping a real iommufd-service
 * answers every dashboard query and every alert expression with data.
 */

const INSTALL = "apt-get install -y prometheus";
const missingTool = (tool: string) => (spawnSync(tool, ["--version"]).error ? `${tool} not found; install with: ${INSTALL}` : undefined);

const VTD_VM = "vtd-a";
const MOCK_VM = "mock-a";

/**
 * Creates a VT-d VM (a nested device and a stage-2-only one) and a MOCK VM
 * (a nested selftest HWPT); returns one round of traffic that translates
 * (misses, then hits), faults, invalidates and fails one RPC — so every
 * counter of metrics.md moves each round.
 */
async function workload(client: IommufdClient): Promise<() => Promise<void>> {
  await client.createVm({ vmId: VTD_VM, model: IommuModel.INTEL_VTD, guestMemoryBytes: 1n << 30n });
  const vtd = client.vm(VTD_VM);
  const { ioasId } = await vtd.allocIoas();
  await vtd.mapIoas({ ioasId, userVa: 0n, length: 1n << 30n, iova: 0n, readable: true, writeable: true });
  const { devId } = await vtd.bindDevice({ name: "0000:00:04.0" });
  const { hwptId: parent } = await vtd.allocHwpt({ devId, ptId: ioasId, nestParent: true });
  const s1 = new Stage1PageTable(vtd, { tableBase: 0x100000n, tableBytes: 0x100000n });
  const mapped = Array.from({ length: 16 }, (_, i) => BigInt(i) * SZ_4K);
  for (const iova of mapped) await s1.map(iova, 0x800000n + iova, SZ_4K);
  const { hwptId: nested } = await vtd.allocHwpt({ devId, ptId: parent, data: { case: "vtdS1", value: { pgtblAddr: s1.root, addrWidth: 48 } } });
  await vtd.attachDevice({ devId, ptId: nested });
  const { devId: s2Dev } = await vtd.bindDevice({ name: "0000:00:05.0" });
  const { hwptId: paging } = await vtd.allocHwpt({ devId: s2Dev, ptId: ioasId });
  await vtd.attachDevice({ devId: s2Dev, ptId: paging });

  await client.createVm({ vmId: MOCK_VM, model: IommuModel.MOCK, guestMemoryBytes: 1n << 24n });
  const mock = client.vm(MOCK_VM);
  const { ioasId: mockIoas } = await mock.allocIoas();
  const { devId: mockDev } = await mock.bindDevice({ name: "mock0" });
  const { hwptId: mockParent } = await mock.allocHwpt({ devId: mockDev, ptId: mockIoas, nestParent: true });
  // Mapped after the domain exists, so the IOVA lands inside the mock's aperture.
  const { iova: mockIova } = await mock.mapIoas({ ioasId: mockIoas, userVa: 0n, length: 0x10000n, readable: true, writeable: true });
  const { hwptId: mockNested } = await mock.allocHwpt({ devId: mockDev, ptId: mockParent, data: { case: "selftest", value: { iotlb: 1 } } });
  await mock.attachDevice({ devId: mockDev, ptId: mockNested });

  const unmapped = 1n << 30n; // no stage-1 entry: S1_NOT_PRESENT
  return async () => {
    // The first pass walks (and faults on `unmapped`), the second hits.
    await vtd.translate({ devId, iovas: [...mapped, unmapped] });
    await vtd.translate({ devId, iovas: mapped });
    await vtd.translate({ devId: s2Dev, iovas: [0x800000n, 0x801000n] });
    // Drops what the passes cached, so the next round misses again.
    await vtd.invalidate({ hwptId: nested, requests: { case: "vtdS1", value: { entries: [Stage1PageTable.invalidation(0n, SZ_4K), Stage1PageTable.invalidateAll()] } } });
    await mock.translate({ devId: mockDev, iovas: [mockIova, mockIova + 0x100000n] }); // the second: S2_NOT_PRESENT
    await mock.invalidate({ hwptId: mockNested, requests: { case: "selftest", value: { entries: [{ iotlbId: 0, all: false }] } } });
    // A client error (ENOENT → NOT_FOUND) for the error panels.
    await vtd.destroy({ id: 9999 }).catch(() => undefined);
  };
}

/** One sample of the text exposition format. */
interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

function parseExposition(text: string): { samples: Sample[]; types: Map<string, string> } {
  const samples: Sample[] = [];
  const types = new Map<string, string>();
  for (const line of text.split("\n")) {
    const type = /^# TYPE (\S+) (\S+)$/.exec(line);
    if (type) types.set(type[1], type[2]);
    const m = /^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$/.exec(line);
    if (!m) continue;
    const labels = Object.fromEntries([...(m[2] ?? "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)].map(([, k, v]) => [k, v]));
    samples.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return { samples, types };
}

/** metrics.md's required series: type and exact label names (histogram buckets add `le`). */
const REQUIRED: Record<string, { type: string; labels: string[] }> = {
  iommufd_iotlb_hits_total: { type: "counter", labels: ["vm", "model"] },
  iommufd_iotlb_misses_total: { type: "counter", labels: ["vm", "model"] },
  iommufd_translations_total: { type: "counter", labels: ["vm", "model", "result"] },
  iommufd_translation_faults_total: { type: "counter", labels: ["model", "reason"] },
  iommufd_page_walk_depth: { type: "histogram", labels: ["model", "mode"] },
  iommufd_invalidation_duration_seconds: { type: "histogram", labels: ["model", "data_type"] },
  iommufd_invalidation_entries_total: { type: "counter", labels: ["vm", "model"] },
  iommufd_iotlb_entries_invalidated_total: { type: "counter", labels: ["vm", "model"] },
  iommufd_iotlb_entries: { type: "gauge", labels: ["vm", "model"] },
  iommufd_vms: { type: "gauge", labels: ["model"] },
  iommufd_objects: { type: "gauge", labels: ["type"] },
  grpc_server_started_total: { type: "counter", labels: ["grpc_service", "grpc_method", "grpc_type"] },
  grpc_server_handled_total: { type: "counter", labels: ["grpc_service", "grpc_method", "grpc_type", "grpc_code"] },
  grpc_server_handling_seconds: { type: "histogram", labels: ["grpc_service", "grpc_method", "grpc_type"] },
};

let t: TestServer;
let round: () => Promise<void>;
beforeAll(async () => {
  t = await startTestServer();
  round = await workload(t.client);
  await round();
  await round();
});
afterAll(() => t?.close());

const scrape = async () => (await fetch(`http://${t.server.metricsAddress}/metrics`)).text();

describe("a live scrape after a workload", () => {
  it("passes `promtool check metrics`", async (ctx) => {
    const missing = missingTool("promtool");
    if (missing) skipBecause(ctx, missing);
    const r = spawnSync("promtool", ["check", "metrics"], { input: await scrape(), encoding: "utf8" });
    expect(r.status, r.stdout + r.stderr).toBe(0);
  });

  it("has every series of metrics.md, with its type and labels, and the workload counted", async () => {
    const { samples, types } = parseExposition(await scrape());
    for (const [name, { type, labels }] of Object.entries(REQUIRED)) {
      expect(types.get(name), name).toBe(type);
      const expected = (sample: string) => (sample.endsWith("_bucket") ? [...labels, "le"] : [...labels]).sort();
      const names = type === "histogram" ? [`${name}_bucket`, `${name}_sum`, `${name}_count`] : [name];
      for (const sample of names) {
        const series = samples.filter((s) => s.name === sample);
        expect(series.length, sample).toBeGreaterThan(0);
        for (const s of series) expect(Object.keys(s.labels).sort(), `${sample} ${JSON.stringify(s.labels)}`).toEqual(expected(sample));
      }
    }
    const les = (name: string) => [...new Set(samples.filter((s) => s.name === `${name}_bucket`).map((s) => s.labels.le))];
    expect(les("iommufd_page_walk_depth")).toEqual([1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 29, 35].map(String).concat("+Inf"));
    const invalidationBounds = les("iommufd_invalidation_duration_seconds").filter((le) => le !== "+Inf").map(Number);
    expect([Math.min(...invalidationBounds), Math.max(...invalidationBounds)]).toEqual([1e-6, 1e-2]);
    expect(samples.filter((s) => s.name.startsWith("nodejs_active_") && s.name.endsWith("_total"))).toEqual([]);

    const value = (name: string, labels: Record<string, string>) =>
      samples.filter((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v)).reduce((sum, s) => sum + s.value, 0);
    const vtd = { vm: VTD_VM, model: "intel_vtd" };
    const mock = { vm: MOCK_VM, model: "mock" };
    expect(value("iommufd_iotlb_hits_total", vtd)).toBeGreaterThan(0);
    expect(value("iommufd_iotlb_misses_total", vtd)).toBeGreaterThan(0);
    expect(value("iommufd_iotlb_misses_total", mock)).toBeGreaterThan(0);
    for (const labels of [vtd, mock]) {
      expect(value("iommufd_translations_total", { ...labels, result: "ok" }), labels.vm).toBeGreaterThan(0);
      expect(value("iommufd_translations_total", { ...labels, result: "fault" }), labels.vm).toBeGreaterThan(0);
      expect(value("iommufd_invalidation_entries_total", labels), labels.vm).toBeGreaterThan(0);
    }
    expect(value("iommufd_translation_faults_total", { model: "intel_vtd", reason: "S1_NOT_PRESENT" })).toBeGreaterThan(0);
    expect(value("iommufd_translation_faults_total", { model: "mock", reason: "S2_NOT_PRESENT" })).toBeGreaterThan(0);
    expect(value("iommufd_page_walk_depth_count", { model: "intel_vtd", mode: "nested" })).toBeGreaterThan(0);
    expect(value("iommufd_page_walk_depth_count", { model: "intel_vtd", mode: "stage2" })).toBeGreaterThan(0);
    expect(value("iommufd_invalidation_duration_seconds_count", { model: "intel_vtd", data_type: "vtd_s1" })).toBeGreaterThan(0);
    expect(value("iommufd_invalidation_duration_seconds_count", { model: "mock", data_type: "selftest" })).toBeGreaterThan(0);
    expect(value("iommufd_iotlb_entries_invalidated_total", vtd)).toBeGreaterThan(0);
    expect(value("iommufd_vms", { model: "intel_vtd" })).toBe(1);
    expect(value("iommufd_vms", { model: "mock" })).toBe(1);
    expect(value("iommufd_objects", { type: "hwpt_nested" })).toBe(2);
    expect(value("grpc_server_handled_total", { grpc_method: "Translate" })).toBeGreaterThan(0);
  });
});

// ---------------------------------------------------------------------------
// A real Prometheus scraping the server every second.

const SCRAPE_INTERVAL_S = 1;

/**
 * Grafana's macros and the dashboards' variables as Grafana would expand
 * them. $__rate_interval is at least 4 scrape intervals in Grafana; 30 s
 * leaves room for a late scrape. $vm and $model name what the workload
 * created, so the per-VM queries must find that VM. $datasource only appears
 * in datasource refs, never in a query.
 */
const MACROS: Record<string, string> = {
  __rate_interval: "30s",
  __interval: `${SCRAPE_INTERVAL_S}s`,
  __range: "5m",
  job: "iommufd-service",
  model: "intel_vtd",
  vm: VTD_VM,
};

function expand(query: string): string {
  return query.replace(/\$\{?(\w+)\}?/g, (macro, name: string) => {
    if (!(name in MACROS)) throw new Error(`no substitution for ${macro} in ${query}`);
    return MACROS[name];
  });
}

/**
 * The rules' convention (iommufd.rules.yml): clauses "<value> <cmp> <number>"
 * joined by and/or. Deleting every comparison against a number literal leaves
 * the values the alert tests; a healthy service has data there but no alert.
 * Label matchers never match: their values are quoted strings.
 */
function withoutThresholds(expr: string): string {
  return expr.replace(/\s*(?:==|!=|>=|<=|>|<)\s*-?(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?(?![\w.])/gi, "");
}

interface GrafanaDashboard {
  title: string;
  panels?: { title: string; type: string; targets?: { expr?: string; refId?: string }[] }[];
  templating: { list: { name: string; type: string; query?: unknown }[] };
}

async function dashboardsJson(): Promise<GrafanaDashboard[]> {
  const dir = join(REPO_ROOT, "deploy/grafana/dashboards");
  return Promise.all((await readdir(dir)).map(async (f) => JSON.parse(await readFile(join(dir, f), "utf8")) as GrafanaDashboard));
}

async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as { port: number };
  await new Promise((resolve) => server.close(resolve));
  return port;
}

describe("a real Prometheus scraping the server", () => {
  const missing = missingTool("prometheus");
  let dir: string | undefined;
  let prometheus: ChildProcess | undefined;
  let log = "";
  let api = "";
  let stopTraffic = false;
  let traffic: Promise<void> | undefined;

  /** GET on Prometheus' HTTP API; its `data`. */
  async function get<T>(path: string, params: Record<string, string> = {}): Promise<T> {
    const res = await fetch(`${api}${path}?${new URLSearchParams(params)}`);
    const body = (await res.json()) as { status: string; data: T; error?: string };
    if (body.status !== "success") throw new Error(`${path} ${JSON.stringify(params)}: ${body.error}`);
    return body.data;
  }

  beforeAll(async () => {
    if (missing) return;
    dir = await mkdtemp(join(tmpdir(), "iommufd-e2e-prometheus-"));
    const config = join(dir, "prometheus.yml");
    // The shipped rules, loaded by the server too: it must accept them.
    await writeFile(
      config,
      [
        "global:",
        `  scrape_interval: ${SCRAPE_INTERVAL_S}s`,
        `  evaluation_interval: ${SCRAPE_INTERVAL_S}s`,
        "rule_files:",
        `  - ${JSON.stringify(join(REPO_ROOT, "deploy/prometheus/rules/iommufd.rules.yml"))}`,
        "scrape_configs:",
        "  - job_name: iommufd-service",
        "    static_configs:",
        `      - targets: [${JSON.stringify(t.server.metricsAddress)}]`,
        "",
      ].join("\n"),
    );
    const address = `127.0.0.1:${await freePort()}`;
    api = `http://${address}`;
    prometheus = spawn("prometheus", [`--config.file=${config}`, `--storage.tsdb.path=${join(dir, "data")}`, `--web.listen-address=${address}`], {
      stdio: ["ignore", "ignore", "pipe"],
    });
    prometheus.stderr!.on("data", (chunk: Buffer) => {
      log = (log + chunk.toString()).slice(-8000);
    });
    const deadline = Date.now() + 30_000;
    for (;;) {
      if (prometheus.exitCode !== null) throw new Error(`prometheus exited ${prometheus.exitCode}:\n${log}`);
      const ready = await fetch(`${api}/-/ready`).then((r) => r.ok, () => false);
      if (ready) break;
      if (Date.now() > deadline) throw new Error(`prometheus not ready after 30 s:\n${log}`);
      await sleep(200);
    }
    // Rates need traffic inside every window while the queries are polled.
    traffic = (async () => {
      while (!stopTraffic) {
        await round();
        await sleep(100);
      }
    })();
  }, 60_000);

  afterAll(async () => {
    stopTraffic = true;
    await traffic;
    if (prometheus && prometheus.exitCode === null) {
      const exited = new Promise((resolve) => prometheus!.once("exit", resolve));
      prometheus.kill("SIGTERM");
      await Promise.race([exited, sleep(10_000).then(() => prometheus!.kill("SIGKILL"))]);
    }
    if (dir) await rm(dir, { recursive: true, force: true });
  }, 30_000);

  /** Polls until every query returns at least one sample; returns those that never did, with why. */
  async function emptyAfterPolling(queries: Map<string, string>): Promise<Record<string, string>> {
    const pending = new Map(queries);
    const why: Record<string, string> = {};
    const deadline = Date.now() + 90_000;
    while (pending.size > 0 && Date.now() < deadline) {
      for (const [what, query] of pending) {
        try {
          const { result } = await get<{ result: unknown[] }>("/api/v1/query", { query });
          if (result.length > 0) pending.delete(what);
          else why[what] = `no data: ${query}`;
        } catch (e) {
          why[what] = String(e);
        }
      }
      if (pending.size > 0) await sleep(1000);
    }
    return Object.fromEntries([...pending.keys()].map((what) => [what, why[what]]));
  }

  it("answers every dashboard panel query with data", async (ctx) => {
    if (missing) skipBecause(ctx, missing);
    const queries = new Map<string, string>();
    for (const d of await dashboardsJson()) {
      for (const panel of d.panels ?? []) {
        for (const target of panel.targets ?? []) {
          if (target.expr) queries.set(`${d.title} / ${panel.title} / ${target.refId}`, expand(target.expr));
        }
      }
    }
    expect(queries.size).toBeGreaterThan(15);
    expect(await emptyAfterPolling(queries), `Prometheus log:\n${log.slice(-2000)}`).toEqual({});
  }, 120_000);

  it("resolves every dashboard variable to the values the workload created", async (ctx) => {
    if (missing) skipBecause(ctx, missing);
    for (const d of await dashboardsJson()) {
      for (const v of d.templating.list.filter((v) => v.type === "query")) {
        // Grafana's label_values(selector, label) is the label-values API with a match[].
        const m = /^label_values\((.+), (\w+)\)$/.exec(String(v.query));
        expect(m, `${d.title} $${v.name}: ${String(v.query)}`).not.toBeNull();
        const [, selector, label] = m!;
        let values: string[] = [];
        const deadline = Date.now() + 60_000;
        while (!values.includes(MACROS[v.name]) && Date.now() < deadline) {
          values = await get<string[]>(`/api/v1/label/${label}/values`, { "match[]": expand(selector) });
          if (!values.includes(MACROS[v.name])) await sleep(1000);
        }
        expect(values, `${d.title} $${v.name}`).toContain(MACROS[v.name]);
      }
    }
  }, 120_000);

  it("loads every alert rule and answers every alert expression, thresholds removed, with data", async (ctx) => {
    if (missing) skipBecause(ctx, missing);
    const rulesData = await get<{ groups: { rules: { name: string; type: string; query: string; health: string; lastError?: string }[] }[] }>("/api/v1/rules");
    const { groups } = rulesData;
    const rules = groups.flatMap((g) => g.rules).filter((r) => r.type === "alerting");
    expect(rules.map((r) => r.name).sort()).toEqual([
      "IommufdGrpcLatencyBudgetBurnFast",
      "IommufdGrpcLatencyBudgetBurnSlow",
      "IommufdGrpcServerErrors",
      "IommufdIotlbHitRatioCollapse",
      "IommufdScrapeFailed",
    ]);
    const queries = new Map(rules.map((r) => [r.name, withoutThresholds(r.query)]));
    for (const [name, query] of queries) expect(query, `${name}: no threshold removed`).not.toBe(rules.find((r) => r.name === name)!.query);
    expect(await emptyAfterPolling(queries), `Prometheus log:\n${log.slice(-2000)}`).toEqual({});
    // Prometheus evaluates them itself every second: without errors.
    const unhealthy = async () =>
      (await get<typeof rulesData>("/api/v1/rules")).groups.flatMap((g) => g.rules).filter((r) => r.health !== "ok").map((r) => `${r.name}: ${r.health} ${r.lastError ?? ""}`);
    const deadline = Date.now() + 30_000;
    while ((await unhealthy()).length > 0 && Date.now() < deadline) await sleep(1000);
    expect(await unhealthy()).toEqual([]);
  }, 120_000);
});
