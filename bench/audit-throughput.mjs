#!/usr/bin/env node
/**
 * Audit journal throughput with fsync, beside its baseline, in one run:
 *
 *   plain          write(2) + fdatasync per record, one at a time (what a
 *                  naive durable logger does; build_audit.log's BuildLog)
 *   journal        AuditJournal: hash chain + group commit + anchor per batch
 *                  (anchor made power-loss durable once a second: the default)
 *   journal-signed the same with every anchor signed (ed25519, as the daemon
 *                  runs it; src/audit/signing.ts): signing on vs off
 *   journal-noanchor        the same without audit.anchor (cost of the anchor)
 *   journal-anchorsync      anchor fdatasync'ed + dir fsync'ed every batch
 *
 * Each with 1, 16 and 256 appends outstanding, records of about the same size
 * (~300 B), on the real disk in a temp dir (BENCH_AUDIT_DIR to choose where),
 * interleaved over BENCH_AUDIT_ROUNDS rounds (default 3) after a warm-up; the
 * writers' order rotates every round. BENCH_AUDIT_VARIANTS=journal,journal-signed
 * runs only those.
 * Reports records/s (median over rounds) and append latency p50/p99 (all
 * rounds pooled), from the call to the resolution of the promise.
 *
 *   node bench/audit-throughput.mjs          prints a table and the JSON
 *   import { run } from "./audit-throughput.mjs"; await run({ rounds: 1 })
 *
 * src/audit/journal.ts and signing.ts are compiled with esbuild into the temp
 * dir, so the bench never measures a stale dist/.
 */
import fs from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { performance } from "node:perf_hooks";
import { fileURLToPath, pathToFileURL } from "node:url";
import { build } from "esbuild";

const ROOT = fileURLToPath(new URL("..", import.meta.url));

function quantile(sorted, q) {
  if (sorted.length === 0) return NaN;
  const pos = (sorted.length - 1) * q;
  const lo = Math.floor(pos);
  const hi = Math.ceil(pos);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo);
}
const median = (xs) => quantile([...xs].sort((a, b) => a - b), 0.5);
const r2 = (x) => Number(x.toFixed(2));

const clock = { now: () => new Date(), monotonicMs: () => performance.now() };

function event(i) {
  return {
    type: "shell.exec",
    phase: "ph_3f2a9c01b7de",
    rule: "shell.allow.pytest",
    clause: "SKILLS.md §2 Whitelisted",
    argv: ["pytest", "tests/test_risk.py", "-k", `case_${i}`],
    verdict: "allow",
  };
}

/** The baseline: one fd, O_APPEND, each record written and fdatasync'ed before the next starts. */
class PlainWriter {
  static open(file) {
    const w = new PlainWriter();
    w.fd = fs.openSync(file, fs.constants.O_WRONLY | fs.constants.O_APPEND | fs.constants.O_CREAT, 0o600);
    w.tail = Promise.resolve();
    return w;
  }
  append(line) {
    const buf = Buffer.from(line);
    const next = this.tail.then(
      () =>
        new Promise((resolve, reject) => {
          fs.write(this.fd, buf, 0, buf.length, null, (err) => {
            if (err) return reject(err);
            fs.fdatasync(this.fd, (e) => (e ? reject(e) : resolve()));
          });
        }),
    );
    this.tail = next.catch(() => undefined);
    return next;
  }
  async close() {
    await this.tail;
    fs.closeSync(this.fd);
  }
}

/** Runs `total` appends with `concurrency` outstanding; returns records/s and per-append latencies (ms). */
async function drive(append, total, concurrency) {
  const lat = new Float64Array(total);
  let next = 0;
  const t0 = performance.now();
  async function worker() {
    while (next < total) {
      const i = next++;
      const s = performance.now();
      await append(i);
      lat[i] = performance.now() - s;
    }
  }
  await Promise.all(Array.from({ length: concurrency }, worker));
  const secs = (performance.now() - t0) / 1000;
  return { rps: total / secs, lat: Array.from(lat) };
}

export async function run(opts = {}) {
  const rounds = opts.rounds ?? Number(process.env.BENCH_AUDIT_ROUNDS ?? 3);
  const concurrencies = opts.concurrencies ?? [1, 16, 256];
  // records per measurement; the plain writer's rate does not grow with concurrency, so it gets fewer
  const perRun = opts.records ?? ((name, c) => (c === 1 ? 1000 : name === "plain" ? 2000 : c === 16 ? 5000 : 20000));
  const base = opts.dir ?? process.env.BENCH_AUDIT_DIR ?? os.tmpdir();
  const tmp = await mkdtemp(path.join(base, "sbx-audit-bench-"));
  try {
    const modPath = path.join(tmp, "journal.mjs");
    await build({
      stdin: {
        contents: 'export * from "./journal.ts"; export { AnchorSigner } from "./signing.ts";',
        resolveDir: path.join(ROOT, "src", "audit"),
        loader: "ts",
      },
      bundle: true,
      platform: "node",
      format: "esm",
      target: "node20",
      outfile: modPath,
      logLevel: "silent",
    });
    const { AuditJournal, AnchorSigner, JOURNAL_FILE } = await import(pathToFileURL(modPath).href);
    const signer = AnchorSigner.ephemeral();

    // the plain writer writes lines of the journal's own record size
    const probeDir = path.join(tmp, "probe");
    const probe = await AuditJournal.open(probeDir, { clock, anchor: false });
    await probe.append(event(123456));
    await probe.close();
    const journalLine = fs.readFileSync(path.join(probeDir, JOURNAL_FILE), "utf8").split("\n")[0];
    const recordBytes = Buffer.byteLength(journalLine) + 1;
    const plainLine = (i) => `${journalLine.slice(0, -40)}${String(i).padStart(38, "0")}"}\n`;

    const variants = {
      plain: async (dir) => {
        fs.mkdirSync(dir, { recursive: true });
        const w = PlainWriter.open(path.join(dir, "plain.log"));
        return { append: (i) => w.append(plainLine(i)), close: () => w.close(), syncs: () => null };
      },
      journal: async (dir) => {
        const j = await AuditJournal.open(dir, { clock });
        return { append: (i) => j.append(event(i)), close: () => j.close(), syncs: () => j.counters.batches };
      },
      "journal-signed": async (dir) => {
        // as the daemon runs it: each new signature also written to the witness beside the key (src/audit/witness.ts)
        const j = await AuditJournal.open(dir, { clock, signer, witness: `${dir}.witness` });
        return { append: (i) => j.append(event(i)), close: () => j.close(), syncs: () => j.counters.batches };
      },
      "journal-noanchor": async (dir) => {
        const j = await AuditJournal.open(dir, { clock, anchor: false });
        return { append: (i) => j.append(event(i)), close: () => j.close(), syncs: () => j.counters.batches };
      },
      "journal-anchorsync": async (dir) => {
        const j = await AuditJournal.open(dir, { clock, anchorSyncMs: 0 });
        return { append: (i) => j.append(event(i)), close: () => j.close(), syncs: () => j.counters.batches };
      },
    };
    const names = opts.variants ?? (process.env.BENCH_AUDIT_VARIANTS ? process.env.BENCH_AUDIT_VARIANTS.split(",") : Object.keys(variants));
    for (const name of names) if (!variants[name]) throw new Error(`unknown writer ${name}; known: ${Object.keys(variants).join(", ")}`);

    // warm-up: JIT, page cache, the disk's journal
    for (const name of names) {
      const v = await variants[name](path.join(tmp, `warm-${name}`));
      await drive(v.append, 500, 16);
      await v.close();
    }

    const acc = {};
    let n = 0;
    for (let round = 0; round < rounds; round++) {
      for (const c of concurrencies) {
        // rotate the order every round, so no writer always runs first (or right after another's burst)
        const order = names.map((_, i) => names[(i + round) % names.length]);
        for (const name of order) {
          const v = await variants[name](path.join(tmp, `r${n++}`));
          const total = perRun(name, c);
          const res = await drive(v.append, total, c);
          const syncs = v.syncs();
          await v.close();
          const key = `${name}@${c}`;
          acc[key] ??= { writer: name, concurrency: c, rps: [], lat: [], recordsPerSync: [] };
          acc[key].rps.push(res.rps);
          acc[key].lat.push(...res.lat);
          acc[key].recordsPerSync.push(syncs ? total / syncs : 1);
        }
      }
    }
    const results = Object.values(acc).map((a) => {
      const lat = a.lat.sort((x, y) => x - y);
      return {
        writer: a.writer,
        concurrency: a.concurrency,
        recordsPerSec: Math.round(median(a.rps)),
        p50ms: r2(quantile(lat, 0.5)),
        p99ms: r2(quantile(lat, 0.99)),
        recordsPerSync: r2(median(a.recordsPerSync)),
      };
    });
    return { recordBytes, rounds, dir: base, node: process.version, loadavg: fs.readFileSync("/proc/loadavg", "utf8").trim(), results };
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
}

if (process.argv[1] && import.meta.url === pathToFileURL(path.resolve(process.argv[1])).href) {
  const out = await run();
  console.log(`audit throughput (records of ${out.recordBytes} B, ${out.rounds} rounds, ${out.dir}, node ${out.node}, loadavg after: ${out.loadavg})`);
  console.log("writer               outstanding   records/s   p50 ms   p99 ms   records/sync");
  for (const r of out.results) {
    console.log(
      `${r.writer.padEnd(20)} ${String(r.concurrency).padStart(11)} ${String(r.recordsPerSec).padStart(11)} ${String(r.p50ms).padStart(8)} ${String(r.p99ms).padStart(8)} ${String(r.recordsPerSync).padStart(14)}`,
    );
  }
  console.log(JSON.stringify(out));
}
