import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    // Integration tests share one Docker engine and two cores; run files one at a time.
    fileParallelism: false,
    testTimeout: 120_000,
    hookTimeout: 300_000,
    // .ci/run sums these reports into its closing `N passed, N failed` line.
    reporters: ["default", ["json", { outputFile: process.env.SANDBOXD_TEST_REPORT ?? ".state/vitest-results.json" }]],
  },
});
