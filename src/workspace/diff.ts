/**
 * A change set as a unified diff, in git's extended format, for the human who
 * accepts or rejects an iteration (`sandboxd diff`, GET /v1/phases/:id/diff).
 *
 * - text files: unified hunks (jsdiff's structuredPatch, 3 lines of context);
 * - creates and deletes against /dev/null, with `new file mode` /
 *   `deleted file mode`;
 * - renames as `rename from` / `rename to` (hunks only if the content changed
 *   too), mode changes as `old mode` / `new mode`;
 * - binary files (a NUL in the first 8000 bytes, as git decides, or bytes
 *   that are not UTF-8) as `Binary files … differ`; files over the size cap
 *   as one line with their sizes, never read;
 * - directories deleted or renamed as one line each (git has no form for
 *   them; the judge refuses them as mass changes anyway).
 *
 * This text is for reading, not for `git apply`: it is shown to the person
 * deciding, so nothing in it may draw on their terminal. Paths are quoted as
 * git quotes them ("a\nb", octal escapes) when they hold a control
 * character, a quote, a backslash or a character that does not show
 * (a zero-width space makes `.env\u200b` look like `.env`); content lines have control characters
 * (tab kept), C1 controls, line separators and bidirectional overrides
 * ("Trojan Source") escaped, so an ANSI sequence or a right-to-left override
 * in a file shows as what it is rather than hiding the line it is on.
 */
import { structuredPatch } from "diff";
import { INVISIBLE } from "../audit/format.js";
import type { ChangeSet, FileChange } from "./changes.js";

export interface FileVersion {
  size: number;
  /** permission bits (e.g. 0o644), when known */
  mode?: number;
  read(): Promise<Buffer>;
}

/** How the diff reads the two sides: the project's accepted state and the phase's view. */
export interface DiffSource {
  /** the project's accepted version of a path, or null when it has none */
  accepted(path: string): Promise<FileVersion | null>;
  /** the phase's view of a path (the layer over the project), or null when it has none */
  view(path: string): Promise<FileVersion | null>;
}

export interface DiffOptions {
  /** files larger than this (either side) are summarised, not read; default 1 MiB */
  maxBytes?: number;
  /** lines of context; default 3 */
  context?: number;
}

export const DEFAULT_DIFF_MAX_BYTES = 1024 * 1024;

/** git's quoting of a path (quote_c_style): C escapes and octal, in double quotes, only when needed. */
export function quotePath(p: string): string {
  if (!/[\u0000-\u001f"\\\u007f-\u009f\u2028\u2029\u202a-\u202e\u2066-\u2069]/.test(p) && !INVISIBLE.test(p)) return p;
  let out = "";
  for (const ch of p) {
    const code = ch.codePointAt(0)!;
    const named: Record<string, string> = { "\u0007": "\\a", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\u000b": "\\v", "\f": "\\f", "\r": "\\r", '"': '\\"', "\\": "\\\\" };
    if (named[ch]) out += named[ch];
    else if (code < 0x20 || code === 0x7f || (code >= 0x80 && code <= 0x9f) || code === 0x2028 || code === 0x2029 || (code >= 0x202a && code <= 0x202e) || (code >= 0x2066 && code <= 0x2069) || INVISIBLE.test(ch)) {
      for (const byte of Buffer.from(ch, "utf8")) out += `\\${byte.toString(8).padStart(3, "0")}`;
    } else out += ch;
  }
  return `"${out}"`;
}

/** A content line made safe to show: control characters (but tab) and bidi overrides escaped. */
function safeLine(line: string): string {
  return line.replace(/[\u0000-\u0008\u000a-\u001f\u007f-\u009f\u2028\u2029\u202a-\u202e\u2066-\u2069]/g, (ch) => {
    const code = ch.codePointAt(0)!;
    if (ch === "\r") return "\\r";
    return code <= 0xff ? `\\x${code.toString(16).padStart(2, "0")}` : `\\u{${code.toString(16)}}`;
  });
}

const side = (prefix: "a" | "b", p: string) => quotePath(`${prefix}/${p}`);

function gitMode(mode: number | undefined): string {
  return `100${((mode ?? 0o644) & 0o7777).toString(8).padStart(3, "0")}`;
}

const UTF8 = new TextDecoder("utf-8", { fatal: true });

/** The text of a file, or null when git would call it binary (or it is not UTF-8). */
function asText(buf: Buffer): string | null {
  if (buf.subarray(0, 8000).includes(0)) return null;
  try {
    return UTF8.decode(buf);
  } catch {
    return null;
  }
}

/** One side of a file as the renderer sees it: its size and mode, and its bytes unless it was too large to read. */
interface Side {
  size: number;
  mode?: number;
  /** null: over the cap, not read */
  bytes: Buffer | null;
}

const byPath = (x: FileChange, y: FileChange) => (x.path < y.path ? -1 : x.path > y.path ? 1 : 0);

/** Reads both sides of every change through `source` (a side over the cap is never read) and renders the diff. */
export async function diffChangeSet(set: ChangeSet, source: DiffSource, opts: DiffOptions = {}): Promise<string> {
  const maxBytes = opts.maxBytes ?? DEFAULT_DIFF_MAX_BYTES;
  const load = async (v: FileVersion | null): Promise<Side | null> =>
    v && { size: v.size, ...(v.mode !== undefined ? { mode: v.mode } : {}), bytes: v.size > maxBytes ? null : await v.read() };
  const out: string[] = [];
  for (const c of [...set.changes].sort(byPath)) {
    if (c.isDir) {
      out.push(...renderChange(c, null, null, opts));
      continue;
    }
    const oldPath = c.kind === "rename" ? (c.from ?? c.path) : c.path;
    const before = c.kind === "create" ? null : await load(await source.accepted(oldPath));
    const after = c.kind === "delete" ? null : await load(await source.view(c.path));
    out.push(...renderChange(c, before, after, opts));
  }
  return out.length === 0 ? "" : `${out.join("\n")}\n`;
}

/** The bytes of a change as the layer read them (null: absent, or not a regular file). */
export interface DiffInput {
  change: FileChange;
  before: Buffer | null;
  after: Buffer | null;
  /** the project file's mode, for `old mode` lines */
  beforeMode?: number;
}

/** The same rendering for bytes already read (sorted by path; sides over the cap summarised). */
export function renderUnifiedDiff(files: readonly DiffInput[], opts: DiffOptions = {}): string {
  const maxBytes = opts.maxBytes ?? DEFAULT_DIFF_MAX_BYTES;
  const side = (b: Buffer | null, mode: number | undefined): Side | null =>
    b && { size: b.length, ...(mode !== undefined ? { mode } : {}), bytes: b.length > maxBytes ? null : b };
  const out: string[] = [];
  for (const f of [...files].sort((x, y) => byPath(x.change, y.change))) {
    out.push(...renderChange(f.change, side(f.before, f.beforeMode), side(f.after, f.change.mode), opts));
  }
  return out.length === 0 ? "" : `${out.join("\n")}\n`;
}

function renderChange(c: FileChange, before: Side | null, after: Side | null, opts: DiffOptions): string[] {
  const maxBytes = opts.maxBytes ?? DEFAULT_DIFF_MAX_BYTES;
  const context = opts.context ?? 3;
  if (c.isDir) {
    if (c.kind === "delete") return [`Directory ${quotePath(c.path)} deleted (with everything in it)`];
    if (c.kind === "rename") return [`Directory renamed: ${quotePath(c.from ?? "?")} → ${quotePath(c.path)}`];
    return []; // a created or re-moded directory shows through the files in it
  }
  const oldPath = c.kind === "rename" ? (c.from ?? c.path) : c.path;
  const lines = [`diff --git ${side("a", oldPath)} ${side("b", c.path)}`];
  if (!before && after) lines.push(`new file mode ${gitMode(c.mode ?? after.mode)}`);
  else if (before && !after) lines.push(`deleted file mode ${gitMode(before.mode)}`);
  else if (before && after) {
    const oldMode = before.mode;
    const newMode = c.mode ?? after.mode;
    if (oldMode !== undefined && newMode !== undefined && (oldMode & 0o7777) !== (newMode & 0o7777)) {
      lines.push(`old mode ${gitMode(oldMode)}`, `new mode ${gitMode(newMode)}`);
    }
  }
  if (c.kind === "rename") lines.push(`rename from ${quotePath(oldPath)}`, `rename to ${quotePath(c.path)}`);
  if (c.modeOnly) return lines;

  const aName = before ? side("a", oldPath) : "/dev/null";
  const bName = after ? side("b", c.path) : "/dev/null";
  if ((before && before.bytes === null) || (after && after.bytes === null)) {
    lines.push(`File too large to show: ${before ? `${before.size} bytes` : "absent"} → ${after ? `${after.size} bytes` : "absent"} (diff cap ${maxBytes} bytes)`);
    return lines;
  }
  const oldBuf = before?.bytes ?? Buffer.alloc(0);
  const newBuf = after?.bytes ?? Buffer.alloc(0);
  if (before && after && oldBuf.equals(newBuf)) return lines; // a pure rename or mode change
  const oldText = asText(oldBuf);
  const newText = asText(newBuf);
  if (oldText === null || newText === null) {
    lines.push(`Binary files ${aName} and ${bName} differ`);
    return lines;
  }
  const patch = structuredPatch(aName, bName, oldText, newText, undefined, undefined, { context });
  if (patch.hunks.length === 0) return lines;
  lines.push(`--- ${aName}`, `+++ ${bName}`);
  for (const h of patch.hunks) {
    // as git (and jsdiff's formatPatch): an empty side starts at the line before it, a one-line side has no ",1"
    const range = (start: number, n: number) => (n === 1 ? `${start}` : n === 0 ? `${start - 1},0` : `${start},${n}`);
    lines.push(`@@ -${range(h.oldStart, h.oldLines)} +${range(h.newStart, h.newLines)} @@`);
    for (const l of h.lines) lines.push(l.startsWith("\\") ? l : `${l[0]}${safeLine(l.slice(1))}`);
  }
  return lines;
}
