import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    testTimeout: 30_000,
    hookTimeout: 30_000,
    // Tests start real servers on loopback ports; files run in parallel
    // processes, tests within a file in order.
    pool: "forks",
  },
});
