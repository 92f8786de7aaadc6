/**
 * Reading audit.jsonl for `sandboxd audit tail|show`: records are streamed
 * line by line (a long journal is never loaded whole), filtered by phase and
 * sequence number; `follow` keeps polling the file for new complete lines.
 */
import { createReadStream } from "node:fs";
import { stat } from "node:fs/promises";
import path from "node:path";
import { createInterface } from "node:readline";
import { JOURNAL_FILE, type AuditRecord } from "./journal.js";

export interface ReadFilter {
  phase?: string | undefined;
  /** only records with seq > after */
  after?: number | undefined;
}

function matches(r: AuditRecord, f: ReadFilter): boolean {
  return (f.after === undefined || r.seq > f.after) && (f.phase === undefined || r.phase === f.phase);
}

/** Complete records from byte `from`; returns them and the offset after the last complete line. */
async function readFrom(file: string, from: number, f: ReadFilter): Promise<{ records: AuditRecord[]; next: number }> {
  const records: AuditRecord[] = [];
  let next = from;
  const size = (await stat(file).catch(() => null))?.size ?? 0;
  if (size <= from) return { records, next };
  const lines = createInterface({ input: createReadStream(file, { start: from, end: size - 1 }), crlfDelay: Infinity });
  let consumed = from;
  for await (const line of lines) {
    const bytes = Buffer.byteLength(line) + 1;
    // a final line without its newline is still being written: stop before it
    if (consumed + bytes > size) break;
    consumed += bytes;
    next = consumed;
    if (!line) continue;
    try {
      const r = JSON.parse(line) as AuditRecord;
      if (matches(r, f)) records.push(r);
    } catch {
      /* `audit verify` reports malformed lines; reading skips them */
    }
  }
  return { records, next };
}

export async function readRecords(stateDir: string, f: ReadFilter, last?: number): Promise<AuditRecord[]> {
  const { records } = await readFrom(path.join(stateDir, JOURNAL_FILE), 0, f);
  return last === undefined ? records : records.slice(-last);
}

/** Calls `onRecord` for each new matching record until `signal` aborts. */
export async function followRecords(
  stateDir: string,
  f: ReadFilter,
  onRecord: (r: AuditRecord) => void,
  signal: AbortSignal,
  pollMs = 200,
  /** read from the journal's first byte (the filter's `after` decides), so nothing between a read and the follow is missed */
  fromStart = false,
): Promise<void> {
  const file = path.join(stateDir, JOURNAL_FILE);
  let offset = fromStart ? 0 : ((await stat(file).catch(() => null))?.size ?? 0);
  while (!signal.aborted) {
    const { records, next } = await readFrom(file, offset, f);
    offset = next;
    for (const r of records) onRecord(r);
    // One abort listener per wait, removed when the wait ends: a follow that lasts hours must not pile them up.
    await new Promise<void>((resolve) => {
      const onAbort = () => {
        clearTimeout(t);
        resolve();
      };
      const t = setTimeout(() => {
        signal.removeEventListener("abort", onAbort);
        resolve();
      }, pollMs);
      signal.addEventListener("abort", onAbort, { once: true });
    });
  }
}
