import { randomBytes } from "node:crypto";

/** Time and id seams, injected so audit timestamps and ids are deterministic in unit tests. */
export interface Clock {
  now(): Date;
  /** monotonic milliseconds, for durations */
  monotonicMs(): number;
}

export interface IdSource {
  phaseId(): string;
  token(): string;
}

export const systemClock: Clock = {
  now: () => new Date(),
  monotonicMs: () => performance.now(),
};

export const randomIds: IdSource = {
  phaseId: () => `ph_${randomBytes(6).toString("hex")}`,
  token: () => randomBytes(32).toString("hex"),
};
