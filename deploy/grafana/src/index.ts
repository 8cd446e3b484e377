import type { Dashboard } from "@grafana/grafana-foundation-sdk/dashboard";
import { invalidation } from "./invalidation.js";
import { iotlb } from "./iotlb.js";
import { overview } from "./overview.js";

/** File name (without .json) -> dashboard, as written to deploy/grafana/dashboards/. */
export function dashboards(): Record<string, Dashboard> {
  return { "iommufd-overview": overview(), "iommufd-iotlb": iotlb(), "iommufd-invalidation": invalidation() };
}

/**
 * JSON with object keys sorted at every level, two-space indented, newline
 * terminated: the committed files then depend only on what the dashboards
 * say, not on the order the SDK's builders happen to set fields.
 */
export function stableStringify(value: unknown): string {
  const sorted = (v: unknown): unknown => {
    if (Array.isArray(v)) return v.map(sorted);
    if (v !== null && typeof v === "object") {
      return Object.fromEntries(
        Object.keys(v)
          .sort()
          .map((k) => [k, sorted((v as Record<string, unknown>)[k])]),
      );
    }
    return v;
  };
  return `${JSON.stringify(sorted(value), null, 2)}\n`;
}
