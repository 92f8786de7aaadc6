/**
 * The phase lifecycle as one table and one guard.
 *
 *   starting ──▶ running ──▶ stopping ──▶ stopped
 *       │          ▲  │  ▲         │
 *       │          │  ▼  │         └──────▶ failed
 *       │      escalated / paused ──▶ stopping
 *       └────────▶ stopping
 *
 * `escalated`: the fail-fast protocol stopped the phase (its container is
 * frozen, a report waits for a person); `paused`: a person froze it. Both
 * answer every mutating call with 423 until a person resumes or aborts.
 *
 * Every change of `record.state` goes through `transition()`; nothing else
 * assigns it. A phase ends by one road, whatever ends it (the operator's
 * stop, a failed start, a dead container, a daemon shutdown, a reconcile):
 * into `stopping`, where what it holds is released, then into `stopped` or
 * `failed`. Whoever takes a phase into `stopping` owns its end; everybody
 * else who wanted to end it waits for that end instead of doing it again.
 *
 * A new state (the fail-fast `escalated`, a `paused`) is a row here and a
 * word in PHASE_STATES: the table is keyed by PhaseState, so the compiler
 * refuses a state without its row.
 */
import { SandboxdError } from "../errors.js";
import type { PhaseRecord, PhaseState } from "./types.js";

/** Where each state may go next, and why it would. */
export const PHASE_TRANSITIONS: { readonly [S in PhaseState]: Readonly<Partial<Record<PhaseState, string>>> } = {
  starting: {
    running: "the shim connected and the network is confined",
    stopping: "the start failed, or the phase was stopped while it started",
  },
  running: {
    stopping: "stopped by the operator, the daemon's shutdown, or its container or shim was lost",
    escalated: "a fail-fast limit was reached (SKILLS.md Fail-Fast Protocol): the container is frozen for a person",
    paused: "a person paused the phase",
  },
  escalated: {
    running: "a person resumed the phase after reading the escalation report (counters reset)",
    stopping: "a person aborted the phase, or it was stopped",
  },
  paused: {
    running: "a person resumed the phase",
    escalated: "a command that ended as the person paused reached a fail-fast limit",
    stopping: "a person aborted the phase, or it was stopped",
  },
  stopping: {
    stopped: "everything released; the end was asked for",
    failed: "everything released; the phase ended because something broke",
  },
  stopped: {},
  failed: {},
};

export const TERMINAL_STATES: ReadonlySet<PhaseState> = new Set(
  (Object.keys(PHASE_TRANSITIONS) as PhaseState[]).filter((s) => Object.keys(PHASE_TRANSITIONS[s]).length === 0),
);

export function canTransition(from: PhaseState, to: PhaseState): boolean {
  return PHASE_TRANSITIONS[from][to] !== undefined;
}

export function isTerminal(state: PhaseState): boolean {
  return TERMINAL_STATES.has(state);
}

/**
 * The guard: moves `record` to `to` or throws SBX_ERR_PHASE_NOT_RUNNING (409)
 * naming both states, and leaves the record as it was.
 */
export function transition(record: Pick<PhaseRecord, "id" | "state">, to: PhaseState): void {
  const from = record.state;
  if (!canTransition(from, to)) {
    throw new SandboxdError("SBX_ERR_PHASE_NOT_RUNNING", `phase ${record.id} is ${from}; it cannot become ${to}`, {
      details: { from, to },
    });
  }
  record.state = to;
}
