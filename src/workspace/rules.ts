/**
 * Stand-in for the iteration judge (the full one, with the policy's coupling
 * patterns, lands from the workspace-rules work): the same signature, the
 * SKILLS.md §1 defaults hard-coded.
 */
import type { ChangeSet } from "./changes.js";

export interface WorkspacePolicy {
  maxFiles: number;
  maxFileBytes: number;
  onViolation: "reject" | "ask";
}

export const DEFAULT_WORKSPACE_POLICY: WorkspacePolicy = { maxFiles: 2, maxFileBytes: 10 * 1024 * 1024, onViolation: "reject" };

export interface JudgeFailure {
  rule: string;
  clause: string;
  path?: string;
  message: string;
}

export interface Judgement {
  decision: "accept" | "reject" | "ask";
  failures: JudgeFailure[];
}

const base = (p: string) => p.split("/").pop()!.replace(/\.py$/, "");

/** A module and its direct test (x.py + test_x.py) count as one unit. */
function coupled(paths: string[]): boolean {
  if (paths.length !== 2) return false;
  const [a, b] = paths.map(base) as [string, string];
  return a === `test_${b}` || b === `test_${a}`;
}

export function judgeChangeSet(
  set: ChangeSet,
  ctx: { policy: WorkspacePolicy; allowMainPy: boolean; approvedPaths: ReadonlySet<string> },
): Judgement {
  const failures: JudgeFailure[] = [];
  const files = set.changes.filter((c) => !c.isDir);
  const paths = [...new Set(files.map((c) => c.path))];
  if (paths.length > ctx.policy.maxFiles && !coupled(paths)) {
    failures.push({
      rule: "workspace.atomic",
      clause: "SKILLS.md §1 Atomic Modification Rule",
      message: `${paths.length} files changed in one iteration (${paths.join(", ")}); at most ${ctx.policy.maxFiles} unless directly coupled`,
    });
  }
  for (const c of files) {
    if (c.kind !== "delete" && c.sizeBytes > ctx.policy.maxFileBytes && !ctx.approvedPaths.has(c.path)) {
      failures.push({ rule: "workspace.file-size", clause: "SKILLS.md Resource Limits (Disk)", path: c.path, message: `${c.path} is ${c.sizeBytes} bytes, over ${ctx.policy.maxFileBytes}` });
    }
    const touched = [c.path, ...(c.from ? [c.from] : [])];
    for (const p of touched) {
      if (p.startsWith("shared/") && (c.kind === "delete" || c.kind === "rename") && !ctx.approvedPaths.has(p)) {
        failures.push({ rule: "workspace.shared", clause: "SKILLS.md §1 Forbidden Operations", path: p, message: `${p}: deleting or renaming files in shared/ needs human approval` });
      }
      if (p === "main.py" && !ctx.allowMainPy) {
        failures.push({ rule: "workspace.main-py", clause: "SKILLS.md §1 Forbidden Operations", path: p, message: "main.py is read-only without `phase start --allow main.py`" });
      }
    }
  }
  if (failures.length === 0) return { decision: "accept", failures };
  return { decision: ctx.policy.onViolation === "ask" ? "ask" : "reject", failures };
}
