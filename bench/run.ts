import { grpcLatency, grpcTranslate, grpcUnary, metricsOverhead } from "./grpc-bench.js";
import { type Result, report } from "./harness.js";
import { scaleVms } from "./scale-vms.js";
import { invalidateDomain, invalidatePage, iotlbHit, nestedWalkCold, walkRefsCached, walkRefsExact } from "./translate-bench.js";

/**
 * npm run bench [-- --quick] [-- --only SCENARIO]: every scenario of
 * ../shared/spec/performance.md that this build implements.
 */
const args = process.argv.slice(2);
const quick = args.includes("--quick");
const only = args.includes("--only") ? args[args.indexOf("--only") + 1] : undefined;
const budgetMs = quick ? 1000 : 3000;
const samples = quick ? 2000 : 10000;

const scenarios: [string, () => Result[] | Promise<Result[]>][] = [
  ["iotlb_hit", () => iotlbHit(budgetMs)],
  ["nested_walk_cold", () => nestedWalkCold(budgetMs)],
  ["walk_refs_exact", walkRefsExact],
  ["walk_refs_cached", walkRefsCached],
  ["invalidate_page", () => invalidatePage(samples)],
  ["invalidate_domain", () => invalidateDomain(quick ? 200 : 1000)],
  // Against iommufd-service child processes; h2load (nghttp2-client) is the load source.
  ["grpc_translate", () => grpcTranslate({ quick })],
  ["grpc_unary", () => grpcUnary({ quick })],
  ["grpc_latency", () => grpcLatency({ quick })],
  ["metrics_overhead", () => metricsOverhead({ quick })],
  // 1000 VMs in an iommufd-service child process: its RSS and /metrics scrape time.
  ["scale_vms", () => scaleVms({ quick })],
];

const targets: Record<string, (r: Result) => boolean> = {
  iotlb_hit: (r) => r.value >= 50e6 && r.ratio! >= 0.3,
  nested_walk_cold: (r) => r.value >= 8e6 && r.ratio! >= 0.4,
  walk_refs_exact: (r) => r.value === r.ceiling,
  walk_refs_cached: (r) => r.value <= 5,
  invalidate_page: (r) => r.value <= r.ceiling,
  invalidate_domain: (r) => r.value <= 50,
  grpc_translate: (r) => r.value >= 3e6,
  grpc_unary: (r) => r.ratio! >= 0.8,
  grpc_latency: (r) => r.value <= r.ceiling,
  metrics_overhead: (r) => r.ratio! >= 0.95,
  scale_vms: (r) => r.value <= r.ceiling,
};

// Each scenario starts on a collected heap, so one scenario's garbage does not
// land in the next one's latency percentiles (npm run bench passes --expose-gc).
const gc = (globalThis as { gc?: () => void }).gc;
if (gc === undefined) console.error("note: run with node --expose-gc for isolated latency percentiles");

const results: Result[] = [];
for (const [name, run] of scenarios) {
  if (only !== undefined && name !== only) continue;
  gc?.();
  for (const r of await run()) {
    r.ratio = r.value / r.ceiling;
    if (!r.informational) r.ok = targets[name](r);
    results.push(r);
  }
}
report(results);
