/**
 * Leaf types every room shares. Nothing here imports anything of sandboxd's:
 * policy/, net/ and db/ take the words they need from here, not from the
 * rooms above them (docs/ARCHITECTURE.md, "Imports run one way").
 */

export const PHASE_MODES = ["backtest", "paper", "test"] as const;
export type PhaseMode = (typeof PHASE_MODES)[number];
