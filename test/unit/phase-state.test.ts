/**
 * The phase lifecycle table and its guard: every pair of states is either an
 * edge of the table (and the guard takes it) or not (and the guard refuses
 * it with a coded 409, leaving the record as it was).
 */
import { describe, expect, it } from "vitest";
import { SandboxdError } from "../../src/errors.js";
import { PHASE_TRANSITIONS, TERMINAL_STATES, canTransition, isTerminal, transition } from "../../src/phases/state.js";
import { PHASE_STATES, type PhaseState } from "../../src/phases/types.js";

const EDGES: Array<[PhaseState, PhaseState]> = [
  ["starting", "running"],
  ["starting", "stopping"],
  ["running", "stopping"],
  ["running", "escalated"],
  ["running", "paused"],
  ["escalated", "running"],
  ["escalated", "stopping"],
  ["paused", "running"],
  ["paused", "escalated"],
  ["paused", "stopping"],
  ["stopping", "stopped"],
  ["stopping", "failed"],
];

describe("phase lifecycle table", () => {
  it("has a row for every state and names a reason for every edge", () => {
    expect(Object.keys(PHASE_TRANSITIONS).sort()).toEqual([...PHASE_STATES].sort());
    for (const [from, to] of EDGES) expect(PHASE_TRANSITIONS[from][to]).toMatch(/\w{4,}/);
  });

  it("allows exactly the listed edges", () => {
    for (const from of PHASE_STATES) {
      for (const to of PHASE_STATES) {
        const listed = EDGES.some(([f, t]) => f === from && t === to);
        expect(canTransition(from, to), `${from} → ${to}`).toBe(listed);
      }
    }
  });

  it("stopped and failed are terminal; nothing else is", () => {
    expect([...TERMINAL_STATES].sort()).toEqual(["failed", "stopped"]);
    expect(PHASE_STATES.filter(isTerminal).sort()).toEqual(["failed", "stopped"]);
  });

  it("every state but the terminal ones can reach an end", () => {
    const reach = (s: PhaseState, seen = new Set<PhaseState>()): boolean =>
      isTerminal(s) || (Object.keys(PHASE_TRANSITIONS[s]) as PhaseState[]).some((n) => !seen.has(n) && reach(n, new Set([...seen, s])));
    for (const s of PHASE_STATES) expect(reach(s), s).toBe(true);
  });

  for (const [from, to] of EDGES) {
    it(`the guard takes ${from} → ${to}`, () => {
      const r = { id: "ph_000000000001", state: from };
      transition(r, to);
      expect(r.state).toBe(to);
    });
  }

  it("the guard refuses every other pair with SBX_ERR_PHASE_NOT_RUNNING (409) and changes nothing", () => {
    let refused = 0;
    for (const from of PHASE_STATES) {
      for (const to of PHASE_STATES) {
        if (canTransition(from, to)) continue;
        const r = { id: "ph_000000000001", state: from };
        let err: unknown;
        try {
          transition(r, to);
        } catch (e) {
          err = e;
        }
        expect(err, `${from} → ${to}`).toBeInstanceOf(SandboxdError);
        expect((err as SandboxdError).code).toBe("SBX_ERR_PHASE_NOT_RUNNING");
        expect((err as SandboxdError).status).toBe(409);
        expect((err as SandboxdError).message).toContain(`is ${from}; it cannot become ${to}`);
        expect(r.state).toBe(from);
        refused++;
      }
    }
    expect(refused).toBe(PHASE_STATES.length ** 2 - EDGES.length);
  });
});
