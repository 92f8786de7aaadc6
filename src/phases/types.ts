import { z } from "zod";
import { PHASE_MODES } from "../domain.js";

export { PHASE_MODES, type PhaseMode } from "../domain.js";

export const PHASE_STATES = ["starting", "running", "escalated", "paused", "stopping", "stopped", "failed"] as const;
export type PhaseState = (typeof PHASE_STATES)[number];

/** One fail-fast escalation of a phase: its report, and how a person ended it. */
export const escalationSchema = z
  .object({
    /** 1-based, per phase */
    n: z.number().int().positive(),
    at: z.string(),
    category: z.string(),
    /** the report file (SKILLS.md Human Escalation Log) in the phase's state folder */
    report: z.string(),
    summary: z.string(),
    resolved: z
      .object({ at: z.string(), how: z.enum(["resumed", "aborted", "stopped"]), note: z.string().nullable() })
      .strict()
      .nullable(),
  })
  .strict();
export type Escalation = z.infer<typeof escalationSchema>;

/** What the daemon persists about a phase (phase.json in the phase's state folder). */
export const phaseRecordSchema = z
  .object({
    id: z.string(),
    name: z.string(),
    project: z.string(),
    mode: z.enum(PHASE_MODES),
    state: z.enum(PHASE_STATES),
    instance: z.string(),
    image: z.string(),
    containerId: z.string().nullable(),
    containerName: z.string(),
    uid: z.number().int(),
    gid: z.number().int(),
    createdAt: z.string(),
    stoppedAt: z.string().nullable(),
    /** the stricter policy file this phase runs under, on top of the daemon's (null: the daemon's alone) */
    policyFile: z.string().nullable(),
    /** the phase's build_audit.log (the project root's by default) */
    buildLog: z.string(),
    /** why the phase ended, when it did not end by an operator's stop */
    endReason: z.string().nullable(),
    /** fail-fast escalations, oldest first (absent in records of daemons before fail-fast) */
    escalations: z.array(escalationSchema).optional(),
    /** a person's pause: when and why */
    pausedBy: z.object({ at: z.string(), note: z.string().nullable() }).strict().nullable().optional(),
    /** protected paths this phase may change (`phase start --allow main.py`: SKILLS.md "Phase specification") */
    allow: z.array(z.string()).optional(),
    /**
     * names the project's .env sets that commands do not get (src/policy/env.ts),
     * each with why — never their values; said at start (absent in older records)
     */
    envDropped: z.array(z.object({ name: z.string(), why: z.string() }).strict()).optional(),
    /**
     * the phase claimed a warm pool's container (src/phases/pool.ts), made at
     * `filledAt`; absent: a cold start
     */
    pooled: z.object({ filledAt: z.string() }).strict().optional(),
  })
  .strict();
export type PhaseRecord = z.infer<typeof phaseRecordSchema>;

/** The public view of a phase (what the API returns). */
export interface PhaseView extends PhaseRecord {
  runningExecs: number;
  /** the phase's iterations (src/workspace): counts and each one's outcome */
  workspace?: {
    accepted: number;
    rejected: number;
    pending: number;
    /** refused iterations: SKILLS.md fail-fast, category `iteration` */
    failed: number;
    iterations: unknown[];
  };
}
