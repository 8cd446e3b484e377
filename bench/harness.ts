/**
 * Benchmark plumbing: timing loops, percentiles, and the output performance.md
 * asks for (one JSON object per scenario, then a table).
 */
export interface Result {
  scenario: string;
  value: number;
  unit: string;
  /** The in-run ceiling, or the target for counts and latencies. */
  ceiling: number;
  /** value / ceiling. */
  ratio?: number;
  target: string;
  /** Whether the target holds in this run. */
  ok?: boolean;
  /** Reported for context; the target belongs to the scenario's main row. */
  informational?: boolean;
}

/** Items per second of `fn` (which handles `items` items per call) over about budgetMs, after a warm-up. */
export function throughput(budgetMs: number, items: number, fn: () => unknown): number {
  const warmUntil = performance.now() + Math.min(300, budgetMs / 2);
  while (performance.now() < warmUntil) fn();
  let calls = 0;
  const start = performance.now();
  let now = start;
  while (now - start < budgetMs) {
    fn();
    calls++;
    now = performance.now();
  }
  return (calls * items * 1000) / (now - start);
}

export function percentile(values: Float64Array, p: number): number {
  const sorted = Float64Array.from(values).sort();
  return sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))];
}

const si = (x: number): string => {
  if (x >= 1e6) return `${(x / 1e6).toFixed(2)} M`;
  if (x >= 1e3) return `${(x / 1e3).toFixed(1)} k`;
  return x < 10 ? x.toFixed(3) : x.toFixed(1);
};

export function report(results: Result[]): void {
  for (const r of results) console.log(JSON.stringify(r));
  const rows = results.map((r) => [r.scenario, `${si(r.value)} ${r.unit}`, si(r.ceiling), r.ratio?.toFixed(2) ?? "", r.target, r.ok === undefined ? "" : r.ok ? "ok" : "MISS"]);
  const header = ["scenario", "value", "ceiling", "ratio", "target", ""];
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((row) => row[i].length)));
  const line = (cells: string[]) => cells.map((c, i) => c.padEnd(widths[i])).join("  ");
  console.log(`\n${line(header)}\n${widths.map((w) => "-".repeat(w)).join("  ")}`);
  for (const row of rows) console.log(line(row));
}
