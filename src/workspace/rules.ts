/**
 * The judgment of one iteration's change set against SKILLS.md §1, as the
 * policy's workspace section encodes it. Pure: the change set and the
 * policy in, a decision and the failures that led to it out. The caller (the
 * checkpoint) applies, holds or discards the iteration.
 *
 * Rules, each failure naming its rule id, its SKILLS.md clause and what to do:
 * - workspace.path: a path the layer should never have produced (absolute,
 *   "..", NUL) — refused outright;
 * - protected paths: hidden and read-only paths are refused outright;
 *   per-operation decisions (shared/) may be lifted by a human's approval of
 *   the exact path; `unlessPermission: main.py` rules do not apply in a
 *   phase started with `--allow main.py`;
 * - the file size cap (ask; lifted by approving the path);
 * - mass change: deleting or renaming a whole directory, or more changed
 *   files under one directory than the policy allows;
 * - the atomic modification count (below);
 * - Python that does not compile (see compileCheckArgv), merged in by
 *   withCompileResults.
 *
 * The decision is the strictest failure's: reject > ask > accept. With
 * `failedIteration: ask` a failing iteration waits for a human instead of
 * being discarded, except for failures marked `final` (hidden or read-only
 * paths, bad paths, Python that does not compile), which no one can accept.
 *
 * The counting rule. The files of an iteration are its changes that are not
 * directories; a rename is one file (its new path), a mode change is one
 * file. Two changed files are *coupled* when a coupling pattern couples
 * their paths (under every layer of a combined policy). The iteration
 * passes when its files number at most maxFilesPerIteration, or when some
 * maxFilesPerIteration of them (the anchors) can be chosen such that every
 * other file is coupled to an anchor. So with 2: a module, its test and a
 * second module pass (anchors: the two modules); three modules, each with
 * its test, do not, even though every file is coupled to another (a chain
 * of couplings is not a direct coupling). The anchors are found by an exact
 * bounded search (the schema caps the count at 2); past
 * COUPLING_ANALYSIS_MAX_FILES files no coupling is considered at all and
 * the failure says so (such an iteration is a mass change anyway).
 */
import { escapeControl } from "../audit/format.js";
import { SandboxdError } from "../errors.js";
import {
  WORKSPACE_DECISION_RANK,
  compileWorkspace,
  couples,
  protects,
  type CompiledCoupling,
  type WorkspaceDecision,
  type WorkspaceOperation,
  type WorkspacePolicy,
} from "../policy/index.js";
import { MAX_CHANGES, MAX_CHANGE_PATH_BYTES, type ChangeSet, type FileChange } from "./changes.js";

export const PATH_RULE_ID = "workspace.path";
const PATH_CLAUSE = "SKILLS.md §1 Forbidden Operations: creating files outside the project directory structure";

/** Past this many changed files, coupling is not analysed (every file counts). */
export const COUPLING_ANALYSIS_MAX_FILES = 200;

/** Path-level failures kept per rule; the rest are summarised in one more failure. */
export const MAX_FAILURES_PER_RULE = 20;

export interface RuleFailure {
  /** the policy rule id, e.g. workspace.protected.shared */
  rule: string;
  /** the SKILLS.md clause it enforces */
  clause: string;
  path?: string;
  /** what is wrong and what to do next */
  message: string;
  /** what this failure makes of the iteration (after failedIteration) */
  decision: "ask" | "reject";
  /** no human can accept it: hidden or read-only paths, bad paths, Python that does not compile */
  final: boolean;
}

/** The name the layer's iteration code uses for a failure. */
export type JudgeFailure = RuleFailure;
export type { WorkspacePolicy };

export interface Judgement {
  decision: WorkspaceDecision;
  failures: RuleFailure[];
}

export interface JudgeContext {
  policy: WorkspacePolicy;
  /** the phase was started with `--allow main.py` (its specification allows changing the core event loop) */
  allowMainPy: boolean;
  /** project paths a human approved for this iteration (size cap, shared/ operations) */
  approvedPaths: ReadonlySet<string>;
}

/** A change-set path as the layer must produce it: project-relative, POSIX, no "."/".." or empty segment, no NUL. */
export function isProjectPath(p: string): boolean {
  return p.length > 0 && !p.includes("\0") && p.split("/").every((s) => s !== "" && s !== "." && s !== "..");
}

const show = (p: string) => escapeControl(p);

export function judgeChangeSet(set: ChangeSet, ctx: JudgeContext): Judgement {
  const ws = ctx.policy;
  const failures = new FailureList(ws);
  const changes = set.changes;

  for (const c of changes) {
    for (const p of c.kind === "rename" ? [c.from ?? "", c.path] : [c.path]) {
      if (!isProjectPath(p)) {
        failures.add({
          rule: PATH_RULE_ID,
          clause: PATH_CLAUSE,
          path: p,
          message: `${JSON.stringify(p)} is not a path inside the project; nothing of this iteration is applied (report this: the change layer should never list it)`,
          decision: "reject",
          final: true,
        });
      }
    }
  }
  checkLimits(set, failures);
  checkSetId(changes, failures);
  checkProtected(changes, ctx, failures);
  checkSize(changes, ctx, failures);
  checkMassChange(changes, ws, failures);
  checkCount(changes, ws, failures);
  return failures.judgement();
}

/* ------------------------- the walk's limits, modes ------------------------- */

export const CHANGE_LIMIT_RULE_ID = "workspace.change-limit";
export const SETID_RULE_ID = "workspace.setuid";

/** What the layer's walk did not read (see ChangeSetLimits): no one can accept an iteration not wholly read. */
function checkLimits(set: ChangeSet, failures: FailureList): void {
  const l = set.limits;
  if (!l) return;
  for (const p of l.tooLong) {
    failures.add({
      rule: PATH_RULE_ID,
      clause: PATH_CLAUSE,
      path: p,
      message: `${show(p)}… is longer than ${MAX_CHANGE_PATH_BYTES} bytes from the project root; the daemon neither reads, judges nor applies such a path, so the iteration is refused: use shorter names and fewer levels`,
      decision: "reject",
      final: true,
    });
  }
  for (const p of l.notUtf8) {
    failures.add({
      rule: PATH_RULE_ID,
      clause: PATH_CLAUSE,
      path: p,
      message: `${show(p)} (U+FFFD stands for bytes that are not UTF-8) has a name that is not UTF-8; the daemon cannot name it to read, judge or apply it, so the iteration is refused: rename it`,
      decision: "reject",
      final: true,
    });
  }
  if (l.truncated) {
    failures.add({
      rule: CHANGE_LIMIT_RULE_ID,
      clause: "SKILLS.md §1 Atomic Modification Rule; Forbidden Operations: mass refactoring of entire directories",
      message: `more than ${MAX_CHANGES} changes in one iteration; the layer was read up to there and the iteration is refused whole: an iteration is a few files — remove what is not part of this change and checkpoint again`,
      decision: "reject",
      final: true,
    });
  }
}

/**
 * Set-user-ID or set-group-ID files: the daemon writes the project as root,
 * so the bit would land on the host (an executable running as the project's
 * owner for whoever starts it). Nothing a code change needs.
 */
function checkSetId(changes: readonly FileChange[], failures: FailureList): void {
  for (const c of changes) {
    if (c.isDir || c.kind === "delete" || c.mode === undefined || (c.mode & 0o6000) === 0) continue;
    failures.add({
      rule: SETID_RULE_ID,
      clause: PATH_CLAUSE,
      path: c.path,
      message: `${show(c.path)} has the ${c.mode & 0o4000 ? "set-user-ID" : "set-group-ID"} bit (mode ${(c.mode & 0o7777).toString(8)}); such a file is never applied to the project: chmod ug-s it`,
      decision: "reject",
      final: true,
    });
  }
}

/* ----------------------------- protected paths ----------------------------- */

function operationsOf(c: FileChange): Array<[string, WorkspaceOperation]> {
  if (c.kind === "rename") return [...(c.from !== undefined ? [[c.from, "rename"] as [string, WorkspaceOperation]] : []), [c.path, "rename"]];
  return [[c.path, c.kind]];
}

const OP_WORD: Record<WorkspaceOperation, string> = { create: "creating", modify: "changing", delete: "deleting", rename: "renaming" };

function checkProtected(changes: readonly FileChange[], ctx: JudgeContext, failures: FailureList): void {
  const { protections } = compileWorkspace(ctx.policy);
  for (const c of changes) {
    for (const [p, op] of operationsOf(c)) {
      for (const rule of protections) {
        const spec = rule.spec;
        if (!protects(rule, p)) continue;
        if (spec.unlessPermission === "main.py" && ctx.allowMainPy) continue;
        const what = `${OP_WORD[op]} ${show(p)}${c.kind === "rename" ? ` (rename ${show(c.from ?? "?")} → ${show(c.path)})` : ""}`;
        if (spec.treatment === "hidden" || spec.treatment === "readOnly") {
          const state = spec.treatment === "hidden" ? "is hidden from the sandbox" : "is read-only in the sandbox";
          const unless = spec.unlessPermission ? ` (a phase started with --allow ${spec.unlessPermission} may change it)` : "";
          failures.add({
            rule: spec.id,
            clause: spec.clause,
            path: p,
            message: `${what} refused: ${show(p)} ${state}${unless}; ${spec.justification}`,
            decision: "reject",
            final: true,
          });
          continue;
        }
        const d = spec.treatment[op];
        if (d === "accept") continue;
        if (spec.approvable && ctx.approvedPaths.has(p)) continue;
        const next = d === "ask" ? "it waits for a human's approval" : "refused";
        const approve = d === "ask" ? "; the iteration waits in the approval queue (`sandboxd approvals ls`), where a person approves or denies it" : "";
        failures.add({ rule: spec.id, clause: spec.clause, path: p, message: `${what}: ${next}; ${spec.justification}${approve}`, decision: d, final: false });
      }
    }
  }
}

/* --------------------------------- size --------------------------------- */

function checkSize(changes: readonly FileChange[], ctx: JudgeContext, failures: FailureList): void {
  const rule = ctx.policy.maxFileBytes;
  for (const c of changes) {
    if (c.isDir || c.kind === "delete" || c.sizeBytes <= rule.value) continue;
    if (rule.approvable && ctx.approvedPaths.has(c.path)) continue;
    const approve = rule.decision === "ask" ? "; the iteration waits in the approval queue (`sandboxd approvals ls`), where a person approves or denies it" : "";
    failures.add({
      rule: rule.id,
      clause: rule.clause,
      path: c.path,
      message: `${show(c.path)} is ${c.sizeBytes} bytes, over the ${rule.value}-byte limit: ${rule.justification}${approve}`,
      decision: rule.decision,
      final: false,
    });
  }
}

/* ------------------------------ mass change ------------------------------ */

function checkMassChange(changes: readonly FileChange[], ws: WorkspacePolicy, failures: FailureList): void {
  const rule = ws.massChange;
  for (const c of changes) {
    if (!c.isDir || (c.kind !== "delete" && c.kind !== "rename")) continue;
    const what = c.kind === "delete" ? `deleting the directory ${show(c.path)}` : `renaming the directory ${show(c.from ?? "?")} → ${show(c.path)}`;
    failures.add({
      rule: rule.id,
      clause: rule.clause,
      path: c.path,
      message: `${what} is a change to a whole directory: ${rule.justification}`,
      decision: c.kind === "delete" ? rule.directoryDelete : rule.directoryRename,
      final: false,
    });
  }
  const perDir = new Map<string, number>();
  for (const c of changes) {
    if (c.isDir) continue;
    const segs = c.path.split("/");
    for (let i = 1; i < segs.length; i++) {
      const dir = segs.slice(0, i).join("/");
      perDir.set(dir, (perDir.get(dir) ?? 0) + 1);
    }
  }
  const over = (d: string) => (perDir.get(d) ?? 0) > rule.maxFilesPerDirectory;
  const parent = (d: string) => (d.includes("/") ? d.slice(0, d.lastIndexOf("/")) : null);
  // only the topmost directory of each over-full subtree is named
  for (const [dir, n] of perDir) {
    const up = parent(dir);
    if (!over(dir) || (up !== null && over(up))) continue;
    failures.add({
      rule: rule.id,
      clause: rule.clause,
      path: dir,
      message: `${n} files changed under ${show(dir)}/, more than ${rule.maxFilesPerDirectory}: ${rule.justification}`,
      decision: rule.decision,
      final: false,
    });
  }
}

/* -------------------------- atomic modification -------------------------- */

export interface CountResult {
  /** the iteration's files (not directories; a rename once, by its new path) */
  files: string[];
  /** anchors with the files coupled to them, when the count passes thanks to coupling; null when it fails */
  groups: Array<{ anchor: string; coupled: string[] }> | null;
  /** files coupled to no other changed file */
  uncoupled: string[];
  /** coupling was not analysed (too many files) */
  skipped: boolean;
}

/** The counting rule (see the header): exposed for `sandboxd files` and tests. */
export function countFiles(set: ChangeSet, ws: WorkspacePolicy): CountResult {
  const files = [...new Set(set.changes.filter((c) => !c.isDir).map((c) => c.path))];
  const max = ws.atomicModification.maxFilesPerIteration;
  if (files.length <= max) return { files, groups: files.map((f) => ({ anchor: f, coupled: [] })), uncoupled: [], skipped: false };
  if (files.length > COUPLING_ANALYSIS_MAX_FILES) return { files, groups: null, uncoupled: files, skipped: true };

  const adj = couplingGraph(files, compileWorkspace(ws).couplingLayers);
  const uncoupled = files.filter((_, i) => adj[i]!.size === 0);
  const anchors = uncoupled.length > max ? null : dominatingSet(adj, max);
  if (!anchors) return { files, groups: null, uncoupled, skipped: false };
  const taken = new Set(anchors);
  const groups = anchors.map((a) => ({ anchor: files[a]!, coupled: [] as string[] }));
  files.forEach((f, i) => {
    if (taken.has(i)) return;
    const k = anchors.findIndex((a) => adj[a]!.has(i));
    groups[k]!.coupled.push(f);
  });
  return { files, groups, uncoupled, skipped: false };
}

/**
 * Adjacency sets over file indexes: i–j when coupled under every layer. Only
 * files matching a side of a pattern are paired, so the cost is in the
 * number of candidate pairs, not n².
 */
function couplingGraph(files: readonly string[], layers: ReadonlyArray<readonly CompiledCoupling[]>): Array<Set<number>> {
  const layerEdges = layers.map((patterns) => {
    const edges = new Set<string>();
    for (const c of patterns) {
      const left: number[] = [];
      const right: number[] = [];
      files.forEach((f, i) => {
        if (c.sides[0].test(f)) left.push(i);
        if (c.sides[1].test(f)) right.push(i);
      });
      for (const i of left) {
        for (const j of right) {
          if (i === j) continue;
          const key = i < j ? `${i},${j}` : `${j},${i}`;
          if (!edges.has(key) && couples(c, files[i]!, files[j]!)) edges.add(key);
        }
      }
    }
    return edges;
  });
  const adj = files.map(() => new Set<number>());
  if (layerEdges.length === 0) return adj;
  const [first, ...rest] = layerEdges;
  for (const key of first!) {
    if (!rest.every((e) => e.has(key))) continue;
    const [i, j] = key.split(",").map(Number) as [number, number];
    adj[i]!.add(j);
    adj[j]!.add(i);
  }
  return adj;
}

/**
 * At most k anchors such that every file is an anchor or coupled to one, or
 * null. Exact: a file not yet covered must be covered by itself or one of
 * its neighbours, so branch on those for the file with the fewest; depth ≤ k.
 */
function dominatingSet(adj: ReadonlyArray<ReadonlySet<number>>, max: number): number[] | null {
  const closed = adj.map((s, i) => new Set([i, ...s]));
  // candidates covering many files first, so the groups reported are the natural ones
  const byReach = closed.map((c) => [...c].sort((x, y) => closed[y]!.size - closed[x]!.size || x - y));
  const search = (open: ReadonlySet<number>, chosen: number[], k: number): number[] | null => {
    if (open.size === 0) return chosen;
    if (chosen.length === k) return null;
    let pick = -1;
    for (const x of open) if (pick < 0 || closed[x]!.size < closed[pick]!.size) pick = x;
    for (const a of byReach[pick]!) {
      const rest = new Set([...open].filter((x) => !closed[a]!.has(x)));
      const found = search(rest, [...chosen, a], k);
      if (found) return found;
    }
    return null;
  };
  // the fewest anchors that do
  for (let k = 1; k <= max; k++) {
    const found = search(new Set(adj.keys()), [], k);
    if (found) return found.sort((x, y) => x - y);
  }
  return null;
}

function checkCount(changes: readonly FileChange[], ws: WorkspacePolicy, failures: FailureList): void {
  const rule = ws.atomicModification;
  const r = countFiles({ changes: [...changes] }, ws);
  if (r.groups) return;
  const list = (xs: string[]) => (xs.length > 10 ? `${xs.slice(0, 10).map(show).join(", ")} and ${xs.length - 10} more` : xs.map(show).join(", "));
  const why = r.skipped
    ? `coupling is not considered past ${COUPLING_ANALYSIS_MAX_FILES} files`
    : r.uncoupled.length > 0
      ? `not coupled to any other changed file: ${list(r.uncoupled)}`
      : `the couplings do not reduce them to ${rule.maxFilesPerIteration} changes`;
  failures.add({
    rule: rule.id,
    clause: rule.clause,
    message: `${r.files.length} files changed, at most ${rule.maxFilesPerIteration} per iteration unless directly coupled (${why}): ${rule.justification}; split the work into iterations and checkpoint after each`,
    decision: rule.decision,
    final: false,
  });
}

/* ---------------------------- decision, bounds ---------------------------- */

/** Failures with the failed-iteration decision applied, bounded per rule. */
class FailureList {
  private readonly list: RuleFailure[] = [];
  private readonly perRule = new Map<string, { kept: number; dropped: number; sample: RuleFailure }>();

  constructor(private readonly ws: WorkspacePolicy) {}

  add(f: RuleFailure): void {
    const decision = !f.final && f.decision === "reject" && this.ws.failedIteration.decision === "ask" ? "ask" : f.decision;
    const failure = { ...f, decision };
    const seen = this.perRule.get(f.rule);
    if (!seen) {
      this.perRule.set(f.rule, { kept: 1, dropped: 0, sample: { ...failure } });
      this.list.push(failure);
    } else if (seen.kept < MAX_FAILURES_PER_RULE) {
      seen.kept++;
      this.list.push(failure);
    } else {
      seen.dropped++;
      // the summary carries the strictest decision of what it stands for
      if (WORKSPACE_DECISION_RANK[decision] > WORKSPACE_DECISION_RANK[seen.sample.decision]) seen.sample = { ...seen.sample, decision };
      seen.sample.final ||= failure.final;
    }
  }

  judgement(): Judgement {
    const out = [...this.list];
    for (const [rule, s] of this.perRule) {
      if (s.dropped === 0) continue;
      out.push({
        rule,
        clause: s.sample.clause,
        message: `and ${s.dropped} more path${s.dropped === 1 ? "" : "s"} under rule ${rule}; \`sandboxd files\` lists them all`,
        decision: s.sample.decision,
        final: s.sample.final,
      });
    }
    return { decision: decide(out), failures: out };
  }
}

function decide(failures: readonly RuleFailure[]): WorkspaceDecision {
  let d: WorkspaceDecision = "accept";
  for (const f of failures) if (WORKSPACE_DECISION_RANK[f.decision] > WORKSPACE_DECISION_RANK[d]) d = f.decision;
  return d;
}

/* ------------------------------ Python compile ------------------------------ */

/**
 * Compiles each file named on the command line with the builtin compile()
 * (no .pyc is written: nothing lands in the change layer), one JSON line out.
 * The source is read as bytes, so a PEP 263 coding line is honoured, and a
 * NUL byte, a bad encoding or an unreadable file is a result, not a crash.
 */
const COMPILE_SCRIPT = String.raw`
import json, sys
out = []
for p in sys.argv[1:]:
    r = {"path": p}
    try:
        with open(p, "rb") as f:
            src = f.read()
        compile(src, p, "exec", dont_inherit=True)
        r["ok"] = True
    except SyntaxError as e:
        r.update(ok=False, error=type(e).__name__, message=str(e.msg), line=e.lineno, offset=e.offset, text=(e.text or "").rstrip("\n"))
    except (ValueError, UnicodeDecodeError, OSError) as e:
        r.update(ok=False, error=type(e).__name__, message=str(e))
    out.append(r)
sys.stdout.write(json.dumps({"sandboxdCompile": 1, "results": out}) + "\n")
`;

/** The changed Python files to compile: created, modified or renamed (not deleted, not a mode change), matching pythonCompile. */
export function pythonFilesToCompile(set: ChangeSet, ws: WorkspacePolicy): string[] {
  const globs = compileWorkspace(ws).pythonCompile;
  return set.changes
    .filter((c) => !c.isDir && c.kind !== "delete" && !c.modeOnly && isProjectPath(c.path) && globs.some((g) => g.test(c.path)))
    .map((c) => c.path);
}

/**
 * argv for the compile check, run inside the sandbox with the project root
 * as working directory: `python3 -I -B -c <script> path…`. -I ignores the
 * environment and the user's site (PYTHONPATH, a planted sitecustomize),
 * -B writes no bytecode. Paths are passed as arguments, never as code.
 */
export function compileCheckArgv(paths: readonly string[]): string[] {
  for (const p of paths) {
    if (!isProjectPath(p)) {
      throw new SandboxdError("SBX_ERR_INTERNAL", `compile check asked for ${JSON.stringify(p)}, which is not a project-relative path; nothing was run`);
    }
  }
  // "./" keeps a path starting with "-" from being read as an option by anything downstream
  // by its full path: the command environment's PATH holds the package disk, which the agent writes
  return ["/usr/bin/python3", "-I", "-B", "-c", COMPILE_SCRIPT, ...paths.map((p) => `./${p}`)];
}

const MAX_COMPILER_MESSAGE = 500;

/**
 * The compile check's output as failures of rule pythonCompile, one per file
 * that did not compile, carrying the compiler's message. A file with no
 * result (the check crashed, was killed, printed something else) fails too:
 * the rule is "compiles", not "was not seen failing".
 */
export function parseCompileOutput(stdout: string, paths: readonly string[], ws: WorkspacePolicy): RuleFailure[] {
  const rule = ws.pythonCompile;
  const results = new Map<string, { ok: boolean; error?: string; message?: string; line?: number | null; offset?: number | null; text?: string }>();
  const line = stdout.split("\n").find((l) => l.startsWith('{"sandboxdCompile"'));
  if (line) {
    try {
      const parsed = JSON.parse(line) as { results?: unknown };
      if (Array.isArray(parsed.results)) {
        for (const r of parsed.results as Array<Record<string, unknown>>) {
          if (typeof r.path !== "string" || typeof r.ok !== "boolean") continue;
          results.set(r.path.replace(/^\.\//, ""), {
            ok: r.ok,
            error: typeof r.error === "string" ? r.error : undefined,
            message: typeof r.message === "string" ? r.message : undefined,
            line: typeof r.line === "number" ? r.line : null,
            offset: typeof r.offset === "number" ? r.offset : null,
            text: typeof r.text === "string" ? r.text : undefined,
          });
        }
      }
    } catch {
      // no results: every file fails below
    }
  }
  const failures: RuleFailure[] = [];
  for (const p of paths) {
    const r = results.get(p);
    if (r?.ok) continue;
    const cut = (s: string) => (s.length > MAX_COMPILER_MESSAGE ? `${s.slice(0, MAX_COMPILER_MESSAGE)}…` : s);
    const where = r?.line ? `${show(p)}:${r.line}${r.offset ? `:${r.offset}` : ""}` : show(p);
    const message = r
      ? `${where}: ${r.error ?? "Error"}: ${escapeControl(cut(r.message ?? ""))}${r.text ? ` in \`${escapeControl(cut(r.text.trim()))}\`` : ""}; ${rule.justification}`
      : `${show(p)}: the compile check gave no result for this file (it crashed, timed out or was killed); the file is refused until it compiles: checkpoint again`;
    failures.push({ rule: rule.id, clause: rule.clause, path: p, message, decision: "reject", final: true });
  }
  return failures;
}

/** The judgment with the compile check's failures added (their decision is reject, final). */
export function withCompileResults(j: Judgement, compileFailures: readonly RuleFailure[]): Judgement {
  const failures = [...j.failures, ...compileFailures];
  return { decision: decide(failures), failures };
}
