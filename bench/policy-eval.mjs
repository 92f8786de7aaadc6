#!/usr/bin/env node
/**
 * Policy evaluation benchmark: how long evaluateCommand() takes per command,
 * with argv input and with a command string (parsed by tree-sitter-bash),
 * over a mix of 20 commands, beside two baselines measured in the same run,
 * interleaved, after a warm-up:
 *   - the old argv-only evaluateArgv() of dist/policy/shell.js (hand-written
 *     ifs, no policy file);
 *   - a bare regex test of the SKILLS.md §2 whitelist pattern on the string.
 * Targets: p50 ≤ 50 µs for argv, ≤ 200 µs for a string.
 *
 * Runs against dist/: build first (`npx tsc -p tsconfig.json` or `npm run build`).
 *   node bench/policy-eval.mjs            → table on stderr, JSON on stdout
 *   import { run } from "./policy-eval.mjs"; await run({ n: 500 })
 *
 * Each call is timed on its own with process.hrtime.bigint(); the timer's own
 * cost (measured, reported as timerOverheadNs) is included in every figure.
 * Settings (environment): BENCH_POLICY_N samples per command and input kind
 * (default 2000; BENCH_QUICK=1 → 200), BENCH_POLICY_WARMUP rounds (default 300).
 */
import { existsSync } from "node:fs";
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const ROOT = fileURLToPath(new URL("..", import.meta.url));
const DIST = path.join(ROOT, "dist", "policy");

/** [argv, command string]; compound strings are given as argv through `bash -c` */
const MIX = [
  [["pytest", "tests/"], "pytest tests/"],
  [["pytest", "--cov=services", "tests/"], "pytest --cov=services tests/"],
  [["python", "main.py", "--mode", "backtest"], "python main.py --mode backtest"],
  [["python", "scripts/validate_config.py"], "python scripts/validate_config.py"],
  [["pylint", "services/", "shared/"], "pylint services/ shared/"],
  [["mypy", "services/", "shared/", "--strict"], "mypy services/ shared/ --strict"],
  [["black", "--check", "."], "black --check ."],
  [["isort", "--check-only", "."], "isort --check-only ."],
  [["pip", "install", "-r", "requirements.txt"], "pip install -r requirements.txt"],
  [["pip", "list"], "pip list"],
  [["docker-compose", "up", "-d"], "docker-compose up -d"],
  [["docker-compose", "down", "-v"], "docker-compose down -v"],
  [["docker-compose", "-f", "compose.yml", "logs", "db"], "docker-compose -f compose.yml logs db"],
  [["rm", "-rf", "/"], "rm -rf /"],
  [["sudo", "pytest"], "sudo pytest"],
  [["curl", "https://example.com"], "curl https://example.com"],
  [["python", "-c", "print(1)"], `python -c "print(1)"`],
  [["bash", "-c", "pytest -q && black --check ."], `bash -c "pytest -q && black --check ."`],
  [["bash", "-c", "pytest tests/ && black --check . && mypy services/ --strict"], "pytest tests/ && black --check . && mypy services/ --strict"],
  [["bash", "-c", "pylint services/ 2>&1 | head -n 20"], "pylint services/ 2>&1 | head -n 20"],
];

const SKILLS_WHITELIST = /^(python|pytest|pylint|mypy|black|isort|docker-compose|pip)/;

let sink = 0;
const TARGET_ARGV_P50_NS = 50_000;
const TARGET_STRING_P50_NS = 200_000;

function quantile(sorted, q) {
  if (sorted.length === 0) return NaN;
  const pos = (sorted.length - 1) * q;
  const lo = Math.floor(pos);
  const hi = Math.ceil(pos);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo);
}

function stats(samples) {
  const sorted = Float64Array.from(samples).sort();
  const mean = sorted.reduce((a, b) => a + b, 0) / sorted.length;
  return { n: sorted.length, p50: Math.round(quantile(sorted, 0.5)), p95: Math.round(quantile(sorted, 0.95)), mean: Math.round(mean) };
}

function time(fn) {
  const t0 = process.hrtime.bigint();
  fn();
  return Number(process.hrtime.bigint() - t0);
}

const envInt = (name, dflt) => {
  const v = process.env[name];
  if (v === undefined || v === "") return dflt;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 1) throw new Error(`${name} must be a positive integer, got ${v}`);
  return n;
};

/**
 * Runs the benchmark and returns the results object (figures in ns).
 * opts.n: samples per command and input kind; opts.warmup: warm-up rounds.
 */
export async function run(opts = {}) {
  const quick = process.env.BENCH_QUICK === "1";
  const n = opts.n ?? envInt("BENCH_POLICY_N", quick ? 200 : 2000);
  const warmup = opts.warmup ?? envInt("BENCH_POLICY_WARMUP", quick ? 50 : 300);
  if (!existsSync(path.join(DIST, "index.js"))) {
    throw new Error(`${DIST}/index.js not found: build first with \`npx tsc -p tsconfig.json\``);
  }
  const engine = await import(pathToFileURL(path.join(DIST, "index.js")).href);
  const legacy = await import(pathToFileURL(path.join(DIST, "shell.js")).href);
  await engine.initShellParser();
  const policy = await engine.loadPolicy(engine.DEFAULT_POLICY_FILE);

  const kinds = {
    argv: (i) => engine.evaluateCommand(policy, { argv: MIX[i][0] }),
    string: (i) => engine.evaluateCommand(policy, { command: MIX[i][1] }),
    parseOnly: (i) => engine.parseCommand(MIX[i][1]),
    baselineEvaluateArgv: (i) => legacy.evaluateArgv(MIX[i][0]),
    baselineRegex: (i) => SKILLS_WHITELIST.test(MIX[i][1]),
  };
  const names = Object.keys(kinds);
  const samples = Object.fromEntries(names.map((k) => [k, MIX.map(() => [])]));

  // results feed `sink` so no call can be optimised away
  for (let r = 0; r < warmup; r++) for (let i = 0; i < MIX.length; i++) for (const k of names) sink ^= kinds[k](i) ? 1 : 0;
  globalThis.gc?.();

  const overhead = [];
  for (let r = 0; r < 1000; r++) overhead.push(time(() => {}));
  for (let r = 0; r < n; r++) {
    for (let i = 0; i < MIX.length; i++) {
      for (const k of names) {
        const fn = kinds[k];
        samples[k][i].push(time(() => (sink ^= fn(i) ? 1 : 0)));
      }
    }
  }

  const results = Object.fromEntries(names.map((k) => [k, stats(samples[k].flat())]));
  const perCommand = MIX.map(([argv, command], i) => ({
    command,
    argv: argv.join(" "),
    decisionArgv: kinds.argv(i).decision,
    decisionString: kinds.string(i).decision,
    argvP50: stats(samples.argv[i]).p50,
    stringP50: stats(samples.string[i]).p50,
    baselineEvaluateArgvP50: stats(samples.baselineEvaluateArgv[i]).p50,
  }));
  return {
    bench: "policy-eval",
    unit: "ns",
    node: process.version,
    commands: MIX.length,
    samplesPerCommand: n,
    warmupRounds: warmup,
    timerOverheadNs: stats(overhead).p50,
    results,
    targets: { argvP50: TARGET_ARGV_P50_NS, stringP50: TARGET_STRING_P50_NS },
    pass: { argv: results.argv.p50 <= TARGET_ARGV_P50_NS, string: results.string.p50 <= TARGET_STRING_P50_NS },
    perCommand,
  };
}

/** A plain-text table of the results (µs). */
export function table(res) {
  const us = (ns) => (ns / 1000).toFixed(2).padStart(9);
  const lines = [];
  lines.push(`policy evaluation, ${res.commands} commands × ${res.samplesPerCommand} samples, node ${res.node} (µs; timer ≈ ${res.timerOverheadNs} ns)`);
  lines.push(`${"".padEnd(22)}${"p50".padStart(9)}${"p95".padStart(9)}${"mean".padStart(9)}   target p50`);
  const target = { argv: res.targets.argvP50, string: res.targets.stringP50 };
  for (const [k, s] of Object.entries(res.results)) {
    const t = target[k] === undefined ? "" : `   ≤ ${us(target[k]).trim()} ${s.p50 <= target[k] ? "ok" : "MISSED"}`;
    lines.push(`${k.padEnd(22)}${us(s.p50)}${us(s.p95)}${us(s.mean)}${t}`);
  }
  lines.push("");
  lines.push(`${"command (string form)".padEnd(62)}${"argv".padStart(9)}${"string".padStart(9)}${"old".padStart(9)}  decision`);
  for (const c of res.perCommand) {
    const name = c.command.length > 60 ? `${c.command.slice(0, 59)}…` : c.command;
    lines.push(`${name.padEnd(62)}${us(c.argvP50)}${us(c.stringP50)}${us(c.baselineEvaluateArgvP50)}  ${c.decisionString}`);
  }
  return lines.join("\n");
}

if (process.argv[1] && import.meta.url === pathToFileURL(path.resolve(process.argv[1])).href) {
  try {
    const res = await run();
    process.stderr.write(`${table(res)}\n`);
    process.stdout.write(`${JSON.stringify(res, null, 2)}\n`);
    if (!res.pass.argv || !res.pass.string) process.exitCode = 1;
  } catch (e) {
    process.stderr.write(`bench/policy-eval: ${e.message}\n`);
    process.exitCode = 2;
  }
}
