/**
 * The workspace section's path language, compiled: globs for protected
 * paths, two-sided templates for coupling patterns (SKILLS.md §1 "directly
 * coupled"), the self-tests run at load (every `couples`, `notCouples`,
 * `notCoupled`, `covers` and `notCovers` example), and the narrowing of the
 * section when a phase policy is combined with the daemon's.
 *
 * Globs: `*` any characters within one segment (dot files included, unlike a
 * shell: a protection rule must not miss `.env`), `?` one such character,
 * `**` any number of whole segments. `dir/**` covers `dir` itself and
 * everything below it, so deleting or renaming the directory is covered too.
 *
 * Templates add placeholders: `{name}` (one or more characters within a
 * segment) and `{name**}` (zero or more whole leading directories; a segment
 * of its own, followed by more segments). A pair of paths is coupled by a
 * pattern when one path matches one side and the other path the other side
 * with every placeholder named on both sides taking the same value. The two
 * sides are compiled into ONE regular expression (`^A\0B$`, placeholders of
 * B as back-references to A's), so the regex engine tries every way of
 * binding the placeholders: the answer is exact, whatever the template.
 */
import {
  WORKSPACE_DECISION_RANK,
  type CouplingPattern,
  type ProtectedPathRule,
  type WorkspaceDecision,
  type WorkspaceFile,
  type WorkspacePolicy,
} from "./schema.js";

const PLACEHOLDER_NAME = /^[a-z][A-Za-z0-9_]*$/;

/** A problem in a glob or template, as text for the policy's problem list. */
export class PathPatternError extends Error {}

function escapeRegex(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

function checkSegments(pattern: string): string[] {
  if (pattern.startsWith("/")) throw new PathPatternError(`"${pattern}" must be project-relative (no leading "/")`);
  if (pattern.includes("\0")) throw new PathPatternError("a pattern cannot contain NUL");
  const segments = pattern.split("/");
  for (const seg of segments) {
    if (seg === "") throw new PathPatternError(`"${pattern}" has an empty segment ("//" or a trailing "/")`);
    if (seg === "." || seg === "..") throw new PathPatternError(`"${pattern}" has a "${seg}" segment; write the path from the project root`);
  }
  return segments;
}

/**
 * Regex source for a glob or template. `groups` collects placeholder names in
 * order of first use; a name already in `groups` becomes a back-reference.
 */
function patternSource(pattern: string, groups: Set<string> | null): string {
  const segments = checkSegments(pattern);
  const placeholder = (name: string, body: string): string => {
    if (!groups) throw new PathPatternError(`"${pattern}": placeholders ({${name}}) belong in coupling templates, not in globs`);
    if (!PLACEHOLDER_NAME.test(name)) throw new PathPatternError(`"${pattern}": placeholder name "${name}" must be a lower-case word such as {module}`);
    if (groups.has(name)) return `\\k<${name}>`;
    groups.add(name);
    return `(?<${name}>${body})`;
  };
  let out = "";
  segments.forEach((seg, i) => {
    const last = i === segments.length - 1;
    const deep = seg === "**" ? "" : /^\{([^{}]*)\*\*\}$/.exec(seg)?.[1];
    if (deep !== undefined) {
      if (i > 0 && (segments[i - 1] === "**" || /^\{[^{}]*\*\*\}$/.test(segments[i - 1]!))) {
        throw new PathPatternError(`"${pattern}": two ** segments in a row`);
      }
      if (last) {
        if (deep !== "") throw new PathPatternError(`"${pattern}": {${deep}**} must be followed by more of the path (it stands for leading directories)`);
        // "dir/**": the directory itself and everything below it; "**": everything
        out = i === 0 ? ".+" : `${out.slice(0, -1)}(?:/.+)?`;
        return;
      }
      const body = "(?:[^/]+/)*";
      out += deep === "" ? body : placeholder(deep, body);
      return;
    }
    let s = "";
    for (let k = 0; k < seg.length; k++) {
      const ch = seg[k]!;
      if (ch === "*") {
        if (seg[k + 1] === "*") throw new PathPatternError(`"${pattern}": ** must be a whole segment (a/**/b)`);
        s += "[^/]*";
      } else if (ch === "?") s += "[^/]";
      else if (ch === "{") {
        const end = seg.indexOf("}", k);
        if (end < 0) throw new PathPatternError(`"${pattern}": "{" without "}"`);
        const name = seg.slice(k + 1, end);
        if (name.endsWith("**")) throw new PathPatternError(`"${pattern}": {${name}} must be a whole segment ({dir**}/x.py)`);
        s += placeholder(name, "[^/]+");
        k = end;
      } else if (ch === "}" || ch === "[" || ch === "]") {
        throw new PathPatternError(`"${pattern}": "${ch}" is reserved (character classes are not supported)`);
      } else s += escapeRegex(ch);
    }
    out += last ? s : `${s}/`;
  });
  return out;
}

/** dotAll: a path with a newline in it must not slip past `dir/**` (`.` would stop at the newline). */
const FLAGS = "su";

export function compileGlob(glob: string): RegExp {
  return new RegExp(`^${patternSource(glob, null)}$`, FLAGS);
}

/** The standalone regex of one template side (placeholders as plain groups), to find candidate paths cheaply. */
function compileSide(template: string): RegExp {
  return new RegExp(`^${patternSource(template, new Set())}$`, FLAGS);
}

export interface CompiledCoupling {
  readonly spec: CouplingPattern;
  readonly sides: readonly [RegExp, RegExp];
  /** `^A\0B$` with B's shared placeholders as back-references */
  readonly pair: RegExp;
}

export function compileCoupling(spec: CouplingPattern): CompiledCoupling {
  const groups = new Set<string>();
  const a = patternSource(spec.between[0], groups);
  const b = patternSource(spec.between[1], groups);
  return { spec, sides: [compileSide(spec.between[0]), compileSide(spec.between[1])], pair: new RegExp(`^${a}\\x00${b}$`, FLAGS) };
}

/** Whether the pattern couples the two paths, in either order. */
export function couples(c: CompiledCoupling, p: string, q: string): boolean {
  return p !== q && (c.pair.test(`${p}\0${q}`) || c.pair.test(`${q}\0${p}`));
}

export interface CompiledProtection {
  readonly spec: ProtectedPathRule;
  readonly paths: readonly RegExp[];
  readonly except: readonly RegExp[];
  /**
   * When every path and exception is `**` then `/NAME` (NAME one segment): one
   * regex each over a file's name alone, which decides as `protects` would
   * at any depth below the root. The phase-start walk for credential files
   * tests 100k names with it instead of 8 path patterns each.
   */
  readonly names: NameTest | null;
}

export interface NameTest {
  readonly paths: RegExp;
  readonly except: RegExp | null;
}

export function compileProtection(spec: ProtectedPathRule): CompiledProtection {
  return { spec, paths: spec.paths.map(compileGlob), except: (spec.except ?? []).map(compileGlob), names: nameOnly(spec) };
}

/** A glob `**` + `/NAME` → NAME, for a NAME of one segment without placeholders; else null. */
function nameOf(glob: string): string | null {
  const m = /^\*\*\/([^/{}]+)$/.exec(glob);
  return m && !m[1]!.includes("**") ? m[1]! : null;
}

function nameOnly(spec: ProtectedPathRule): NameTest | null {
  const paths = spec.paths.map(nameOf);
  const except = (spec.except ?? []).map(nameOf);
  if (paths.length === 0 || paths.some((n) => n === null) || except.some((n) => n === null)) return null;
  const any = (names: (string | null)[]) => new RegExp(names.map((n) => compileGlob(n!).source).join("|"), FLAGS);
  return { paths: any(paths), except: except.length > 0 ? any(except) : null };
}

/** What `protects` says of a file named `name` anywhere below the project's root, by a rule's `names`. */
export function protectsName(names: NameTest, name: string): boolean {
  return names.paths.test(name) && !(names.except?.test(name) ?? false);
}

export function protects(p: CompiledProtection, path: string): boolean {
  return p.paths.some((r) => r.test(path)) && !p.except.some((r) => r.test(path));
}

/** The compiled form of a workspace section, built once per (frozen) policy object. */
export interface CompiledWorkspace {
  readonly couplingLayers: ReadonlyArray<readonly CompiledCoupling[]>;
  readonly protections: readonly CompiledProtection[];
  readonly pythonCompile: readonly RegExp[];
}

const compiled = new WeakMap<object, CompiledWorkspace>();

export function compileWorkspace(ws: WorkspacePolicy): CompiledWorkspace {
  let c = compiled.get(ws);
  if (!c) {
    c = {
      couplingLayers: ws.coupling.layers.map((layer) => layer.map(compileCoupling)),
      protections: ws.protectedPaths.map(compileProtection),
      pythonCompile: ws.pythonCompile.paths.map(compileGlob),
    };
    compiled.set(ws, c);
  }
  return c;
}

/* ------------------------------ load checks ----------------------------- */

export interface WorkspaceProblem {
  path: (string | number)[];
  message: string;
}

/**
 * Every glob and template compiles, every example comes out as written, and
 * ids are unique within the section. Runs on a schema-valid section.
 */
export function checkWorkspace(ws: WorkspaceFile): WorkspaceProblem[] {
  const problems: WorkspaceProblem[] = [];
  const base = ["workspace"];
  const ids = new Map<string, string>();
  const seeId = (id: string, where: (string | number)[]) => {
    const earlier = ids.get(id);
    if (earlier !== undefined) problems.push({ path: [...where, "id"], message: `duplicate rule id ${id} (also ${earlier})` });
    else ids.set(id, where.join("."));
  };
  for (const key of ["failedIteration", "atomicModification", "coupling", "maxFileBytes", "massChange", "pythonCompile", "checkpointBeforeValidation", "disk"] as const) {
    seeId(ws[key].id, [...base, key]);
  }

  const patterns: CompiledCoupling[] = [];
  ws.coupling.patterns.forEach((spec, i) => {
    const where = [...base, "coupling", "patterns", i];
    seeId(spec.id, where);
    let c: CompiledCoupling;
    try {
      c = compileCoupling(spec);
    } catch (e) {
      problems.push({ path: [...where, "between"], message: (e as Error).message });
      return;
    }
    patterns.push(c);
    spec.couples.forEach(([p, q], j) => {
      if (!couples(c, p, q)) problems.push({ path: [...where, "couples", j], message: `pattern ${spec.id} does not couple ${p} and ${q}, listed as coupled` });
    });
    spec.notCouples?.forEach(([p, q], j) => {
      if (couples(c, p, q)) problems.push({ path: [...where, "notCouples", j], message: `pattern ${spec.id} couples ${p} and ${q}, listed as not coupled` });
    });
  });
  ws.coupling.notCoupled.forEach(([p, q], j) => {
    const by = patterns.find((c) => couples(c, p, q));
    if (by) problems.push({ path: [...base, "coupling", "notCoupled", j], message: `pattern ${by.spec.id} couples ${p} and ${q}, listed as not coupled (SKILLS.md §1 "Not considered coupled")` });
  });

  ws.protectedPaths.forEach((spec, i) => {
    const where = [...base, "protectedPaths", i];
    seeId(spec.id, where);
    let c: CompiledProtection;
    try {
      c = compileProtection(spec);
    } catch (e) {
      problems.push({ path: where, message: (e as Error).message });
      return;
    }
    spec.covers.forEach((p, j) => {
      if (!protects(c, p)) problems.push({ path: [...where, "covers", j], message: `rule ${spec.id} does not cover ${p}, listed as covered` });
    });
    spec.notCovers?.forEach((p, j) => {
      if (protects(c, p)) problems.push({ path: [...where, "notCovers", j], message: `rule ${spec.id} covers ${p}, listed as not covered` });
    });
  });
  ws.pythonCompile.paths.forEach((g, j) => {
    try {
      compileGlob(g);
    } catch (e) {
      problems.push({ path: [...base, "pythonCompile", "paths", j], message: (e as Error).message });
    }
  });
  return problems;
}

export function buildWorkspace(ws: WorkspaceFile): WorkspacePolicy {
  const { coupling, ...rest } = ws;
  return { ...rest, coupling: { id: coupling.id, clause: coupling.clause, layers: [coupling.patterns] } };
}

/* -------------------------------- combine ------------------------------- */

function stricterDecision<T extends WorkspaceDecision>(a: T, b: T): T {
  return WORKSPACE_DECISION_RANK[b] > WORKSPACE_DECISION_RANK[a] ? b : a;
}

/**
 * The workspace section of a phase running under both policies: every number
 * the smaller, every decision the stricter, protected paths from both
 * (each applies; the strictest outcome wins), coupling only where both
 * couple, checkpoints before validation if either asks for them, before the
 * programs of both. Nothing in `b` can widen `a`.
 */
export function combineWorkspace(a: WorkspacePolicy, b: WorkspacePolicy): WorkspacePolicy {
  const pick = <T extends { decision: "ask" | "reject" }>(x: T, y: T): T => ({ ...x, decision: stricterDecision(x.decision, y.decision) });
  return {
    failedIteration: pick(a.failedIteration, b.failedIteration),
    atomicModification: {
      ...pick(a.atomicModification, b.atomicModification),
      maxFilesPerIteration: Math.min(a.atomicModification.maxFilesPerIteration, b.atomicModification.maxFilesPerIteration),
    },
    coupling: { ...a.coupling, layers: [...a.coupling.layers, ...b.coupling.layers] },
    maxFileBytes: {
      ...pick(a.maxFileBytes, b.maxFileBytes),
      value: Math.min(a.maxFileBytes.value, b.maxFileBytes.value),
      approvable: a.maxFileBytes.approvable && b.maxFileBytes.approvable,
    },
    massChange: {
      ...pick(a.massChange, b.massChange),
      maxFilesPerDirectory: Math.min(a.massChange.maxFilesPerDirectory, b.massChange.maxFilesPerDirectory),
      directoryDelete: stricterDecision(a.massChange.directoryDelete, b.massChange.directoryDelete),
      directoryRename: stricterDecision(a.massChange.directoryRename, b.massChange.directoryRename),
    },
    protectedPaths: [...a.protectedPaths, ...b.protectedPaths],
    pythonCompile: { ...a.pythonCompile, paths: [...new Set([...a.pythonCompile.paths, ...b.pythonCompile.paths])] },
    checkpointBeforeValidation: {
      ...a.checkpointBeforeValidation,
      value: a.checkpointBeforeValidation.value || b.checkpointBeforeValidation.value,
      programs: [...new Set([...a.checkpointBeforeValidation.programs, ...b.checkpointBeforeValidation.programs])],
    },
    disk: { ...a.disk, layerBytes: Math.min(a.disk.layerBytes, b.disk.layerBytes), tmpBytes: Math.min(a.disk.tmpBytes, b.disk.tmpBytes), packagesBytes: minDefined(a.disk.packagesBytes, b.disk.packagesBytes) },
  };
}

function minDefined(a: number | undefined, b: number | undefined): number | undefined {
  return a === undefined ? b : b === undefined ? a : Math.min(a, b);
}
