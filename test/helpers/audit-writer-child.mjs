/**
 * Child process for test/integration/audit-durability.test.ts: appends
 * COUNT records to the audit journal in DIR with CONCURRENCY appends
 * outstanding (so group commit batches them), and prints each acknowledged
 * seq on stdout with a synchronous write(2) *after* its append resolved — the
 * parent kills it with SIGKILL mid-burst and checks that every seq it saw is
 * in a chain that verifies.
 *
 *   node audit-writer-child.mjs JOURNAL_MODULE DIR COUNT CONCURRENCY [KEY_FILE]
 *
 * JOURNAL_MODULE is src/audit/journal.ts (and signing.ts) compiled to one ES
 * module. With KEY_FILE the journal signs its anchors with that key, as the
 * daemon does.
 */
import { writeSync } from "node:fs";
import { pathToFileURL } from "node:url";

const [modulePath, dir, countArg, concurrencyArg, keyFile] = process.argv.slice(2);
const { AuditJournal, readSigningKey } = await import(pathToFileURL(modulePath).href);
const count = Number(countArg);
const concurrency = Number(concurrencyArg);

/** write(2) all of `text` to stdout; a full non-blocking pipe (EAGAIN) is retried. */
function say(text) {
  const buf = Buffer.from(text);
  let off = 0;
  while (off < buf.length) {
    try {
      off += writeSync(1, buf, off, buf.length - off);
    } catch (e) {
      if (e.code !== "EAGAIN") throw e;
    }
  }
}

const clock = { now: () => new Date(), monotonicMs: () => performance.now() };
const journal = await AuditJournal.open(dir, { clock, ...(keyFile ? { signer: await readSigningKey(keyFile) } : {}) });
say(`ready ${journal.durable.seq}\n`);

let next = 0;
async function worker() {
  while (next < count) {
    const i = next++;
    const rec = await journal.append({
      type: "shell.exec",
      phase: "ph_burst",
      rule: "shell.allow.pytest",
      clause: "SKILLS.md §2",
      argv: ["pytest", "-k", `case_${i}`],
      note: "x".repeat(120),
    });
    say(`${rec.seq}\n`);
  }
}
await Promise.all(Array.from({ length: concurrency }, worker));
say("done\n");
// Stay alive until the parent kills us.
setInterval(() => undefined, 60_000);
