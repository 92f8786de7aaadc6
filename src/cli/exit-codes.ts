import { constants as osConstants } from "node:os";

/** The CLI's exit statuses (README "Exit codes"). */
export const EXIT = { ok: 0, error: 1, usage: 2, timeout: 124, sandboxdFailed: 125, policy: 126 } as const;

/** `sandboxd exec`: the command's own code, 124 at its timeout, 128+N for death by signal N. */
export function exitCodeFor(result: { exitCode: number | null; signal: string | null; timedOut: boolean }): number {
  if (result.timedOut) return EXIT.timeout;
  if (result.exitCode !== null) return result.exitCode;
  const n = result.signal ? (osConstants.signals as Record<string, number | undefined>)[result.signal] : undefined;
  return n ? 128 + n : EXIT.sandboxdFailed;
}
