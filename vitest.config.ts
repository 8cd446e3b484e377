import { defineConfig } from "vitest/config";

/** Tests that measure latency under load: they run after the others, alone. */
const ALONE = ["test/integration/fairness.test.ts"];

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    testTimeout: 30_000,
    hookTimeout: 30_000,
    // Tests start real servers on loopback ports; files run in parallel
    // processes, tests within a file in order.
    pool: "forks",
    projects: [
      { extends: true, test: { name: "suite", exclude: ALONE } },
      // A latency bound is only meaningful on a machine not also running
      // the rest of the suite (2 cores): a group of its own, after it.
      { extends: true, test: { name: "alone", include: ALONE, sequence: { groupOrder: 1 } } },
    ],
  },
});
