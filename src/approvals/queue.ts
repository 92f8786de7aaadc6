/**
 * Human approvals (SKILLS.md §2: "Any command not matching this pattern
 * requires human approval"; §3: "AI waits for human approval").
 *
 * An `ask` verdict queues a request and the exec is refused at once with the
 * request's id. A human approves or denies it (`sandboxd approvals …`). An
 * approval lets that exact command (same argv, or the same command string) run
 * once, in that phase; using it marks it `used`. Requests of a phase that ends
 * expire. The queue is persisted (atomic replace) so a daemon restart loses no
 * decision.
 *
 * A person approves exactly what will run:
 * - the request records the SHA-256 of every file the command runs
 *   (./binding.ts: `sh x.sh`, `python x.py`, `python -m pkg.mod`, `./x.sh`);
 *   using the approval re-hashes them, and an approval whose files changed
 *   becomes `stale` instead of running (the exec makes a new request);
 * - a denial is sticky: a retry of the same command in the same phase is
 *   answered with the denial (its id and the person's note) and creates no new
 *   request, until a person approves it after all (`approve` on a denied
 *   request) or the policy stops asking;
 * - a retry of a pending request with another `reason` adds it to the request.
 */
import { randomBytes } from "node:crypto";
import { readFile } from "node:fs/promises";
import path from "node:path";
import { z } from "zod";
import { SandboxdError } from "../errors.js";
import { timestamp } from "../audit/format.js";
import type { Clock } from "../util/clock.js";
import { JsonFileWriter } from "../util/fs.js";

export const APPROVAL_STATES = ["pending", "approved", "denied", "used", "expired", "stale"] as const;
export type ApprovalState = (typeof APPROVAL_STATES)[number];

/** One file the command runs, as it was when the approval was requested. */
export const fileBindingSchema = z
  .object({
    /** as the command names it (relative to /workspace, or absolute) */
    path: z.string(),
    /** hex SHA-256 of its content; null when there is no file to hash (see `note`) */
    sha256: z.string().nullable(),
    /** why there is no hash: "absent", "outside the project", "not a regular file", "too large" */
    note: z.string().nullable(),
  })
  .strict();
export type FileBinding = z.infer<typeof fileBindingSchema>;

export const approvalSchema = z
  .object({
    id: z.string(),
    phaseId: z.string(),
    /** exactly one of argv / command is set: what the agent asked to run */
    argv: z.array(z.string()).nullable(),
    command: z.string().nullable(),
    /** set instead for a SQL statement the database gateway refused as `ask`: its exact text (redacted) */
    sql: z.string().nullable().default(null),
    /**
     * set instead for an iteration of the phase's workspace the policy left to
     * a person (a shared/ edit, a file over 10 MB): approving it applies the
     * iteration, denying discards it; `files` binds the bytes it would apply
     */
    workspace: z.object({ iteration: z.number().int().positive(), paths: z.array(z.string()) }).strict().nullable().default(null),
    ruleId: z.string(),
    clause: z.string(),
    /** why the policy asks */
    policyReason: z.string(),
    /** why the agent wants it (exec `reason`) */
    requestReason: z.string().nullable(),
    state: z.enum(APPROVAL_STATES),
    requestedAt: z.string(),
    decidedAt: z.string().nullable(),
    note: z.string().nullable(),
    usedAt: z.string().nullable(),
    /** the files the command runs, hashed at request time (older records: none) */
    files: z.array(fileBindingSchema).default([]),
    /** reasons given on retries of the pending request, in order */
    laterReasons: z.array(z.object({ at: z.string(), reason: z.string() }).strict()).default([]),
    /** retries answered with this request (pending or denied) instead of a new one */
    retries: z.number().int().nonnegative().default(0),
    /**
     * set when the request is for a timeout over the mode's limit
     * (src/policy/timeout.ts): the approval allows the command with exactly
     * this timeout; null for a command within the limit (and a SQL statement)
     */
    timeoutMs: z.number().int().positive().nullable().default(null),
  })
  .strict();
export type Approval = z.infer<typeof approvalSchema>;

/** Paths whose content differs between two bindings of the same command (a file added, removed or changed). */
export function changedFiles(before: readonly FileBinding[], now: readonly FileBinding[]): string[] {
  const was = new Map(before.map((f) => [f.path, f.sha256]));
  const is = new Map(now.map((f) => [f.path, f.sha256]));
  const changed: string[] = [];
  for (const p of new Set([...was.keys(), ...is.keys()])) if (was.get(p) !== is.get(p)) changed.push(p);
  return changed;
}

export interface CommandKey {
  argv?: string[] | undefined;
  command?: string | undefined;
  /** a SQL statement (src/db/gateway.ts askApproval): never matches a command, nor a command it */
  sql?: string | undefined;
  /** a timeout over the mode's limit the command asks for: part of what is approved */
  timeoutMs?: number | undefined;
}

function sameCommand(a: Approval, k: CommandKey): boolean {
  // an iteration's request is decided with the iteration, never used by a command
  if (a.workspace) return false;
  if (k.sql !== undefined) return a.sql === k.sql;
  if (a.timeoutMs !== (k.timeoutMs ?? null)) return false;
  if (k.argv) return a.argv !== null && a.argv.length === k.argv.length && a.argv.every((x, i) => x === k.argv![i]);
  return a.command !== null && a.command === k.command;
}

/** What a waiting exec learns: the request was decided (or expired), or the wait ended without a decision. */
export type WaitOutcome = { kind: "decided"; approval: Approval } | { kind: "timeout" } | { kind: "aborted" };

export class ApprovalQueue {
  private items: Approval[] = [];
  /** execs waiting for a person's decision (`exec --wait-approval`), by approval id */
  private waiters = new Map<string, Set<(a: Approval) => void>>();

  /** the state dir file, rewritten whole at each change */
  private readonly writer: JsonFileWriter;

  constructor(
    private readonly file: string,
    private readonly clock: Clock,
    private readonly newId: () => string = () => `ap_${randomBytes(6).toString("hex")}`,
  ) {
    this.writer = new JsonFileWriter(file);
  }

  static async open(stateDir: string, clock: Clock): Promise<ApprovalQueue> {
    const q = new ApprovalQueue(path.join(stateDir, "approvals.json"), clock);
    try {
      const raw = JSON.parse(await readFile(q.file, "utf8")) as unknown;
      q.items = z.array(approvalSchema).parse(raw);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "ENOENT") {
        throw new SandboxdError("SBX_ERR_CONFIG", `approvals file ${q.file} is unreadable: ${(err as Error).message}`, {
          hint: "move the file aside to start with an empty queue (decisions in it are then lost)",
        });
      }
    }
    return q;
  }

  list(opts: { all?: boolean; phaseId?: string } = {}): Approval[] {
    return this.items.filter((a) => (opts.all || a.state === "pending") && (!opts.phaseId || a.phaseId === opts.phaseId));
  }

  get(id: string): Approval {
    const a = this.items.find((x) => x.id === id);
    if (!a) throw new SandboxdError("SBX_ERR_APPROVAL_NOT_FOUND", `no approval with id ${id}`);
    return a;
  }

  /**
   * Queue a request, or return the pending one for the same command in the
   * same phase (a reason it does not have yet is added to it: `reasonAdded`).
   */
  async request(
    phaseId: string,
    key: CommandKey,
    why: { ruleId: string; clause: string; policyReason: string; requestReason?: string | undefined },
    files: readonly FileBinding[] = [],
  ): Promise<{ approval: Approval; created: boolean; reasonAdded: boolean }> {
    const existing = this.items.find((a) => a.phaseId === phaseId && a.state === "pending" && sameCommand(a, key));
    if (existing) {
      existing.retries++;
      const reason = why.requestReason;
      const known = reason === undefined || reason === existing.requestReason || existing.laterReasons.some((r) => r.reason === reason);
      if (!known) existing.laterReasons.push({ at: timestamp(this.clock.now()), reason: reason! });
      await this.save();
      return { approval: existing, created: false, reasonAdded: !known };
    }
    const approval = this.newApproval(
      phaseId,
      {
        argv: key.argv ?? null,
        command: key.argv || key.sql !== undefined ? null : (key.command ?? null),
        sql: key.sql ?? null,
        workspace: null,
        timeoutMs: key.timeoutMs ?? null,
      },
      why,
      files,
    );
    this.items.push(approval);
    await this.save();
    return { approval, created: true, reasonAdded: false };
  }

  /**
   * Queue the request of a workspace iteration the policy left to a person
   * (one per iteration; `files` the sha256 of each file as it would be applied).
   */
  async requestIteration(
    phaseId: string,
    iteration: { n: number; paths: string[] },
    why: { ruleId: string; clause: string; policyReason: string; requestReason?: string | undefined },
    files: readonly FileBinding[],
  ): Promise<Approval> {
    const existing = this.items.find((a) => a.phaseId === phaseId && a.state === "pending" && a.workspace?.iteration === iteration.n);
    if (existing) return existing;
    const approval = this.newApproval(
      phaseId,
      { argv: null, command: null, sql: null, workspace: { iteration: iteration.n, paths: [...iteration.paths] }, timeoutMs: null },
      why,
      files,
    );
    this.items.push(approval);
    await this.save();
    return approval;
  }

  /** A pending request: what is asked (`subject`), why, and the files it is bound to. */
  private newApproval(
    phaseId: string,
    subject: Pick<Approval, "argv" | "command" | "sql" | "workspace" | "timeoutMs">,
    why: { ruleId: string; clause: string; policyReason: string; requestReason?: string | undefined },
    files: readonly FileBinding[],
  ): Approval {
    return {
      id: this.newId(),
      phaseId,
      ...subject,
      ruleId: why.ruleId,
      clause: why.clause,
      policyReason: why.policyReason,
      requestReason: why.requestReason ?? null,
      state: "pending",
      requestedAt: timestamp(this.clock.now()),
      decidedAt: null,
      note: null,
      usedAt: null,
      files: [...files],
      laterReasons: [],
      retries: 0,
    };
  }

  /** The pending request of a workspace iteration, if one was queued. */
  forIteration(phaseId: string, n: number): Approval | null {
    return this.items.find((a) => a.phaseId === phaseId && a.workspace?.iteration === n && (a.state === "pending" || a.state === "approved")) ?? null;
  }

  /** A person decides a pending request, or approves a denied one after all (the person says otherwise). */
  async decide(id: string, decision: "approve" | "deny", note?: string): Promise<Approval> {
    const a = this.get(id);
    if (a.state !== "pending" && !(a.state === "denied" && decision === "approve")) {
      throw new SandboxdError("SBX_ERR_APPROVAL_DECIDED", `approval ${id} is already ${a.state}`, {
        hint: a.state === "denied" ? "a denied request can still be approved; it cannot be denied twice" : undefined,
      });
    }
    a.state = decision === "approve" ? "approved" : "denied";
    a.decidedAt = timestamp(this.clock.now());
    a.note = note ?? null;
    await this.save();
    return a;
  }

  /** An approved, unused approval for exactly this command in this phase (not yet marked used). */
  approvedFor(phaseId: string, key: CommandKey): Approval | null {
    return this.items.find((x) => x.phaseId === phaseId && x.state === "approved" && sameCommand(x, key)) ?? null;
  }

  /** The denial standing for exactly this command in this phase (the latest), its retry counted. */
  async deniedFor(phaseId: string, key: CommandKey): Promise<Approval | null> {
    let found: Approval | null = null;
    for (const x of this.items) if (x.phaseId === phaseId && x.state === "denied" && sameCommand(x, key)) found = x;
    if (found) {
      found.retries++;
      await this.save();
    }
    return found;
  }

  /**
   * Use an approval: with the files the command runs now. Unchanged files:
   * marked used, returned. Changed: marked stale (it approved other content),
   * and the changed paths returned.
   */
  async use(id: string, filesNow: readonly FileBinding[]): Promise<{ approval: Approval; changed: string[] }> {
    const a = this.get(id);
    if (a.state !== "approved") throw new SandboxdError("SBX_ERR_APPROVAL_DECIDED", `approval ${id} is ${a.state}, not approved`);
    const changed = changedFiles(a.files, filesNow);
    a.state = changed.length === 0 ? "used" : "stale";
    a.usedAt = timestamp(this.clock.now());
    await this.save();
    return { approval: a, changed };
  }

  /** An approved, unused approval for exactly this command in this phase, marked used (files not checked). */
  async consume(phaseId: string, key: CommandKey): Promise<Approval | null> {
    const a = this.approvedFor(phaseId, key);
    return a ? (await this.use(a.id, a.files)).approval : null;
  }

  /**
   * Wait until a person decides `id` (announce), the phase ends (expire), `ms`
   * pass or `signal` aborts. However the wait ends, the waiter is removed.
   */
  waitFor(id: string, ms: number, signal?: AbortSignal): Promise<WaitOutcome> {
    const a = this.get(id);
    if (a.state !== "pending") return Promise.resolve({ kind: "decided", approval: a });
    if (signal?.aborted) return Promise.resolve({ kind: "aborted" });
    return new Promise((resolve) => {
      const set = this.waiters.get(id) ?? new Set();
      this.waiters.set(id, set);
      const done = (out: WaitOutcome) => {
        clearTimeout(timer);
        signal?.removeEventListener("abort", onAbort);
        set.delete(wake);
        if (set.size === 0) this.waiters.delete(id);
        resolve(out);
      };
      const wake = (approval: Approval) => done({ kind: "decided", approval });
      const onAbort = () => done({ kind: "aborted" });
      const timer = setTimeout(() => done({ kind: "timeout" }), ms);
      set.add(wake);
      signal?.addEventListener("abort", onAbort, { once: true });
    });
  }

  /** How many execs wait for a decision on `id` (shown with the request: someone is blocked on it). */
  waiting(id: string): number {
    return this.waiters.get(id)?.size ?? 0;
  }

  /** Wake the execs waiting on `id`: called once its decision is recorded, so their records follow it. */
  announce(id: string): void {
    const a = this.get(id);
    for (const wake of [...(this.waiters.get(id) ?? [])]) wake(a);
  }

  /** A phase ended: its open requests and unused approvals can no longer be used. */
  async expirePhase(phaseId: string): Promise<Approval[]> {
    const expired = this.items.filter((a) => a.phaseId === phaseId && (a.state === "pending" || a.state === "approved"));
    for (const a of expired) a.state = "expired";
    if (expired.length) await this.save();
    for (const a of expired) this.announce(a.id);
    return expired;
  }

  private save(): Promise<void> {
    return this.writer.write(this.items);
  }
}
