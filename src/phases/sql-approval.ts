/**
 * SQL statements the policy sends to a person (SKILLS.md §3 Schema Safety:
 * "propose it as a migration and wait for approval"): the database gateway
 * calls this through its `askApproval` option, so db/ records through an
 * interface and never imports phases/. The request goes to the same queue as
 * commands, keyed by the phase and the statement's exact (redacted) text; an
 * approved one is used up by the next identical statement from that phase.
 */
import { actionLine, escapeControl, timestamp } from "../audit/format.js";
import type { SqlApprovalAnswer, SqlApprovalRequest } from "../db/gateway.js";
import type { LivePhase, PhaseContext } from "./context.js";

export async function askSqlApproval(ctx: PhaseContext, live: LivePhase, req: SqlApprovalRequest): Promise<SqlApprovalAnswer> {
  const id = live.record.id;
  const key = { sql: req.sql };
  const used = await ctx.opts.approvals.consume(id, key);
  if (used) return { id: used.id, state: "approved", note: used.note };
  const { approval, created } = await ctx.opts.approvals.request(id, key, { ruleId: req.ruleId, clause: req.clause, policyReason: req.reason });
  if (created) {
    await live.rec.record(
      { type: "approval.request", approval: approval.id, sql: req.sql, via: req.via, rule: req.ruleId, clause: req.clause, reason: req.reason },
      [actionLine(timestamp(ctx.opts.clock.now()), "APPROVAL", "REQUEST", `SQL: ${escapeControl(req.sql)}`, `${approval.id} pending: ${req.reason}`)],
    );
    ctx.opts.log.info({ phase: id, approval: approval.id }, "approval requested for a SQL statement");
  }
  return { id: approval.id, state: approval.state === "denied" ? "denied" : "pending", note: approval.note };
}
