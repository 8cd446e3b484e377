import { type Result, report } from "./harness.js";
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

const scenarios: [string, () => Result[]][] = [
  ["iotlb_hit", () => iotlbHit(budgetMs)],
  ["nested_walk_cold", () => nestedWalkCold(budgetMs)],
  ["walk_refs_exact", walkRefsExact],
  ["walk_refs_cached", walkRefsCached],
  ["invalidate_page", () => invalidatePage(samples)],
  ["invalidate_domain", () => invalidateDomain(quick ? 200 : 1000)],
];

const targets: Record<string, (r: Result) => boolean> = {
  iotlb_hit: (r) => r.value >= 50e6 && r.ratio! >= 0.3,
  nested_walk_cold: (r) => r.value >= 8e6 && r.ratio! >= 0.4,
  walk_refs_exact: (r) => r.value === r.ceiling,
  walk_refs_cached: (r) => r.value <= 5,
  invalidate_page: (r) => r.value <= r.ceiling,
  invalidate_domain: (r) => r.value <= 50,
};

// Each scenario starts on a collected heap, so one scenario's garbage does not
// land in the next one's latency percentiles (npm run bench passes --expose-gc).
const gc = (globalThis as { gc?: () => void }).gc;
if (gc === undefined) console.error("note: run with node --expose-gc for isolated latency percentiles");

const results: Result[] = [];
for (const [name, run] of scenarios) {
  if (only !== undefined && name !== only) continue;
  gc?.();
  for (const r of run()) {
    r.ratio = r.value / r.ceiling;
    if (!r.informational) r.ok = targets[name](r);
    results.push(r);
  }
}
report(results);
