import { defineConfig } from "vitest/config";

/** Tests that measure latency under load: they run after the others, alone. */
const ALONE = ["test/integration/fairness.test.ts"];

/**
 * Tests start real servers on loopback ports; files run in parallel
 * processes, tests within a file in order.
 */
const common = { testTimeout: 30_000, hookTimeout: 30_000, pool: "forks" } as const;

export default defineConfig({
  test: {
    projects: [
      { test: { ...common, name: "suite", include: ["test/**/*.test.ts"], exclude: ["**/node_modules/**", ...ALONE] } },
      // A latency bound means something only on a machine that is not also
      // running the rest of the suite: a group of its own, after it.
      { test: { ...common, name: "alone", include: ALONE, sequence: { groupOrder: 1 } } },
    ],
  },
});
