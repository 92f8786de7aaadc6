/**
 * The agent's workspace (SKILLS.md §1): a per-phase change layer over the
 * project (layer.ts), read as a change set (changes.ts), judged per iteration
 * (rules.ts, iterations.ts) and applied to the project safely (apply.ts).
 * docs/WORKSPACE.md explains the design and its edge cases.
 */
export type { ChangeKind, ChangeSet, FileChange } from "./changes.js";
export { WorkspaceLayer, layerPaths, readRegular, type LayerSpec } from "./layer.js";
export { applyChangeSet, checkRelPath, projectPath } from "./apply.js";
export { PhaseWorkspace, type CheckpointResult, type IterationFileBinding, type IterationRecord, type IterationTrigger, type WorkspaceHooks } from "./iterations.js";
export { ExecGate } from "./gate.js";
export { judgeChangeSet, type Judgement, type RuleFailure } from "./rules.js";
export { diffChangeSet } from "./diff.js";
export { clearCredentialScanCache, hiddenBelowRoot, lastCredentialScan, isValidationCommand, protectedRootEntries } from "./settings.js";
export { SpareLayer, type SpareState } from "./spare.js";
