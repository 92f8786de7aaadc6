/**
 * What the layer takes from the policy's `workspace:` section
 * (src/policy/schema.ts): which of the project's paths are hidden or
 * read-only in the view, the disk budget, and the validation programs that
 * trigger a checkpoint.
 *
 * Protected paths are globs; the view needs concrete paths (a whiteout, a
 * bind mount). They are resolved against the project root's own entries
 * only (one readdir at phase start, cheap at any project size): `.env`,
 * `.git`, `.envrc`, `build_audit.log`, `main.py`. A protected path deeper in
 * the tree (`config/.env`) is still never changed — the judge refuses any
 * iteration that touches it — but it is visible in the view
 * (docs/WORKSPACE.md, "Left undone").
 */
import { readdir } from "node:fs/promises";
import { compileWorkspace, protects, type WorkspacePolicy } from "../policy/index.js";

export interface LayerPaths {
  /** not visible in the view at all (credential files) */
  hidden: string[];
  /** read-only over the view */
  readOnly: string[];
}

export async function protectedRootEntries(project: string, ws: WorkspacePolicy, opts: { allowMainPy: boolean; extraReadOnly?: readonly string[] }): Promise<LayerPaths> {
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
