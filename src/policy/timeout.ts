/**
 * A timeout over the mode's limit (SKILLS.md §2 Execution Timeouts: "Default
 * timeout: 60 seconds", up to 5 minutes for paper-mode feeds).
 *
 * SKILLS.md calls 60 s a *default*: a suite that needs longer is not
 * forbidden, it is a person's call. So a timeout between the mode's limit
 * (`limits.modes.<mode>.maxTimeoutMs`, raised by the operator in the policy
 * file) and the 5-minute ceiling turns the command's verdict into `ask` — for
 * every part, since the timeout applies to the whole command — which a person
 * answers once (a one-shot approval bound to this timeout) or by a standing
 * approval whose `maxTimeoutMs` covers it. A forbidden command stays
 * forbidden; beyond the ceiling nothing can allow it.
 */
import type { PhaseMode } from "../domain.js";
import type { Verdict } from "./evaluate.js";

/** SKILLS.md §2's ceiling: no policy, approval or grant allows longer (the policy schema caps `maxTimeoutMs` at it too). */
export const TIMEOUT_CEILING_MS = 300_000;
export const TIMEOUT_RULE_ID = "limits.timeout";
export const TIMEOUT_CLAUSE = "SKILLS.md §2 Execution Timeouts: 60 seconds by default, up to 5 minutes";

/** Whether `timeoutMs` needs a person: over the mode's limit, within the ceiling. */
export function timeoutNeedsApproval(timeoutMs: number, modeMaxMs: number): boolean {
  return timeoutMs > modeMaxMs && timeoutMs <= TIMEOUT_CEILING_MS;
}

/**
 * The verdict for `verdict`'s command run with a timeout over the mode's
 * limit: `ask` under the timeout rule, every part asking (a grant must cover
 * them all), the policy's own reason kept when it asked already. A forbid is
 * returned unchanged.
 */
export function judgeTimeout(verdict: Verdict, timeoutMs: number, modeMaxMs: number, mode: PhaseMode): Verdict {
  if (verdict.decision === "forbid") return verdict;
  const why = `timeout ${seconds(timeoutMs)} s exceeds the ${seconds(modeMaxMs)} s limit of a ${mode}-mode phase; a person may allow it for this command`;
  return {
    ...verdict,
    decision: "ask",
    ruleId: TIMEOUT_RULE_ID,
    clause: TIMEOUT_CLAUSE,
    reason: verdict.decision === "ask" ? `${why}, and ${verdict.reason} (rule ${verdict.ruleId})` : why,
    parts: verdict.parts.map((p) => (p.decision === "allow" ? { ...p, decision: "ask" } : p)),
  };
}

export function seconds(ms: number): string {
  return Number.isInteger(ms / 1000) ? String(ms / 1000) : (ms / 1000).toFixed(1);
}
