/**
 * Writes the dashboards as JSON into deploy/grafana/dashboards/ (committed;
 * test/unit/grafana-dashboards.test.ts fails when they are stale).
 *
 *   npx tsx deploy/grafana/generate.ts
 */
import { mkdirSync, writeFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { dashboards, stableStringify } from "./src/index.js";

const dir = fileURLToPath(new URL("dashboards/", import.meta.url));
mkdirSync(dir, { recursive: true });
for (const [name, dashboard] of Object.entries(dashboards())) {
  writeFileSync(`${dir}${name}.json`, stableStringify(dashboard));
  console.log(`wrote ${dir}${name}.json`);
}
