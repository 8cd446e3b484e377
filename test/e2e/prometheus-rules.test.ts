import { spawnSync } from "node:child_process";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { REPO_ROOT, skipBecause } from "./support.js";

/** deploy/prometheus/ checked by Prometheus' own tool: config, rules, and the rules' unit tests. */

const PROMETHEUS_DIR = join(REPO_ROOT, "deploy/prometheus");

function promtool(...args: string[]) {
  return spawnSync("promtool", args, { cwd: PROMETHEUS_DIR, encoding: "utf8", timeout: 60_000 });
}

const missing = promtool("--version").error ? "promtool not found; install with: apt-get install -y prometheus" : undefined;

describe("promtool", () => {
  it("accepts prometheus.yml and the rule file it loads", (ctx) => {
    if (missing) skipBecause(ctx, missing);
    const r = promtool("check", "config", "prometheus.yml");
    expect(r.status, r.stdout + r.stderr).toBe(0);
  });

  it("passes the alert rules' unit tests (rules/iommufd.rules.test.yml)", (ctx) => {
    if (missing) skipBecause(ctx, missing);
    const r = promtool("test", "rules", "rules/iommufd.rules.test.yml");
    expect(r.status, r.stdout + r.stderr).toBe(0);
  });
});
