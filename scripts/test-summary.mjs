// Prints `N passed, N failed[, N skipped]` summed over vitest JSON reports.
// A missing or unreadable report (set-up or typecheck failed before any test
// ran) is a failure, never "0 failed".
import { readFileSync } from "node:fs";

const files = process.argv.slice(2).length ? process.argv.slice(2) : [".state/vitest-results.json"];
let passed = 0;
let failed = 0;
let skipped = 0;
const failures = [];
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
  for (const suite of report.testResults ?? []) {
    const file = String(suite.name ?? "").replace(process.cwd() + "/", "");
    const failedTests = (suite.assertionResults ?? []).filter((a) => a.status === "failed");
    if (suite.status === "failed" && failedTests.length === 0) {
      failures.push(`${file}: ${firstLine(suite.message)}`);
    }
    for (const test of failedTests) {
      failures.push(`${file} > ${test.fullName ?? test.title}: ${firstLine((test.failureMessages ?? [])[0])}`);
    }
  }
  passed += report.numPassedTests ?? 0;
  failed += (report.numFailedTests ?? 0) + filesFailedWithoutTests;
  skipped += (report.numPendingTests ?? 0) + (report.numTodoTests ?? 0);
}
// The failures are named just above the summary line, so the tail of a CI log says what failed.
for (const failure of failures) console.log(`FAILED ${failure}`);
console.log(`${passed} passed, ${failed} failed${skipped ? `, ${skipped} skipped` : ""}`);
process.exit(failed > 0 || passed === 0 ? 1 : 0);

function firstLine(text) {
  const line = String(text ?? "").split("\n").find((l) => l.trim() !== "") ?? "(no message)";
  return line.length > 300 ? `${line.slice(0, 300)}…` : line;
}
