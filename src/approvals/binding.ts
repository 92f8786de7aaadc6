/**
 * Which files a command runs, and their content: what an approval is bound to.
 *
 * A person who approves `sh x/helper.sh` approves helper.sh as it is when
 * they read it. The request records the SHA-256 of every file the command
 * runs; using the approval hashes them again and refuses if any changed
 * (src/approvals/queue.ts `use`). The files a command runs, found with the
 * policy's own reading of argv (src/policy/wrappers.ts, options.ts):
 *
 * - a program named by path: `./x.sh`, `scripts/run.sh`, `/workspace/x.sh`;
 * - a shell's script file: `sh x.sh`, `bash -e x.sh`, `. x.sh`, `source x.sh`;
 * - python's script (`python3 -I x.py`), or for `python -m pkg.mod` every file
 *   the import system could pick in the project: `pkg/__init__.py`, then
 *   `pkg/mod/__init__.py` and `pkg/mod/__main__.py` (a package wins over a
 *   module) and `pkg/mod.py`. Candidates that are absent are bound as absent,
 *   so creating one later changes the binding too;
 * - the same inside wrappers (`env python x.py`, `timeout 5 sh x.sh`) and in
 *   the parts of a command string and of `sh -c STRING`.
 *
 * Paths are relative to /workspace (the command's working directory), where
 * the project is mounted. A path outside the project (`/tmp/x.sh`) cannot be
 * hashed by the daemon: it is bound as "outside the project" and `approvals
 * show` says so. What a bound script itself imports or sources is not bound.
 */
import { createHash } from "node:crypto";
import path from "node:path";
import { parseCommand, pythonTarget, unwrap, type CommandInput } from "../policy/index.js";
import { PYTHON_NAME, baseName } from "../policy/options.js";
import type { FileBinding } from "./queue.js";

/** Where the project is mounted in the sandbox, and the commands' working directory. */
export const WORKSPACE = "/workspace";

/** How a file of the project is read: its bytes, or why there are none. */
export type ProjectFile = { kind: "file"; data: Buffer } | { kind: "absent" } | { kind: "outside" } | { kind: "not-regular" } | { kind: "too-large" };

/** Reads a project-relative path (src/phases/project.ts readProjectFile, bound to the phase). */
export type ReadProjectFile = (relPath: string) => Promise<ProjectFile>;

const MAX_DEPTH = 8;

/** The paths a command runs, as the command names them, in order, without duplicates. */
export function filesRun(input: CommandInput): string[] {
  const out: string[] = [];
  if ("argv" in input) fromArgv(input.argv, out, 0);
  else fromString(input.command, out, 0);
  return [...new Set(out)];
}

function fromString(command: string, out: string[], depth: number): void {
  const parsed = parseCommand(command);
  if (!parsed.ok) return; // refused by the policy anyway
  for (const argv of parsed.commands) fromArgv(argv, out, depth + 1);
}

function fromArgv(argv: readonly string[], out: string[], depth: number): void {
  const program = argv[0];
  if (program === undefined || depth > MAX_DEPTH) return;
  if (program.includes("/")) out.push(program);
  const name = baseName(program);
  if (PYTHON_NAME.test(name)) {
    const t = pythonTarget(argv.slice(1));
    if (t.kind === "script") out.push(t.path);
    if (t.kind === "module") out.push(...moduleCandidates(t.name));
    return;
  }
  for (const inner of unwrap(argv)?.inner ?? []) {
    if (inner.kind === "file") out.push(inner.path);
    else if (inner.kind === "argv") fromArgv(inner.argv, out, depth + 1);
    else fromString(inner.script, out, depth + 1);
  }
}

/** The project files `python -m NAME` may run (see the module comment); none for a name that is no dotted identifier. */
export function moduleCandidates(name: string): string[] {
  const parts = name.split(".");
  if (!parts.every((p) => /^[A-Za-z_][A-Za-z0-9_]*$/.test(p))) return [];
  const out: string[] = [];
  for (let i = 1; i < parts.length; i++) out.push(`${parts.slice(0, i).join("/")}/__init__.py`);
  const full = parts.join("/");
  out.push(`${full}/__init__.py`, `${full}/__main__.py`, `${full}.py`);
  return out;
}

/** A path as the command names it → project-relative, or null when it is outside /workspace. */
export function projectRelative(p: string): string | null {
  const abs = path.posix.resolve(WORKSPACE, p);
  if (abs === WORKSPACE) return null;
  return abs.startsWith(`${WORKSPACE}/`) ? abs.slice(WORKSPACE.length + 1) : null;
}

/** Hashes the files a command runs, through the one project reader. */
export async function bindFiles(paths: readonly string[], read: ReadProjectFile): Promise<FileBinding[]> {
  const out: FileBinding[] = [];
  for (const p of paths) {
    const rel = projectRelative(p);
    const f: ProjectFile = rel === null ? { kind: "outside" } : await read(rel);
    if (f.kind === "file") out.push({ path: p, sha256: createHash("sha256").update(f.data).digest("hex"), note: null });
    else out.push({ path: p, sha256: null, note: NOTES[f.kind] });
  }
  return out;
}

const NOTES: Record<Exclude<ProjectFile["kind"], "file">, string> = {
  absent: "absent",
  outside: "outside the project: not bound",
  "not-regular": "not a regular file",
  "too-large": "too large to hash",
};
