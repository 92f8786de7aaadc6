/**
 * What the layer takes from the policy's `workspace:` section
 * (src/policy/schema.ts): which of the project's paths are hidden or
 * read-only in the view, the disk budget, and the validation programs that
 * trigger a checkpoint.
 *
 * Protected paths are globs; the view needs concrete paths (a whiteout, a
 * bind mount). Read-only paths are resolved against the project root's own
 * entries (`.git`, `.envrc`, `build_audit.log`, `main.py`); one deeper in
 * the tree (`vendor/lib/.git/config`) is writable in the view but never
 * changed — the judge refuses any iteration that touches it. Hidden paths
 * (credential files) are found at any depth by one walk of the project at
 * phase start: `config/.env` read in the sandbox would leak its values.
 */
import { readdir } from "node:fs/promises";
import path from "node:path";
import { compileWorkspace, protects, protectsName, type WorkspacePolicy } from "../policy/index.js";

export interface LayerPaths {
  /** not visible in the view at all (credential files) */
  hidden: string[];
  /** read-only over the view */
  readOnly: string[];
}

/**
 * The protected entries of the project's root, and (unless `deep: false`)
 * the credential files below it. `deep: false` leaves the walk below to
 * `hiddenBelowRoot`, which a phase start runs while its container starts.
 */
export async function protectedRootEntries(project: string, ws: WorkspacePolicy, opts: { allowMainPy: boolean; extraReadOnly?: readonly string[]; deep?: boolean }): Promise<LayerPaths> {
  const names = await readdir(project).catch(() => [] as string[]);
  const { protections } = compileWorkspace(ws);
  const hidden: string[] = [];
  const readOnly = new Set<string>(opts.extraReadOnly ?? []);
  for (const name of names) {
    for (const rule of protections) {
      if (!protects(rule, name)) continue;
      if (rule.spec.treatment === "hidden") hidden.push(name);
      else if (rule.spec.treatment === "readOnly" && !(rule.spec.unlessPermission === "main.py" && opts.allowMainPy)) readOnly.add(name);
    }
  }
  // hidden files deeper in the tree (config/.env, deploy/server.key): a credential file is hidden wherever it is
  if (opts.deep !== false) for (const rel of await hiddenBelowRoot(project, ws)) if (!hidden.includes(rel)) hidden.push(rel);
  // a name both hidden and read-only is hidden
  return { hidden, readOnly: [...readOnly].filter((n) => !hidden.includes(n)) };
}

/** Whether one of the command's parts runs a validation program (directly or as `python -m PROGRAM`). */
export function isValidationCommand(parts: ReadonlyArray<readonly string[]>, programs: readonly string[]): boolean {
  const base = (s: string) => s.split("/").pop() ?? s;
  return parts.some((argv) => {
    const first = base(argv[0] ?? "");
    if (programs.includes(first)) return true;
    if (/^python3?(\.\d+)?$/.test(first)) {
      const m = argv.indexOf("-m");
      return m >= 0 && programs.includes(argv[m + 1] ?? "");
    }
    return false;
  });
}

/** Credential files below the project's root (not its root's own entries): one walk of the project. */
export async function hiddenBelowRoot(project: string, ws: WorkspacePolicy): Promise<string[]> {
  const { protections } = compileWorkspace(ws);
  return hiddenBelow(project, protections.filter((r) => r.spec.treatment === "hidden"));
}

/** Folders never searched for credential files: the repository's metadata (read-only) and tools' caches. */
const SKIP_DIRS = new Set([".git", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis"]);

/**
 * Files below the project's root that a hidden rule covers. One walk of the
 * project at phase start (links are not followed); the view whites each out.
 */
async function hiddenBelow(project: string, rules: ReturnType<typeof compileWorkspace>["protections"]): Promise<string[]> {
  const out: string[] = [];
  if (rules.length === 0) return out;
  // the folders of one folder are read side by side: a walk one readdir at a
  // time waited on each (0.2–0.9 s at phase start on a 100k-file tree, most of
  // it idle); libuv's thread pool bounds how many run at once
  const walk = async (rel: string): Promise<void> => {
    const entries = await readdir(path.join(project, rel), { withFileTypes: true }).catch(() => []);
    const below: string[] = [];
    for (const e of entries) {
      // a name-only rule (every default one) tests the name; the path is made only when needed
      if (rel && rules.some((rule) => (rule.names ? protectsName(rule.names, e.name) : protects(rule, `${rel}/${e.name}`)))) {
        out.push(`${rel}/${e.name}`);
        continue;
      }
      if (e.isDirectory() && !SKIP_DIRS.has(e.name)) below.push(rel ? `${rel}/${e.name}` : e.name);
    }
    await Promise.all(below.map(walk));
  };
  await walk("");
  return out.sort();
}
