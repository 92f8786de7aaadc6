/**
 * Loads a policy file: YAML → zod → every rule's examples checked against the
 * rule set → one frozen Policy. A policy with any problem is refused whole,
 * with every problem listed as `file:line: path: reason` in ONE
 * SBX_ERR_POLICY_INVALID, so a broken policy never half-applies; reloading
 * (SIGHUP) is calling loadPolicy again and swapping only on success.
 *
 * combine(base, stricter) is how a phase policy (--policy) applies: commands
 * are judged under both and the strictest verdict wins; every limit is the
 * smaller of the two. A phase policy can therefore only narrow the daemon's.
 */
import { readFile } from "node:fs/promises";
import { fileURLToPath } from "node:url";
import { LineCounter, parseDocument, isNode } from "yaml";
import type { z } from "zod";
import { SandboxdError } from "../errors.js";
import { PHASE_MODES, type PhaseMode } from "../domain.js";
import { compileLayer, evaluateInLayer, ruleMatches, show, wrappedArgvs } from "./evaluate.js";
import { buildWorkspace, checkWorkspace, combineWorkspace } from "./workspace.js";
import { MEMORY_WATCH_DEFAULTS, type PhaseLimits } from "./limits.js";
import {
  DECISION_RANK,
  DEFAULT_AUDIT,
  DEFAULT_NETWORK,
  ERROR_CATEGORIES,
  FAIL_FAST_DEFAULTS,
  policyFileSchema,
  shellRuleSchema,
  workspaceSchema,
  type DatabasePolicy,
  type FailFastPolicy,
  type Decision,
  type NetworkPolicy,
  type PackageIndexHost,
  type PackageIndexPolicy,
  type Policy,
  type PolicyFile,
  type ShellRuleSpec,
} from "./schema.js";

/** policies/default.yaml, the encoding of SKILLS.md the daemon starts with */
export const DEFAULT_POLICY_FILE = fileURLToPath(new URL("../../policies/default.yaml", import.meta.url));

export async function loadPolicy(file: string = DEFAULT_POLICY_FILE): Promise<Policy> {
  let text: string;
  try {
    text = await readFile(file, "utf8");
  } catch (cause) {
    const code = (cause as NodeJS.ErrnoException).code ?? String(cause);
    throw new SandboxdError("SBX_ERR_POLICY_INVALID", `cannot read policy file ${file}: ${code}`, {
      cause,
      hint: "pass the path of a readable policy file (policies/default.yaml is the default)",
    });
  }
  return parsePolicy(text, file);
}

interface Problem {
  path: (string | number)[];
  message: string;
  line?: number;
}

export function parsePolicy(text: string, file: string): Policy {
  const lineCounter = new LineCounter();
  const doc = parseDocument(text, { lineCounter, prettyErrors: false, uniqueKeys: true });
  const problems: Problem[] = [];

  if (doc.errors.length > 0) {
    for (const e of doc.errors) {
      problems.push({ path: [], message: `YAML: ${e.message.split("\n")[0]}`, line: lineCounter.linePos(e.pos[0]).line });
    }
    throw invalid(file, problems, undefined);
  }
  let raw: unknown;
  try {
    raw = doc.toJS({ maxAliasCount: 1000 });
  } catch (e) {
    throw invalid(file, [{ path: [], message: `YAML: ${(e as Error).message}` }], undefined);
  }

  const lineOf = (path: (string | number)[]): number | undefined => {
    for (let p = path; ; p = p.slice(0, -1)) {
      const node = p.length === 0 ? doc.contents : doc.getIn(p, true);
      if (isNode(node) && node.range) return lineCounter.linePos(node.range[0]).line;
      if (p.length === 0) return undefined;
    }
  };

  const parsed = policyFileSchema.safeParse(raw);
  if (!parsed.success) problems.push(...zodProblems(parsed.error));

  // Rules are also checked one by one, so the examples of every valid rule are
  // tested even when another part of the file is broken (a missing rule can
  // only make verdicts less strict, so this reports no false problems).
  const rawRules = (raw as { shell?: { rules?: unknown } } | null)?.shell?.rules;
  const rawUnknown = (raw as { shell?: { unknown?: unknown } } | null)?.shell?.unknown;
  const valid: Array<{ index: number; spec: ShellRuleSpec }> = [];
  if (Array.isArray(rawRules)) {
    rawRules.forEach((r, index) => {
      const one = shellRuleSchema.safeParse(r);
      if (one.success) valid.push({ index, spec: one.data });
    });
  }
  problems.push(...checkRules(file, valid, rawUnknown === "forbid" ? "forbid" : "ask"));
  if (Array.isArray(rawRules)) problems.push(...duplicateIds(rawRules));

  // Likewise the workspace section's examples, when the section itself is valid.
  const rawWorkspace = (raw as { workspace?: unknown } | null)?.workspace;
  const workspace = workspaceSchema.safeParse(rawWorkspace);
  if (workspace.success) problems.push(...checkWorkspace(workspace.data));

  if (parsed.success) problems.push(...checkLimits(parsed.data));

  if (problems.length > 0) {
    for (const p of problems) p.line ??= lineOf(p.path);
    problems.sort((x, y) => (x.line ?? 0) - (y.line ?? 0));
    throw invalid(file, problems, rawRules);
  }
  return deepFreeze(build(file, parsed.data!));
}

function zodProblems(error: z.ZodError): Problem[] {
  const out: Problem[] = [];
  for (const issue of error.issues) {
    const leaf = issue.code === "invalid_union" && issue.message === "Invalid input" ? deepestLeaf(issue) : issue;
    if (leaf.code === "unrecognized_keys") {
      for (const key of leaf.keys) out.push({ path: [...leaf.path, key], message: "unknown key (typo? the schema is strict)" });
    } else if (leaf.code === "invalid_type" && (leaf.received === "number" || leaf.received === "boolean") && leaf.expected === "string") {
      out.push({ path: leaf.path, message: `${leaf.message} (YAML reads unquoted -9, 1.0, yes, no as numbers or booleans: quote it)` });
    } else {
      out.push({ path: leaf.path, message: leaf.message });
    }
  }
  return out;
}

/** zod's bare "Invalid input" for a union names no reason; report the branch that got furthest. */
function deepestLeaf(issue: z.ZodIssue): z.ZodIssue {
  if (issue.code !== "invalid_union" || issue.message !== "Invalid input") return issue;
  let best: z.ZodIssue = issue;
  for (const e of issue.unionErrors) {
    for (const i of e.issues) {
      const leaf = deepestLeaf(i);
      if (best === issue || leaf.path.length > best.path.length) best = leaf;
    }
  }
  return best;
}

function checkRules(file: string, rules: Array<{ index: number; spec: ShellRuleSpec }>, unknown: "ask" | "forbid"): Problem[] {
  const problems: Problem[] = [];
  const layer = compileLayer(file, rules.map((r) => r.spec), unknown);
  rules.forEach(({ index, spec }, k) => {
    const base = ["shell", "rules", index];
    const rule = layer.rules[k]!;
    spec.match?.forEach((argv, j) => {
      const path = [...base, "match", j];
      // an example may be a wrapped form (`env rm -rf /`): the rule matches what it runs
      if (!wrappedArgvs(argv).some((a) => ruleMatches(rule, a))) {
        problems.push({ path, message: `rule ${spec.id} does not match its example \`${show(argv)}\`` });
        return;
      }
      const v = evaluateInLayer(layer, argv);
      if (v.decision !== spec.decision) {
        problems.push({
          path,
          message: `example \`${show(argv)}\` of rule ${spec.id} (${spec.decision}) comes out ${v.decision} (rule ${v.ruleId} is stricter); fix the example or the rules`,
        });
      }
    });
    spec.not_match?.forEach((argv, j) => {
      if (ruleMatches(rule, argv)) {
        problems.push({ path: [...base, "not_match", j], message: `rule ${spec.id} matches \`${show(argv)}\`, listed as not matching` });
      }
    });
  });
  return problems;
}

function duplicateIds(rawRules: unknown[]): Problem[] {
  const problems: Problem[] = [];
  const seen = new Map<string, number>();
  rawRules.forEach((r, index) => {
    const id = (r as { id?: unknown } | null)?.id;
    if (typeof id !== "string") return;
    const earlier = seen.get(id);
    if (earlier !== undefined) problems.push({ path: ["shell", "rules", index, "id"], message: `duplicate rule id ${id} (also shell.rules[${earlier}])` });
    else seen.set(id, index);
  });
  return problems;
}

function checkLimits(data: PolicyFile): Problem[] {
  const problems: Problem[] = [];
  const resolved = resolveLimits(data);
  for (const mode of PHASE_MODES) {
    const l = resolved[mode];
    if (l.memoryEscalateBytes > l.memoryBytes) {
      const where = data.limits.modes?.[mode]?.memoryEscalateBytes !== undefined ? ["limits", "modes", mode, "memoryEscalateBytes"] : ["limits", "default", "memoryEscalateBytes"];
      problems.push({ path: where, message: `memoryEscalateBytes (${l.memoryEscalateBytes}) must not exceed memoryBytes (${l.memoryBytes}) in ${mode} mode: the hard limit would OOM-kill before the watch escalates` });
    }
    if (l.defaultTimeoutMs > l.maxTimeoutMs) {
      const where = data.limits.modes?.[mode]?.defaultTimeoutMs !== undefined ? ["limits", "modes", mode, "defaultTimeoutMs"] : ["limits", "default", "defaultTimeoutMs"];
      problems.push({ path: where, message: `defaultTimeoutMs (${l.defaultTimeoutMs}) exceeds maxTimeoutMs (${l.maxTimeoutMs}) in ${mode} mode` });
    }
  }
  return problems;
}

function formatPath(path: (string | number)[], rawRules: unknown): string {
  let out = "";
  path.forEach((p, i) => {
    if (typeof p === "number") {
      out += `[${p}]`;
      // name the rule too: "shell.rules[3] (shell.forbidden.dd)"
      if (i === 2 && path[0] === "shell" && path[1] === "rules" && Array.isArray(rawRules)) {
        const id = (rawRules[p] as { id?: unknown } | undefined)?.id;
        if (typeof id === "string") out += ` (${id})`;
      }
    } else out += out === "" ? p : `.${p}`;
  });
  return out === "" ? "(document)" : out;
}

function invalid(file: string, problems: Problem[], rawRules: unknown): SandboxdError {
  const lines = problems.map((p) => `${file}${p.line !== undefined ? `:${p.line}` : ""}: ${formatPath(p.path, rawRules)}: ${p.message}`);
  return new SandboxdError(
    "SBX_ERR_POLICY_INVALID",
    `policy ${file} is invalid (${problems.length} problem${problems.length === 1 ? "" : "s"}):\n${lines.map((l) => `  ${l}`).join("\n")}`,
    { details: { file, problems: lines } },
  );
}

/* -------------------------------- building ------------------------------ */

function resolveLimits(data: PolicyFile): Record<PhaseMode, PhaseLimits> {
  const out = {} as Record<PhaseMode, PhaseLimits>;
  for (const mode of PHASE_MODES) out[mode] = { ...MEMORY_WATCH_DEFAULTS, ...data.limits.default, ...data.limits.modes?.[mode] };
  return out;
}

function resolveFailFast(f: PolicyFile["failFast"]): FailFastPolicy {
  return {
    clause: f.clause,
    maxAttempts: {
      ...f.maxAttempts,
      iteration: f.maxAttempts.iteration ?? FAIL_FAST_DEFAULTS.iteration,
      policy: f.maxAttempts.policy ?? FAIL_FAST_DEFAULTS.policy,
    },
    consecutive: f.consecutive ?? FAIL_FAST_DEFAULTS.consecutive,
    countPolicyRefusals: f.countPolicyRefusals ?? FAIL_FAST_DEFAULTS.countPolicyRefusals,
    noTestsIsFailure: f.noTestsIsFailure ?? FAIL_FAST_DEFAULTS.noTestsIsFailure,
  };
}

function build(file: string, data: PolicyFile): Policy {
  return {
    version: 1,
    sources: [file],
    shell: { layers: [compileLayer(file, data.shell.rules, data.shell.unknown)] },
    limits: resolveLimits(data),
    failFast: resolveFailFast(data.failFast),
    workspace: buildWorkspace(data.workspace),
    database: data.database,
    network: data.network ?? DEFAULT_NETWORK,
    audit: data.audit ?? DEFAULT_AUDIT,
  };
}

/**
 * The policy a phase runs under when it brings its own (stricter) policy:
 * commands are judged under both (strictest verdict wins), every limit and
 * attempt count is the smaller, lists of protected paths, denied functions
 * and markers are the union, a pair of files is coupled only if both
 * policies couple it, and a database write exception survives only if
 * both policies name the same one. Nothing in `stricter` can widen `base`.
 */
export function combine(base: Policy, stricter: Policy): Policy {
  const limits = {} as Record<PhaseMode, PhaseLimits>;
  for (const mode of PHASE_MODES) {
    const a = base.limits[mode];
    const b = stricter.limits[mode];
    const l = { ...a };
    for (const k of Object.keys(l) as Array<keyof PhaseLimits>) l[k] = Math.min(a[k], b[k]);
    limits[mode] = l;
  }
  const maxAttempts = { ...base.failFast.maxAttempts };
  for (const c of [...ERROR_CATEGORIES, "iteration", "policy"] as const) {
    maxAttempts[c] = Math.min(base.failFast.maxAttempts[c], stricter.failFast.maxAttempts[c]);
  }
  const failFast: FailFastPolicy = {
    clause: base.failFast.clause,
    maxAttempts,
    consecutive: Math.min(base.failFast.consecutive, stricter.failFast.consecutive),
    // counting more is stricter
    countPolicyRefusals: base.failFast.countPolicyRefusals || stricter.failFast.countPolicyRefusals,
    noTestsIsFailure: base.failFast.noTestsIsFailure || stricter.failFast.noTestsIsFailure,
  };

  const a = base.database;
  const b = stricter.database;
  const database: DatabasePolicy = {
    readOnlyDefault: {
      ...a.readOnlyDefault,
      testDatabaseEnv: a.readOnlyDefault.testDatabaseEnv === b.readOnlyDefault.testDatabaseEnv ? a.readOnlyDefault.testDatabaseEnv : null,
      paperTablePrefix: a.readOnlyDefault.paperTablePrefix === b.readOnlyDefault.paperTablePrefix ? a.readOnlyDefault.paperTablePrefix : null,
    },
    statementTimeoutMs: minValue(a.statementTimeoutMs, b.statementTimeoutMs),
    deniedFunctions: {
      ...stricterOf(a.deniedFunctions, b.deniedFunctions),
      functions: union(a.deniedFunctions.functions, b.deniedFunctions.functions),
      // a built-in denial stays lifted only where both policies lift it
      allow: (a.deniedFunctions.allow ?? []).filter((f) => (b.deniedFunctions.allow ?? []).includes(f)),
    },
    alphaMarkers: {
      ...stricterOf(a.alphaMarkers, b.alphaMarkers),
      functions: union(a.alphaMarkers.functions, b.alphaMarkers.functions),
      joins: [...a.alphaMarkers.joins, ...b.alphaMarkers.joins],
    },
    schemaChanges: {
      ...stricterOf(a.schemaChanges, b.schemaChanges),
      statements: union(a.schemaChanges.statements, b.schemaChanges.statements),
    },
  };
  const packageIndex = narrowPackageIndex(base.network.packageIndex, stricter.network.packageIndex);
  const network: NetworkPolicy = {
    clause: base.network.clause,
    services: base.network.services.filter((s) => stricter.network.services.some((t) => t.name === s.name && t.port === s.port)),
    ...(packageIndex ? { packageIndex } : {}),
  };
  return deepFreeze({
    version: 1,
    sources: [...base.sources, ...stricter.sources],
    shell: { layers: [...base.shell.layers, ...stricter.shell.layers] },
    limits,
    failFast,
    workspace: combineWorkspace(base.workspace, stricter.workspace),
    database,
    network,
    audit: {
      textCapBytes: Math.min(base.audit.textCapBytes, stricter.audit.textCapBytes),
      phaseBudget: {
        bytes: Math.min(base.audit.phaseBudget.bytes, stricter.audit.phaseBudget.bytes),
        recordsPerSecond: Math.min(base.audit.phaseBudget.recordsPerSecond, stricter.audit.phaseBudget.recordsPerSecond),
        burstRecords: Math.min(base.audit.phaseBudget.burstRecords, stricter.audit.phaseBudget.burstRecords),
      },
      buildLog: {
        rotateBytes: Math.min(base.audit.buildLog.rotateBytes, stricter.audit.buildLog.rotateBytes),
        keep: Math.min(base.audit.buildLog.keep, stricter.audit.buildLog.keep),
      },
    },
  });
}

/**
 * The package-index hosts both layers list alike: same name, same port, same
 * pin (a phase policy cannot re-point a name at another address). The proxy
 * port must agree, as for services. The index URL is the stricter layer's when
 * its host survives, else the base's.
 */
function narrowPackageIndex(a: PackageIndexPolicy | undefined, b: PackageIndexPolicy | undefined): PackageIndexPolicy | null {
  if (!a || !b || a.port !== b.port) return null;
  const samePin = (x: PackageIndexHost["pin"], y: PackageIndexHost["pin"]) => (!x && !y) || (!!x && !!y && x.address === y.address && x.port === y.port);
  const hosts = a.hosts.filter((h) => b.hosts.some((k) => k.name === h.name && k.port === h.port && samePin(h.pin, k.pin)));
  if (hosts.length === 0) return null;
  const survives = (u: string) => {
    const url = new URL(u);
    return hosts.some((h) => h.name === url.hostname && h.port === Number(url.port || 443));
  };
  return { ...a, hosts, indexUrl: survives(b.indexUrl) ? b.indexUrl : a.indexUrl };
}

function minValue<T extends { value: number }>(a: T, b: T): T {
  return b.value < a.value ? b : a;
}

function stricterOf<T extends { decision: Decision }>(a: T, b: T): T {
  return DECISION_RANK[b.decision] > DECISION_RANK[a.decision] ? b : a;
}

function union(a: readonly string[], b: readonly string[]): string[] {
  return [...new Set([...a, ...b])];
}

function deepFreeze<T>(value: T): T {
  if (value !== null && typeof value === "object" && !Object.isFrozen(value)) {
    Object.freeze(value);
    for (const v of Object.values(value)) deepFreeze(v);
  }
  return value;
}
