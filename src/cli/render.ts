/** How the CLI prints records for people (the --json forms print them as stored). */
import { escapeControl, quoteArgv } from "../audit/format.js";
import type { AuditRecord } from "../audit/journal.js";

/** One audit record as a line: seq, time, phase, type, then its decision and the most telling fields. */
export function renderRecord(r: AuditRecord): string {
  const f = r as Record<string, unknown>;
  const what =
    typeof f.command === "string"
      ? f.command
      : Array.isArray(f.argv)
        ? quoteArgv(f.argv as string[])
        : typeof f.sql === "string"
          ? `${typeof f.engine === "string" ? `${f.engine}: ` : ""}${f.sql}`
          : r.type.startsWith("net.") && (typeof f.service === "string" || typeof f.address === "string" || typeof f.host === "string")
            ? [f.service ?? f.host ?? f.address, f.port].filter((x) => x !== undefined && x !== null).join(":")
            : "";
  const bits = [
    typeof f.decision === "string" ? String(f.decision).toUpperCase() : "",
    r.rule ? `${r.rule}` : "",
    typeof f.exitCode === "number" || f.exitCode === null && "signal" in f ? `exit=${f.exitCode ?? f.signal}` : "",
    f.timedOut === true ? "timeout" : "",
    typeof f.approval === "string" ? String(f.approval) : "",
    typeof f.reason === "string" && r.type.startsWith("phase.") ? String(f.reason) : "",
    what,
  ].filter(Boolean);
  // every field escaped: a record's values come from the sandbox
  return escapeControl(`${String(r.seq).padStart(6)}  ${r.ts}  ${r.phase ?? "-".padEnd(15)}  ${r.type.padEnd(16)} ${bits.join("  ")}`);
}

