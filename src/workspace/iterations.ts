/**
 * A phase's iterations: from one checkpoint to the next, the layer's change
 * set is read, checked, judged, and then applied to the project (accepted),
 * discarded (rejected: the view is the last accepted state again), or held
 * for a human (ask). SKILLS.md §1: Atomic Modification Rule, pre-write
 * validation, protected paths, "Modified [file]: [reason]".
 *
 *   checkpoint ─▶ empty                       (nothing changed: no iteration)
 *              ─▶ accepted  (applied, fresh upper)
 *              ─▶ rejected  (discarded, fresh upper, counted as a failed attempt)
 *              ─▶ pending ─▶ accepted | rejected   (an operator decides)
 *
 * Every checkpoint holds the phase's ExecGate alone: no command runs while
 * the layer is read, unmounted, applied and mounted again.
 */
import { constants as fsc } from "node:fs";
import { lstat, open, readFile, readlink, rename, writeFile } from "node:fs/promises";
import path from "node:path";
import { z } from "zod";
import { actionLine, escapeControl } from "../audit/format.js";
import type { AuditEvent } from "../audit/journal.js";
import { SandboxdError } from "../errors.js";
import { ApplyError, applyChangeSet } from "./apply.js";
import type { ChangeSet, FileChange } from "./changes.js";
import { compileWorkspace, protects, type WorkspacePolicy } from "../policy/index.js";
import { DEFAULT_DIFF_MAX_BYTES, diffChangeSet, type FileVersion } from "./diff.js";
import { ExecGate } from "./gate.js";
import { TOOL_CACHES, readRegular, type WorkspaceLayer } from "./layer.js";
import { LayerWatcher, type LayerEvent } from "./watch.js";
import { PhaseHistory } from "./history.js";
import { readViewFile, viewEntry, viewVersion, writeViewFile, type ViewFile, type WriteResult } from "./files.js";
import { createHash } from "node:crypto";
import { checkRelPath, projectPath } from "./apply.js";
import { compileCheckArgv, judgeChangeSet, parseCompileOutput, pythonFilesToCompile, withCompileResults, type RuleFailure } from "./rules.js";

type JudgeFailure = Pick<RuleFailure, "rule" | "clause" | "message"> & Partial<RuleFailure>;

export type IterationTrigger = "api" | "validation" | "stop";
export type IterationState = "accepted" | "rejected" | "pending";

export interface IterationRecord {
  n: number;
  message: string;
  trigger: IterationTrigger;
  state: IterationState;
  at: string;
  decidedAt: string | null;
  /** "rules" or "operator" */
  decidedBy: string | null;
  changes: FileChange[];
  failures: JudgeFailure[];
  /** the approval request a person decides it by (`sandboxd approvals approve|deny`), when it waits */
  approval?: string | null;
}

/** One file of a pending iteration as a person approves it: its bytes' SHA-256 as they would be applied. */
export interface IterationFileBinding {
  path: string;
  sha256: string | null;
  note: string | null;
}

export interface CheckpointResult {
  /** null: nothing had changed since the last checkpoint */
  iteration: IterationRecord | null;
}

export interface WorkspaceHooks {
  /** the container's init pid (its mount namespace), null when it is gone */
  containerPid(): Promise<number | null>;
  /** run argv in the sandbox (cwd /workspace) as the project owner; its stdout */
  runInSandbox(argv: string[]): Promise<string>;
  record(event: AuditEvent, lines: string[]): Promise<void>;
  /** SKILLS.md timestamp */
  now(): string;
  /**
   * an iteration was decided (accepted or refused, by the rules or an operator), after its
   * record: the phase's fail-fast counts a refusal as a failed attempt (category `iteration`)
   */
  decided?(it: IterationRecord): Promise<void>;
  /**
   * The iteration waits for a person: queue its approval request (bound to
   * `files`) and say so; the request's id, or null when no queue is kept.
   */
  askHuman?(it: IterationRecord, files: IterationFileBinding[]): Promise<string | null>;
  /** live file events from the layer (src/workspace/watch.ts); without it nothing is watched */
  fileEvents?(batch: LayerEvent[]): void;
  /** events over the watcher's rate cap, counted */
  fileEventsDropped?(count: number, windowMs: number): void;
  /** the watcher could not start or failed; the checkpoint still sees every change */
  watchFailed?(err: Error): void;
}

export interface WorkspaceOptions {
  uid: number;
  gid: number;
  /** `phase start --allow main.py` */
  allowMainPy: boolean;
  /** read at each checkpoint, so a policy reload (SIGHUP) applies to the next one */
  policy: () => WorkspacePolicy;
  /** where iterations are kept across a daemon restart */
  stateFile: string;
}

const stateSchema = z.object({
  iterations: z.array(z.any()),
  failedIterations: z.number().int(),
});

/**
 * What the layer itself refuses, whatever the policy says: a link that
 * points out of the project, a link to the project's root, to a hidden or
 * read-only path (`.env`, `.git`, …) or through another link, and files that
 * are neither regular files, folders nor links (fifos, sockets, devices).
 *
 * A link is applied to the project as a link: one to `.env` or `.git` would
 * alias a protected path on the host under a name no rule protects (a deploy
 * copies the production credentials through it; a later write or a harness's
 * PUT through it reaches `.git/hooks`). Its target is judged lexically, so a
 * target that passes through a link (whose destination the judge would have
 * to follow) is refused too, and so is a target with `..` after a name
 * (`L/../../x`): the kernel takes that `..` from where `L` leads, so the text
 * and the destination part ways (tested: `a/b/c/d/e/m -> L/../L/../../../../etc/passwd`
 * with two `L -> ..` links read as `a/b/etc/passwd` and was the host's /etc/passwd).
 */
export async function layerFailures(
  set: ChangeSet,
  layer: WorkspaceLayer,
  links: Map<string, string>,
  guard: { policy: WorkspacePolicy; allowMainPy: boolean } | null = null,
): Promise<RuleFailure[]> {
  const out: RuleFailure[] = [];
  const clause = "SKILLS.md §1 Forbidden Operations: creating files outside the project directory structure";
  for (const c of set.changes) {
    if (c.kind === "delete" || c.isDir) continue;
    const target = links.get(c.path);
    if (target !== undefined) {
      const refuse = (why: string) =>
        out.push({ rule: "workspace.symlink", clause, path: c.path, message: `${c.path} is a link to ${target}, ${why}; make it a file or a link within the project`, decision: "reject", final: true });
      // `..` after a name goes up from wherever that name leads (a link `L -> ..`
      // makes `L/../..` two levels above what the text says): judged lexically,
      // such a target could look inside and reach the host's /etc. Only leading
      // `..` are taken; they climb the link's own folders, real ones (apply checks).
      const segs = target.split("/");
      const ups = segs.findIndex((x) => x !== "..");
      if (ups >= 0 && segs.slice(ups).includes("..")) {
        refuse("whose `..` follows a name (the kernel applies it to where that name leads, not to the folder the text shows); write it as ../…/name");
        continue;
      }
      const norm = path.posix.normalize(path.posix.join(path.posix.dirname(c.path), target));
      if (path.isAbsolute(target) || norm === ".." || norm.startsWith("../")) {
        refuse("outside the project");
        continue;
      }
      if (norm === "." || norm === "") {
        refuse("the project's root (every protected path would be reachable through it)");
        continue;
      }
      const bad = guard ? await linkTargetProblem(norm, layer, guard) : null;
      if (bad) refuse(bad);
      continue;
    }
    const st = await lstat(path.join(layer.paths.upper, c.path)).catch(() => null);
    if (st && !st.isFile()) {
      out.push({ rule: "workspace.special-file", clause, path: c.path, message: `${c.path} is not a regular file (a fifo, socket or device); only files, folders and links reach the project`, decision: "reject", final: true });
    }
  }
  return out;
}

/** Why a link to the project-relative `norm` may not reach the project, or null. */
async function linkTargetProblem(norm: string, layer: WorkspaceLayer, guard: { policy: WorkspacePolicy; allowMainPy: boolean }): Promise<string | null> {
  const { protections } = compileWorkspace(guard.policy);
  const parts = norm.split("/");
  for (let i = 1; i <= parts.length; i++) {
    const prefix = parts.slice(0, i).join("/");
    for (const rule of protections) {
      const t = rule.spec.treatment;
      if (t !== "hidden" && t !== "readOnly") continue;
      if (rule.spec.unlessPermission === "main.py" && guard.allowMainPy) continue;
      if (protects(rule, prefix) || protects(rule, `${prefix}/x`)) return `a ${t === "hidden" ? "hidden" : "read-only"} path (${rule.spec.id})`;
    }
    // a link on the way: its destination is not what the target says
    for (const root of [layer.paths.upper, layer.spec.project]) {
      const st = await lstat(path.join(root, prefix)).catch(() => null);
      if (st?.isSymbolicLink()) return `through the link ${prefix} (a link to a link is not followed to judge it)`;
    }
  }
  return null;
}

export class PhaseWorkspace {
  readonly gate = new ExecGate();
  iterations: IterationRecord[] = [];
  /** failed iterations (SKILLS.md fail-fast, category `iteration`) */
  failedIterations = 0;
  /** project paths whose approvable failures the judge lifts (no API sets them yet: an `ask` iteration is decided whole, through the approval queue) */
  approvedPaths = new Set<string>();
  /** the project's versions of what accepted iterations changed, for the whole phase's diff */
  readonly history: PhaseHistory;

  /** the live file-event watcher on the upper, while the view is mounted */
  private watcher: LayerWatcher | null = null;
  /** watch() was called and unwatch() was not: the watcher is started again after each remount */
  private watching = false;

  constructor(
    readonly layer: WorkspaceLayer,
    private readonly hooks: WorkspaceHooks,
    private readonly opts: WorkspaceOptions,
  ) {
    this.history = new PhaseHistory(path.join(path.dirname(opts.stateFile), "history"));
  }

  /**
   * Live file events (create/modify/delete with paths) from the upper: the
   * layer holds only what the phase changed, so this watches a handful of
   * folders, not the project. The upper is emptied and made again at every
   * accepted or discarded iteration, so the watcher is stopped before and
   * started again after (a discard's own removals are not the agent's
   * writes). Tool caches (__pycache__, …) are not watched: they are never
   * part of an iteration. A watcher that fails is reported, not fatal: the
   * checkpoint reads the layer itself.
   */
  async watch(): Promise<void> {
    this.watching = true;
    if (this.watcher || !this.hooks.fileEvents) return;
    const onEvents = this.hooks.fileEvents.bind(this.hooks);
    try {
      this.watcher = await LayerWatcher.start({
        upperDir: this.layer.paths.upper,
        lowerDir: this.layer.spec.project,
        ignoreNames: TOOL_CACHES,
        onEvents,
        onDropped: (n, w) => this.hooks.fileEventsDropped?.(n, w),
        onError: (err) => this.hooks.watchFailed?.(err),
      });
    } catch (err) {
      this.hooks.watchFailed?.(err as Error);
    }
  }

  /** Stops the live events (phase end). */
  async unwatch(): Promise<void> {
    this.watching = false;
    await this.pauseWatch();
  }

  private async pauseWatch(): Promise<void> {
    const w = this.watcher;
    this.watcher = null;
    await w?.close();
  }

  private async resumeWatch(): Promise<void> {
    if (this.watching) await this.watch();
  }

  get policy(): WorkspacePolicy {
    return this.opts.policy();
  }

  /** Iterations kept from before a daemon restart. */
  async load(): Promise<void> {
    try {
      const s = stateSchema.parse(JSON.parse(await readFile(this.opts.stateFile, "utf8")));
      this.iterations = s.iterations as IterationRecord[];
      this.failedIterations = s.failedIterations;
    } catch {
      /* a phase without iterations yet */
    }
  }

  private async save(): Promise<void> {
    const tmp = `${this.opts.stateFile}.tmp`;
    await writeFile(tmp, JSON.stringify({ iterations: this.iterations, failedIterations: this.failedIterations }) + "\n", { mode: 0o600 });
    await rename(tmp, this.opts.stateFile);
  }

  pending(): IterationRecord | null {
    return this.iterations.find((i) => i.state === "pending") ?? null;
  }

  summary(): { accepted: number; rejected: number; pending: number; failed: number; iterations: IterationRecord[] } {
    const count = (s: IterationState) => this.iterations.filter((i) => i.state === s).length;
    return { accepted: count("accepted"), rejected: count("rejected"), pending: count("pending"), failed: this.failedIterations, iterations: this.iterations };
  }

  assertNotPending(): void {
    const p = this.pending();
    if (p) {
      throw new SandboxdError("SBX_ERR_ITERATION_PENDING", `iteration ${p.n} of this phase waits for a human decision`, {
        hint: `see it with \`sandboxd diff\`; accept or reject it with \`sandboxd iteration accept|reject <phase> ${p.n}\``,
        details: { iteration: p.n },
      });
    }
  }

  /** The pending changes (what a checkpoint now would judge). */
  async files(): Promise<FileChange[]> {
    return (await this.layer.changes()).changes;
  }

  /**
   * The pending changes as a unified diff. Both sides are read without
   * following a link (a link shows as absent), the view's side only from
   * the layer's own file system.
   */
  async diff(): Promise<string> {
    const set = await this.layer.changes();
    const upperDev = await this.layer.upperDevice();
    return diffChangeSet(set, {
      accepted: (p) => versionOf(this.layer.spec.project, p, null),
      view: (p) => versionOf(this.layer.paths.upper, p, upperDev),
    });
  }

  /**
   * The whole phase as a unified diff: every path an accepted iteration or
   * the pending changes touched, from what the project was when the phase
   * started (kept by PhaseHistory before each accept) to the view now.
   * Renames show as a delete and a create.
   */
  async diffAll(): Promise<string> {
    const leave = await this.gate.enter();
    try {
      const paths = new Set(await this.history.paths());
      for (const c of (await this.layer.changes()).changes) {
        if (c.isDir) continue;
        paths.add(c.path);
        if (c.kind === "rename" && c.from) paths.add(c.from);
      }
      const view = this.layer.paths.view;
      const project = this.layer.spec.project;
      const before = new Map<string, FileVersion | null>();
      const after = new Map<string, FileVersion | null>();
      const changes: FileChange[] = [];
      for (const p of paths) {
        const kept = await this.history.before(p);
        const b = kept === undefined ? await versionOf(project, p, null) : kept;
        const a = await viewVersion(view, p);
        if (!b && !a) continue;
        if (b && a && b.size === a.size && (b.mode ?? 0) === a.mode && a.size <= DEFAULT_DIFF_MAX_BYTES && (await b.read()).equals(await a.read())) continue;
        before.set(p, b);
        after.set(p, a);
        const kind = !b ? "create" : !a ? "delete" : "modify";
        const modeOnly = kind === "modify" && b!.size === a!.size && a!.size <= DEFAULT_DIFF_MAX_BYTES && (await b!.read()).equals(await a!.read());
        changes.push({ kind, path: p, isDir: false, sizeBytes: a?.size ?? 0, ...(a ? { mode: a.mode } : {}), ...(modeOnly ? { modeOnly } : {}) });
      }
      return await diffChangeSet({ changes }, { accepted: async (p) => before.get(p) ?? null, view: async (p) => after.get(p) ?? null });
    } finally {
      leave();
    }
  }

  /**
   * A file as the phase sees it (its view), for a harness. Holds the gate as
   * a command does, so no checkpoint remounts the view meanwhile.
   */
  async readFile(rel: string, maxBytes: number): Promise<ViewFile> {
    const leave = await this.gate.enter();
    try {
      return await readViewFile(this.layer.paths.view, rel, maxBytes);
    } finally {
      leave();
    }
  }

  /**
   * A harness writes a file through the daemon: into the view (the layer),
   * as the agent would, so the next checkpoint judges it with everything
   * else. Before it lands: what the judge would refuse for good (hidden and
   * read-only paths) and files over the size limit are refused, and Python
   * is compiled in the sandbox (the compiler's message is the refusal).
   * Atomic (src/workspace/files.ts); recorded either way.
   */
  async writeFile(rel: string, bytes: Buffer, opts: { mode?: number } = {}): Promise<WriteResult & { path: string; sha256: string; atCheckpoint: JudgeFailure[] }> {
    const leave = await this.gate.enter();
    const sha256 = createHash("sha256").update(bytes).digest("hex");
    const ts = this.hooks.now();
    try {
      checkRelPath(rel);
      this.assertNotPending();
      const policy = this.opts.policy();
      const kind = (await viewEntry(this.layer.paths.view, rel)) === null ? "create" : "modify";
      const change: FileChange = { kind, path: rel, isDir: false, sizeBytes: bytes.length };
      const j = judgeChangeSet({ changes: [change] }, { policy, allowMainPy: this.opts.allowMainPy, approvedPaths: this.approvedPaths });
      const final = j.failures.filter((f) => f.final);
      if (final.length > 0) {
        throw new SandboxdError("SBX_ERR_PATH_PROTECTED", `writing ${rel} refused: ${final.map((f) => `${f.rule}: ${f.message}`).join("; ")}`, { details: { failures: final } });
      }
      const size = j.failures.find((f) => f.rule === policy.maxFileBytes.id);
      if (size) {
        throw new SandboxdError("SBX_ERR_FILE_TOO_LARGE", `writing ${rel} refused: ${size.message}`, {
          hint: "write a smaller file; a larger one written in the sandbox waits for a person's approval at the checkpoint",
          details: { failures: [size] },
        });
      }
      const py = pythonFilesToCompile({ changes: [change] }, policy);
      const check = py.length
        ? async (tmpRel: string) => {
            const stdout = await this.hooks.runInSandbox(compileCheckArgv([tmpRel]));
            const failed = parseCompileOutput(stdout, [tmpRel], policy);
            if (failed.length > 0) {
              const msg = failed.map((f) => f.message.split(tmpRel).join(rel)).join("; ");
              throw new SandboxdError("SBX_ERR_PYTHON_SYNTAX", `writing ${rel} refused: ${msg}`, { details: { failures: failed.map((f) => ({ ...f, path: rel, message: f.message.split(tmpRel).join(rel) })) } });
            }
          }
        : undefined;
      const done = await writeViewFile(this.layer.paths.view, rel, bytes, { uid: this.opts.uid, gid: this.opts.gid, ...(opts.mode !== undefined ? { mode: opts.mode } : {}), ...(check ? { check } : {}) });
      // what the checkpoint will still ask a human about (shared/ edits, …)
      const atCheckpoint = j.failures.filter((f) => f.rule !== policy.maxFileBytes.id);
      await this.hooks.record({ type: "workspace.put", path: rel, bytes: bytes.length, sha256, created: done.created, mode: done.mode }, [
        actionLine(ts, "FILE", "PUT", rel, `SUCCESS ${done.created ? "created" : "replaced"} ${bytes.length} bytes sha256 ${sha256}${atCheckpoint.length ? `; the checkpoint asks: ${atCheckpoint.map((f) => f.rule).join(", ")}` : ""}`),
      ]);
      return { ...done, path: rel, sha256, atCheckpoint };
    } catch (err) {
      const e = err as SandboxdError;
      await this.hooks
        .record({ type: "workspace.put", path: rel.slice(0, 4096), bytes: bytes.length, sha256, refused: e.code ?? "error", reason: e.message }, [
          actionLine(ts, "FILE", "PUT", rel, `REFUSED ${e.code ?? ""} ${e.message}`),
        ])
        // eslint-disable-next-line no-restricted-syntax -- the caller gets the write's own error; a record that fails is the journal failing, which fails closed on its own
        .catch(() => undefined);
      throw err;
    } finally {
      leave();
    }
  }

  /**
   * Judge the layer's changes now. Waits for running commands to end;
   * no command starts meanwhile.
   */
  async checkpoint(message: string, trigger: IterationTrigger): Promise<CheckpointResult> {
    return this.gate.exclusive(async () => {
      this.assertNotPending();
      const set = await this.layer.changes();
      // a layer read only in part (limits) is an iteration even with nothing listed: it is refused, and so emptied
      if (set.changes.length === 0 && !set.limits) return { iteration: null };
      const links = new Map<string, string>();
      for (const c of set.changes) {
        if (c.kind === "delete" || c.isDir) continue;
        const t = await readlink(path.join(this.layer.paths.upper, c.path)).catch(() => null);
        if (t !== null) links.set(c.path, t);
      }
      const policy = this.opts.policy();
      let j = judgeChangeSet(set, { policy, allowMainPy: this.opts.allowMainPy, approvedPaths: this.approvedPaths });
      j = withCompileResults(j, await layerFailures(set, this.layer, links, { policy, allowMainPy: this.opts.allowMainPy }));
      // compiled in the sandbox, as the project owner; not when the iteration is refused for good anyway
      const py = pythonFilesToCompile(set, policy).filter((p) => !links.has(p));
      if (py.length > 0 && !j.failures.some((f) => f.final)) {
        const stdout = await this.hooks.runInSandbox(compileCheckArgv(py));
        j = withCompileResults(j, parseCompileOutput(stdout, py, policy));
      }
      const decision = j.decision;
      const failures: RuleFailure[] = j.failures;
      const it: IterationRecord = {
        n: this.iterations.length + 1,
        message,
        trigger,
        state: "pending",
        at: this.hooks.now(),
        decidedAt: null,
        decidedBy: null,
        changes: set.changes,
        failures,
      };
      this.iterations.push(it);
      if (decision === "accept") await this.accept(it, set, "rules");
      else if (decision === "reject") await this.reject(it, "rules");
      else {
        await this.save();
        await this.hooks.record(
          { type: "workspace.iteration", n: it.n, state: "pending", trigger, message, changes: it.changes, failures },
          [
            ...it.changes.map((c) => actionLine(it.at, "FILE", kindWord(c), target(c), "PENDING approval")),
            `[${it.at}] ITERATION_PENDING: iteration ${it.n} (${escapeControl(message)}) waits for a human: ${failures.map((f) => `${f.rule}: ${f.message}`).join("; ")}`,
          ],
        );
        // through the approval queue: `sandboxd approvals ls` lists it, approve applies it, deny discards it
        it.approval = (await this.hooks.askHuman?.(it, await this.bindings(set))) ?? null;
        await this.save();
      }
      return { iteration: it };
    });
  }

  /**
   * The files of a change set as a person approves them: the SHA-256 of each
   * one's bytes in the layer (read without following a link, from the
   * layer's own file system); deletes and folders carry a note instead.
   */
  async bindings(set: ChangeSet): Promise<IterationFileBinding[]> {
    const out: IterationFileBinding[] = [];
    const dev = await this.layer.upperDevice();
    for (const c of set.changes) {
      if (c.isDir) continue;
      if (c.kind === "delete") {
        out.push({ path: c.path, sha256: null, note: "deleted" });
        continue;
      }
      const bytes = await readRegular(this.layer.paths.upper, c.path, Math.max(c.sizeBytes, 0) + 1, dev).catch(() => null);
      out.push(bytes ? { path: c.path, sha256: createHash("sha256").update(bytes).digest("hex"), note: c.modeOnly ? "mode only" : null } : { path: c.path, sha256: null, note: c.modeOnly ? "mode only" : "not a regular file" });
    }
    return out;
  }

  /** An operator's decision on a pending iteration. */
  async decide(n: number, decision: "accept" | "reject", note?: string): Promise<IterationRecord> {
    return this.gate.exclusive(async () => {
      const it = this.iterations.find((i) => i.n === n);
      if (!it) throw new SandboxdError("SBX_ERR_ITERATION_NOT_FOUND", `this phase has no iteration ${n}`);
      if (it.state !== "pending") {
        throw new SandboxdError("SBX_ERR_ITERATION_DECIDED", `iteration ${n} was already ${it.state}`);
      }
      const by = `operator${note ? `: ${note}` : ""}`;
      if (decision === "accept") {
        // what is applied is what is in the layer now (nothing ran since: commands wait while an iteration is pending)
        await this.accept(it, await this.layer.changes(), by);
      } else await this.reject(it, by);
      return it;
    });
  }

  /** At the end of a phase whose sandbox is gone: nothing is judged, nothing applied. */
  async discardAtEnd(why: string): Promise<void> {
    const set = await this.layer.changes().catch(() => ({ changes: [] as FileChange[] }));
    const p = this.pending();
    if (set.changes.length === 0 && !p) return;
    const ts = this.hooks.now();
    await this.hooks.record(
      { type: "workspace.discard", pendingIteration: p?.n ?? null, changes: set.changes, reason: why },
      [
        ...set.changes.map((c) => actionLine(ts, "FILE", kindWord(c), target(c), `DISCARDED ${why}`)),
        `[${ts}] ITERATION_DISCARDED: ${set.changes.length} unjudged change(s) not applied — ${escapeControl(why)}`,
      ],
    );
    if (p) {
      p.state = "rejected";
      p.decidedAt = ts;
      p.decidedBy = why;
      // eslint-disable-next-line no-restricted-syntax -- the phase is ending and the discard is already in the trail (the record above); the saved iteration state only serves a later show
      await this.save().catch(() => undefined);
    }
  }

  private async accept(it: IterationRecord, set: ChangeSet, by: string): Promise<void> {
    const pid = await this.hooks.containerPid();
    await this.pauseWatch();
    await this.layer.unmount(pid);
    await this.history.capture(set, this.layer.spec.project);
    let done: FileChange[];
    try {
      done = await applyChangeSet(set, {
        project: this.layer.spec.project,
        upper: this.layer.paths.upper,
        upperDev: await this.layer.upperDevice(),
        uid: this.opts.uid,
        gid: this.opts.gid,
      });
    } catch (err) {
      if (!(err instanceof ApplyError)) throw err;
      it.changes = set.changes;
      await this.applyFailed(it, err, by, pid);
      return;
    }
    await this.layer.reset(pid);
    await this.resumeWatch();
    it.state = "accepted";
    it.changes = set.changes;
    it.decidedAt = this.hooks.now();
    it.decidedBy = by;
    await this.save();
    const ts = it.decidedAt;
    const lines: string[] = [];
    for (const c of done) {
      if (c.isDir && c.kind !== "delete") continue;
      lines.push(actionLine(ts, "FILE", kindWord(c), target(c), "SUCCESS"));
    }
    for (const c of done) if (!c.isDir) lines.push(`[${ts}] Modified ${escapeControl(c.path)}: ${escapeControl(it.message)}`);
    lines.push(`[${ts}] ITERATION_ACCEPTED: iteration ${it.n} (${escapeControl(it.message)}) applied to the project by ${escapeControl(by)}`);
    await this.hooks.record({ type: "workspace.iteration", n: it.n, state: "accepted", trigger: it.trigger, message: it.message, decidedBy: by, changes: done }, lines);
    await this.hooks.decided?.(it);
  }

  /**
   * The apply stopped part-way (the host refused a step): what reached the
   * project is recorded change by change, the rest is discarded with the
   * layer, and the iteration ends refused — never left pending without a
   * record, with the view unmounted.
   */
  private async applyFailed(it: IterationRecord, err: ApplyError, by: string, pid: number | null): Promise<void> {
    await this.layer.reset(pid);
    await this.resumeWatch();
    const cause = escapeControl((err.cause as Error | undefined)?.message ?? err.message);
    const failure: JudgeFailure = {
      rule: "workspace.apply",
      clause: "SKILLS.md Core Principles — Atomic Changes",
      path: err.failedAt.path,
      message: `applying ${escapeControl(target(err.failedAt))} to the project failed (${cause}) after ${err.applied.length} of ${it.changes.length} change(s) were applied; those are in the project (listed as applied in the trail), the rest was discarded; look at the project before going on`,
      decision: "reject",
      final: true,
    };
    it.state = "rejected";
    it.failures = [...it.failures, failure];
    it.decidedAt = this.hooks.now();
    it.decidedBy = by;
    this.failedIterations++;
    await this.save();
    const ts = it.decidedAt;
    const applied = new Set(err.applied);
    await this.hooks.record(
      { type: "workspace.iteration", n: it.n, state: "rejected", trigger: it.trigger, message: it.message, decidedBy: by, changes: it.changes, applied: err.applied, failures: it.failures, failedIterations: this.failedIterations },
      [
        ...err.applied.filter((c) => !c.isDir || c.kind === "delete").map((c) => actionLine(ts, "FILE", kindWord(c), target(c), "SUCCESS applied before the failure")),
        ...it.changes.filter((c) => !c.isDir && !applied.has(c)).map((c) => actionLine(ts, "FILE", kindWord(c), target(c), c === err.failedAt ? `FAILED ${cause}` : "DISCARDED")),
        `[${ts}] ITERATION_FAILED: iteration ${it.n} (${escapeControl(it.message)}) applied in part — ${escapeControl(failure.message)}`,
      ],
    );
    await this.hooks.decided?.(it);
  }

  private async reject(it: IterationRecord, by: string): Promise<void> {
    const pid = await this.hooks.containerPid();
    await this.pauseWatch();
    await this.layer.reset(pid);
    await this.resumeWatch();
    it.state = "rejected";
    it.decidedAt = this.hooks.now();
    it.decidedBy = by;
    this.failedIterations++;
    await this.save();
    const ts = it.decidedAt;
    const why = it.failures.length ? it.failures.map((f) => `${f.rule} (${f.clause}): ${f.message}`).join("; ") : `rejected by ${by}`;
    const firstRule = it.failures[0]?.rule ?? "workspace.operator";
    await this.hooks.record(
      { type: "workspace.iteration", n: it.n, state: "rejected", trigger: it.trigger, message: it.message, decidedBy: by, changes: it.changes, failures: it.failures, failedIterations: this.failedIterations },
      [
        ...it.changes.filter((c) => !c.isDir).map((c) => actionLine(ts, "FILE", kindWord(c), target(c), `REFUSED ${firstRule}`)),
        `[${ts}] ITERATION_REFUSED: iteration ${it.n} (${escapeControl(it.message)}) discarded${by === "rules" ? "" : ` by ${escapeControl(by)}`}, the workspace is back to the last accepted state — ${escapeControl(why)}`,
      ],
    );
    await this.hooks.decided?.(it);
  }
}

async function versionOf(root: string, rel: string, requireDev: number | null): Promise<FileVersion | null> {
  let file: string;
  try {
    file = await projectPath(root, rel);
  } catch {
    return null;
  }
  const st = await lstat(file).catch(() => null);
  if (!st?.isFile() || (requireDev !== null && st.dev !== requireDev)) return null;
  return {
    size: st.size,
    mode: st.mode & 0o7777,
    read: async () => {
      const fh = await open(file, fsc.O_RDONLY | fsc.O_NOFOLLOW);
      try {
        const f = await fh.stat();
        if (f.ino !== st.ino || f.dev !== st.dev) throw new Error(`${rel} changed while it was read`);
        return await fh.readFile();
      } finally {
        await fh.close();
      }
    },
  };
}

function kindWord(c: FileChange): string {
  return { create: "CREATE", modify: "MODIFY", delete: "DELETE", rename: "RENAME" }[c.kind];
}

function target(c: FileChange): string {
  return c.kind === "rename" ? `${c.from} -> ${c.path}` : c.path;
}
