/**
 * The policy engine's public surface: SKILLS.md as a policy file
 * (policies/default.yaml), loaded and validated once, and the judgment of
 * commands against it.
 */
export {
  DECISIONS,
  DECISION_RANK,
  ERROR_CATEGORIES,
  policyFileSchema,
  type CompiledRule,
  type DatabasePolicy,
  type Decision,
  type ErrorCategory,
  type FailFastPolicy,
  PHASE_PERMISSIONS,
  WORKSPACE_DECISIONS,
  WORKSPACE_DECISION_RANK,
  WORKSPACE_OPERATIONS,
  type CouplingPattern,
  type PhasePermission,
  type ProtectedPathRule,
  type ProtectedTreatment,
  type WorkspaceDecision,
  type WorkspaceOperation,
  type WorkspacePolicy,
  type Policy,
  type PolicyFile,
  type ShellLayer,
} from "./schema.js";
export { DEFAULT_POLICY_FILE, combine, loadPolicy, parsePolicy } from "./load.js";
export {
  MAX_SHELL_NESTING,
  MAX_WRAPPER_DEPTH,
  WRAPPER_OPTION_RULE_ID,
  RESERVED_ENV_RULE_ID,
  OPERATOR_RULE_ID,
  PARSE_RULE_ID,
  UNKNOWN_RULE_ID,
  errorCodeFor,
  evaluateCommand,
  type CommandInput,
  type EvaluateOptions,
  type PartVerdict,
  type Verdict,
} from "./evaluate.js";
export {
  MAX_COMMAND_LENGTH,
  initShellParser,
  isShellParserReady,
  parseCommand,
  type ParseResult,
} from "./shellparse.js";
export {
  compileGlob,
  compileWorkspace,
  couples,
  protects,
  protectsName,
  type CompiledCoupling,
  type CompiledProtection,
  type CompiledWorkspace,
} from "./workspace.js";
export { defaultLimits, type PhaseLimits } from "./limits.js";
export { TIMEOUT_CEILING_MS, TIMEOUT_CLAUSE, TIMEOUT_RULE_ID, judgeTimeout, timeoutNeedsApproval } from "./timeout.js";
export { judgingViews, pythonTarget, signalName, type PythonTarget } from "./options.js";
export { unwrap, type Inner, type Unwrapped } from "./wrappers.js";
