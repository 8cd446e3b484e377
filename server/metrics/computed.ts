import type { Registry } from "prom-client";

/**
 * A metric whose samples are computed at scrape time from counters the core
 * keeps as plain numbers: nothing on a request path touches prom-client.
 * Implements the interface prom-client's Registry reads (get()).
 */
export interface Sample {
  labels: Record<string, string | number>;
  value: number;
  /** For histograms: name_bucket / name_sum / name_count. */
  metricName?: string;
}

export type MetricType = "counter" | "gauge" | "histogram";

export class ComputedMetric {
  readonly aggregator = "sum";

  constructor(
    readonly name: string,
    readonly help: string,
    readonly type: MetricType,
    private readonly compute: () => Sample[],
  ) {}

  async get() {
    return { name: this.name, help: this.help, type: this.type, values: this.compute(), aggregator: this.aggregator };
  }

  register(registry: Registry): this {
    registry.registerMetric(this as unknown as Parameters<Registry["registerMetric"]>[0]);
    return this;
  }
}

/**
 * The samples of one histogram series from non-cumulative bucket counts
 * (bounds, then +Inf) and the sum of observations.
 */
export function histogramSamples(name: string, labels: Record<string, string>, bounds: readonly number[], counts: ArrayLike<number>, sum: number): Sample[] {
  const out: Sample[] = [];
  let cumulative = 0;
  bounds.forEach((le, i) => {
    cumulative += counts[i];
    out.push({ metricName: `${name}_bucket`, labels: { ...labels, le }, value: cumulative });
  });
  cumulative += counts[bounds.length];
  out.push({ metricName: `${name}_bucket`, labels: { ...labels, le: "+Inf" }, value: cumulative });
  out.push({ metricName: `${name}_sum`, labels, value: sum });
  out.push({ metricName: `${name}_count`, labels, value: cumulative });
  return out;
}
