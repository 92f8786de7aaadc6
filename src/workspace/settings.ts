/**
 * What the layer needs from the policy. The policy's `workspace:` section
 * (src/policy/schema.ts) supplies these; until a policy names them, these are
 * SKILLS.md's defaults.
 */
import { DEFAULT_WORKSPACE_POLICY, type WorkspacePolicy } from "./rules.js";

const MiB = 1024 * 1024;

export interface WorkspaceSettings {
  /** credential files: not in the view at all (SKILLS.md Credential Handling) */
  hidden: string[];
  /** never written from the sandbox: read-only over the view (SKILLS.md §1, audit trail, policy) */
  readOnly: string[];
  /** the layer's hard disk budget */
  budgetBytes: number;
  /** checkpoint before each validation command, so a harness that never calls checkpoint is still judged */
  checkpointBeforeValidation: boolean;
  validationCommands: string[];
  judge: WorkspacePolicy;
}

export function workspaceSettings(extraReadOnly: readonly string[] = []): WorkspaceSettings {
  return {
    hidden: [".env"],
    readOnly: [".git", ".envrc", "build_audit.log", ...extraReadOnly],
    budgetBytes: 2048 * MiB,
    checkpointBeforeValidation: true,
    validationCommands: ["pytest", "pylint", "mypy", "black", "isort"],
    judge: DEFAULT_WORKSPACE_POLICY,
  };
}

/** Whether one of the command's parts runs a validation tool (directly or as `python -m TOOL`). */
export function isValidationCommand(parts: ReadonlyArray<readonly string[]>, tools: readonly string[]): boolean {
  const base = (s: string) => s.split("/").pop() ?? s;
  return parts.some((argv) => {
    const first = base(argv[0] ?? "");
    if (tools.includes(first)) return true;
    if (/^python3?(\.\d+)?$/.test(first)) {
      const m = argv.indexOf("-m");
      return m >= 0 && tools.includes(argv[m + 1] ?? "");
    }
    return false;
  });
}
