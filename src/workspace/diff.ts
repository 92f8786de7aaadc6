/**
 * Stand-in for the unified-diff renderer (the full one lands from the
 * workspace-rules work): whole-file hunks, enough to see an iteration.
 */
import type { FileChange } from "./changes.js";

export interface DiffInput {
  change: FileChange;
  /** bytes before (the project's), null when absent or not a regular file */
  before: Buffer | null;
  /** bytes after (the layer's), null when absent or not a regular file */
  after: Buffer | null;
}

function isBinary(b: Buffer | null): boolean {
  return b !== null && b.subarray(0, 8000).includes(0);
}

function lines(b: Buffer | null): string[] {
  if (!b || b.length === 0) return [];
  const text = b.toString("utf8");
  const out = text.split("\n");
  if (out.at(-1) === "") out.pop();
  return out;
}

export function renderUnifiedDiff(files: readonly DiffInput[]): string {
  const out: string[] = [];
  for (const { change, before, after } of files) {
    if (change.isDir) continue;
    const a = change.kind === "create" ? "/dev/null" : `a/${change.from ?? change.path}`;
    const b = change.kind === "delete" ? "/dev/null" : `b/${change.path}`;
    out.push(`diff --sandboxd ${a} ${b}`);
    if (change.kind === "rename") out.push(`rename from ${change.from}`, `rename to ${change.path}`);
    if (change.mode !== undefined) out.push(`new mode ${change.mode.toString(8).padStart(6, "100")}`);
    if (change.modeOnly || (change.kind === "rename" && before?.equals(after ?? Buffer.alloc(0)))) continue;
    if (isBinary(before) || isBinary(after)) {
      out.push(`Binary files ${a} and ${b} differ`);
      continue;
    }
    const old = lines(before);
    const neu = lines(after);
    out.push(`--- ${a}`, `+++ ${b}`, `@@ -${old.length ? 1 : 0},${old.length} +${neu.length ? 1 : 0},${neu.length} @@`);
    for (const l of old) out.push(`-${l}`);
    for (const l of neu) out.push(`+${l}`);
  }
  return out.length ? out.join("\n") + "\n" : "";
}
