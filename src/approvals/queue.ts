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
 */
import { randomBytes } from "node:crypto";
import { readFile, rename, writeFile } from "node:fs/promises";
import path from "node:path";
import { z } from "zod";
import { SandboxdError } from "../errors.js";
import { timestamp } from "../audit/format.js";
import type { Clock } from "../util/clock.js";

export const APPROVAL_STATES = ["pending", "approved", "denied", "used", "expired"] as const;
export type ApprovalState = (typeof APPROVAL_STATES)[number];

export const approvalSchema = z
  .object({
    id: z.string(),
    phaseId: z.string(),
    /** exactly one of argv / command is set: what the agent asked to run */
    argv: z.array(z.string()).nullable(),
    command: z.string().nullable(),
    /** set instead for a SQL statement the database gateway refused as `ask`: its exact text (redacted) */
    sql: z.string().nullable().default(null),
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
  })
  .strict();
export type Approval = z.infer<typeof approvalSchema>;

export interface CommandKey {
  argv?: string[] | undefined;
  command?: string | undefined;
  /** a SQL statement (src/db/gateway.ts askApproval): never matches a command, nor a command it */
  sql?: string | undefined;
}

function sameCommand(a: Approval, k: CommandKey): boolean {
  if (k.sql !== undefined) return a.sql === k.sql;
  if (k.argv) return a.argv !== null && a.argv.length === k.argv.length && a.argv.every((x, i) => x === k.argv![i]);
  return a.command !== null && a.command === k.command;
}

export class ApprovalQueue {
  private items: Approval[] = [];
  private saving: Promise<void> = Promise.resolve();

  constructor(
    private readonly file: string,
    private readonly clock: Clock,
    private readonly newId: () => string = () => `ap_${randomBytes(6).toString("hex")}`,
  ) {}

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

  /** Queue a request, or return the pending one for the same command in the same phase. */
  async request(
    phaseId: string,
    key: CommandKey,
    why: { ruleId: string; clause: string; policyReason: string; requestReason?: string | undefined },
  ): Promise<{ approval: Approval; created: boolean }> {
    const existing = this.items.find((a) => a.phaseId === phaseId && a.state === "pending" && sameCommand(a, key));
    if (existing) return { approval: existing, created: false };
    const approval: Approval = {
      id: this.newId(),
      phaseId,
      argv: key.argv ?? null,
      command: key.argv || key.sql !== undefined ? null : (key.command ?? null),
      sql: key.sql ?? null,
      ruleId: why.ruleId,
      clause: why.clause,
      policyReason: why.policyReason,
      requestReason: why.requestReason ?? null,
      state: "pending",
      requestedAt: timestamp(this.clock.now()),
      decidedAt: null,
      note: null,
      usedAt: null,
    };
    this.items.push(approval);
    await this.save();
    return { approval, created: true };
  }

  async decide(id: string, decision: "approve" | "deny", note?: string): Promise<Approval> {
    const a = this.get(id);
    if (a.state !== "pending") {
      throw new SandboxdError("SBX_ERR_APPROVAL_DECIDED", `approval ${id} is already ${a.state}`);
    }
    a.state = decision === "approve" ? "approved" : "denied";
    a.decidedAt = timestamp(this.clock.now());
    a.note = note ?? null;
    await this.save();
    return a;
  }

  /** An approved, unused approval for exactly this command in this phase, marked used. */
  async consume(phaseId: string, key: CommandKey): Promise<Approval | null> {
    const a = this.items.find((x) => x.phaseId === phaseId && x.state === "approved" && sameCommand(x, key));
    if (!a) return null;
    a.state = "used";
    a.usedAt = timestamp(this.clock.now());
    await this.save();
    return a;
  }

  /** A phase ended: its open requests and unused approvals can no longer be used. */
  async expirePhase(phaseId: string): Promise<Approval[]> {
    const expired = this.items.filter((a) => a.phaseId === phaseId && (a.state === "pending" || a.state === "approved"));
    for (const a of expired) a.state = "expired";
    if (expired.length) await this.save();
    return expired;
  }

  private save(): Promise<void> {
    const data = JSON.stringify(this.items, null, 2) + "\n";
    const next = this.saving.then(async () => {
      const tmp = `${this.file}.tmp`;
      await writeFile(tmp, data, { mode: 0o600 });
      await rename(tmp, this.file);
    });
    this.saving = next.catch(() => undefined);
    return next;
  }
}
