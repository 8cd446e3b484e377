import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import type { Panel } from "@grafana/grafana-foundation-sdk/dashboard";
import { dashboards, stableStringify } from "../../deploy/grafana/src/index.js";

/** The committed dashboard JSON is exactly what deploy/grafana/src generates. */

const DIR = join(import.meta.dirname, "../../deploy/grafana/dashboards");
const REGENERATE = "stale: run `npx tsx deploy/grafana/generate.ts` and commit deploy/grafana/dashboards/";

describe("Grafana dashboards", () => {
  const generated = dashboards();

  it("deploy/grafana/dashboards/ holds one file per generated dashboard, no others", () => {
    expect(readdirSync(DIR).sort(), REGENERATE).toEqual(Object.keys(generated).map((name) => `${name}.json`).sort());
  });

  it.each(Object.keys(generated))("%s.json is up to date", (name) => {
    expect(readFileSync(join(DIR, `${name}.json`), "utf8"), REGENERATE).toBe(stableStringify(generated[name]));
  });

  it("every panel queries through the datasource variable and has a unique id", () => {
    for (const d of Object.values(generated)) {
      const panels = (d.panels ?? []).filter((p): p is Panel => p.type !== "row");
      expect(new Set(panels.map((p) => p.id)).size).toBe(panels.length);
      for (const p of panels) {
        expect(p.datasource, p.title).toEqual({ type: "prometheus", uid: "${datasource}" });
        expect(p.targets?.length, p.title).toBeGreaterThan(0);
      }
    }
  });
});
