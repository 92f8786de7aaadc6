// Prints `N passed, N failed[, N skipped]` summed over vitest JSON reports.
// A missing or unreadable report (set-up or typecheck failed before any test
// ran) is a failure, never "0 failed".
import { readFileSync } from "node:fs";

const files = process.argv.slice(2).length ? process.argv.slice(2) : [".state/vitest-results.json"];
let passed = 0;
let failed = 0;
let skipped = 0;
for (const file of files) {
  let report;
  try {
    report = JSON.parse(readFileSync(file, "utf8"));
  } catch (err) {
    console.error(`test-summary: no test report at ${file} (${err.message}); that suite did not run`);
    failed += 1;
    continue;
  }
  // A test file that fails to load is a failed file with no failed test in it: one failure.
  // (numFailedTestSuites is not used: vitest counts every failed describe block in it.)
  const filesFailedWithoutTests = (report.testResults ?? []).filter(
    (s) => s.status === "failed" && !(s.assertionResults ?? []).some((a) => a.status === "failed"),
  ).length;
  passed += report.numPassedTests ?? 0;
  failed += (report.numFailedTests ?? 0) + filesFailedWithoutTests;
  skipped += (report.numPendingTests ?? 0) + (report.numTodoTests ?? 0);
}
console.log(`${passed} passed, ${failed} failed${skipped ? `, ${skipped} skipped` : ""}`);
process.exit(failed > 0 || passed === 0 ? 1 : 0);
