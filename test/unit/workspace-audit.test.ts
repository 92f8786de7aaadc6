/**
 * The workspace's audit records: SKILLS.md-format build_audit.log lines and
 * the journal events of an iteration, a human's decision and live file
 * events.
 */
import { beforeAll, describe, expect, it } from "vitest";
import { canonicalJson } from "../../src/audit/canonical.js";
import { loadPolicy, type WorkspacePolicy } from "../../src/policy/index.js";
import {
  MAX_RECORDED_CHANGES,
  fileEventRecord,
  fileEventsDroppedRecord,
  iterationDecisionRecord,
  iterationRecord,
} from "../../src/workspace/audit.js";
import type { ChangeSet } from "../../src/workspace/changes.js";
import { judgeChangeSet } from "../../src/workspace/rules.js";

const TS = "2026-12-04T19:10:00.000Z";
/** SKILLS.md Build Loop Log Format */
const ACTION_LINE = /^\[2026-12-04T19:10:00\.000Z\] \[[A-Z]+\] \[[A-Z ]+\] \[[^\n]*\] \[[^\n]*\]$/;
const MODIFIED_LINE = /^\[2026-12-04T19:10:00\.000Z\] Modified [^\n]+: [^\n]+$/;

let ws: WorkspacePolicy;
beforeAll(async () => {
  ws = (await loadPolicy()).workspace;
});
const judge = (set: ChangeSet) => judgeChangeSet(set, { policy: ws, allowMainPy: false, approvedPaths: new Set() });

describe("iterationRecord", () => {
  it("an accepted iteration: a CHECKPOINT line, one [FILE] [ACTION] [path] [SUCCESS] line per change, and Modified [file]: [reason]", () => {
    const set: ChangeSet = {
      changes: [
        { kind: "modify", path: "services/risk_manager.py", isDir: false, sizeBytes: 2048 },
        { kind: "create", path: "tests/test_risk_manager.py", isDir: false, sizeBytes: 512, mode: 0o644 },
      ],
    };
    const { event, lines } = iterationRecord({ iteration: 3, trigger: "explicit", message: "Added position sizing (Phase 2.3)", set, judgement: judge(set), ts: TS });
    expect(lines).toEqual([
      `[${TS}] [FILE] [CHECKPOINT] [iteration 3] [ACCEPTED 2 changes: Added position sizing (Phase 2.3)]`,
      `[${TS}] [FILE] [MODIFY] [services/risk_manager.py] [SUCCESS]`,
      `[${TS}] [FILE] [CREATE] [tests/test_risk_manager.py] [SUCCESS]`,
      `[${TS}] Modified services/risk_manager.py: Added position sizing (Phase 2.3)`,
      `[${TS}] Modified tests/test_risk_manager.py: Added position sizing (Phase 2.3)`,
    ]);
    expect(event).toEqual({
      type: "workspace.iteration",
      iteration: 3,
      outcome: "accepted",
      trigger: "explicit",
      message: "Added position sizing (Phase 2.3)",
      changes: [
        { kind: "modify", path: "services/risk_manager.py", isDir: false, sizeBytes: 2048 },
        { kind: "create", path: "tests/test_risk_manager.py", isDir: false, sizeBytes: 512, mode: 0o644 },
      ],
      changesOmitted: 0,
      failures: [],
    });
    expect(() => canonicalJson(event)).not.toThrow();
  });

  it("a rejected iteration: the changes REJECTED, one POLICY line per failure naming rule and clause, no Modified line", () => {
    const set: ChangeSet = {
      changes: [
        { kind: "delete", path: "shared/models.py", isDir: false, sizeBytes: 0 },
        { kind: "rename", from: "services/a.py", path: "services/b.py", isDir: false, sizeBytes: 10 },
        { kind: "modify", path: "services/c.py", isDir: false, sizeBytes: 10 },
      ],
    };
    const { event, lines } = iterationRecord({ iteration: 4, trigger: "validation", message: null, set, judgement: judge(set), ts: TS });
    expect(lines.slice(0, 4)).toEqual([
      `[${TS}] [FILE] [CHECKPOINT] [iteration 4] [REJECTED 3 changes]`,
      `[${TS}] [FILE] [DELETE] [shared/models.py] [REJECTED]`,
      `[${TS}] [FILE] [RENAME] [services/a.py -> services/b.py] [REJECTED]`,
      `[${TS}] [FILE] [MODIFY] [services/c.py] [REJECTED]`,
    ]);
    expect(lines[4]).toMatch(/^\[[^\]]+\] \[FILE\] \[POLICY\] \[shared\/models\.py\] \[REJECT workspace\.protected\.shared \(SKILLS\.md §1 Forbidden Operations: deleting or renaming files in shared\/.*\): deleting shared\/models\.py: refused; /);
    expect(lines[5]).toMatch(/\[FILE\] \[POLICY\] \[iteration 4\] \[REJECT workspace\.atomic-modification \(SKILLS\.md §1 Atomic Modification Rule: maximum 2 files per iteration unless directly coupled\): 3 files changed/);
    expect(lines.some((l) => l.includes("Modified"))).toBe(false);
    for (const l of lines) expect(l).toMatch(ACTION_LINE);
    expect(event).toMatchObject({
      outcome: "rejected",
      trigger: "validation",
      message: null,
      rule: "workspace.protected.shared",
      clause: expect.stringMatching(/^SKILLS\.md §1/),
      failures: [expect.objectContaining({ rule: "workspace.protected.shared", path: "shared/models.py" }), expect.objectContaining({ rule: "workspace.atomic-modification" })],
    });
  });

  it("a held iteration is PENDING APPROVAL, and the human's decision adds the lines of an accepted one", () => {
    const set: ChangeSet = { changes: [{ kind: "modify", path: "shared/schemas.py", isDir: false, sizeBytes: 99 }] };
    const { event, lines } = iterationRecord({ iteration: 5, trigger: "stop", message: "Extend OrderSchema", set, judgement: judge(set), ts: TS });
    expect(event.outcome).toBe("pending");
    expect(lines[1]).toBe(`[${TS}] [FILE] [MODIFY] [shared/schemas.py] [PENDING APPROVAL]`);
    expect(lines[2]).toMatch(/\[FILE\] \[POLICY\] \[shared\/schemas\.py\] \[ASK workspace\.protected\.shared/);
    const d = iterationDecisionRecord({ iteration: 5, outcome: "accepted", approval: "ap-7", note: "ok per spec 2.4", set, message: "Extend OrderSchema", ts: TS });
    expect(d.lines).toEqual([
      `[${TS}] [FILE] [APPROVAL] [iteration 5] [ACCEPTED by a human (ap-7): ok per spec 2.4]`,
      `[${TS}] [FILE] [MODIFY] [shared/schemas.py] [SUCCESS]`,
      `[${TS}] Modified shared/schemas.py: Extend OrderSchema`,
    ]);
    expect(d.event).toEqual({ type: "workspace.iteration.decided", iteration: 5, outcome: "accepted", approval: "ap-7", note: "ok per spec 2.4" });
    const no = iterationDecisionRecord({ iteration: 5, outcome: "rejected", approval: null, note: null, set, message: null, ts: TS });
    expect(no.lines).toEqual([`[${TS}] [FILE] [APPROVAL] [iteration 5] [REJECTED by a human]`]);
  });

  it("keeps text from the sandbox on one line: a path or message cannot forge a record", () => {
    const set: ChangeSet = { changes: [{ kind: "create", path: `x\n[${TS}] [FILE] [MODIFY] [main.py] [SUCCESS].py`, isDir: false, sizeBytes: 1 }] };
    const { lines } = iterationRecord({ iteration: 1, trigger: "explicit", message: `ok\n[${TS}] Modified main.py: forged`, set, judgement: judge(set), ts: TS });
    for (const l of lines) expect(l).not.toContain("\n");
    expect(lines.filter((l) => l.startsWith(`[${TS}] Modified `))).toHaveLength(1);
    for (const l of lines) expect(l.startsWith(`[${TS}] Modified `) ? MODIFIED_LINE.test(l) : ACTION_LINE.test(l)).toBe(true);
  });

  it(`lists at most ${MAX_RECORDED_CHANGES} changes and says how many it left out`, () => {
    const set: ChangeSet = { changes: Array.from({ length: 50_000 }, (_, i) => ({ kind: "create" as const, path: `gen/f${i}.py`, isDir: false, sizeBytes: 1 })) };
    const { event, lines } = iterationRecord({ iteration: 9, trigger: "explicit", message: "x".repeat(5000), set, judgement: judge(set), ts: TS });
    expect(event.changes).toHaveLength(MAX_RECORDED_CHANGES);
    expect(event.changesOmitted).toBe(49_000);
    expect(lines).toContain(`[${TS}] [FILE] [CHECKPOINT] [iteration 9] [49000 more changes not listed (REJECTED)]`);
    expect(lines.length).toBeLessThan(MAX_RECORDED_CHANGES + 30);
    expect(event.message).toMatch(/… \[3000 more characters not kept\]$/);
    expect(canonicalJson(event).length).toBeLessThan(200_000);
  });
});

describe("live file event records", () => {
  it("one line and one event per file event; a summary when the rate cap dropped some", () => {
    expect(fileEventRecord({ event: "modify", path: "services/a.py", ts: TS })).toEqual({
      event: { type: "workspace.file", event: "modify", path: "services/a.py", isDir: false },
      lines: [`[${TS}] [FILE] [WATCH] [services/a.py] [MODIFY]`],
    });
    expect(fileEventRecord({ event: "create", path: "services/new", isDir: true, ts: TS }).lines).toEqual([`[${TS}] [FILE] [WATCH] [services/new/] [CREATE]`]);
    const d = fileEventsDroppedRecord({ count: 870, windowMs: 1000, ts: TS });
    expect(d.event).toEqual({ type: "workspace.file.dropped", count: 870, windowMs: 1000 });
    expect(d.lines[0]).toMatch(ACTION_LINE);
    expect(d.lines[0]).toContain("870 more file events in 1000 ms");
  });
});
