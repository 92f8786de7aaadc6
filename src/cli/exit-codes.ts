import { constants as osConstants } from "node:os";

/** The CLI's exit statuses (README "Exit codes"). */
export const EXIT = { ok: 0, error: 1, usage: 2, timeout: 124, sandboxdFailed: 125, policy: 126, brokenPipe: 141, locked: 75 } as const;

/**
 * `sandboxd exec` when the daemon refused the request: 126 for a command the
 * policy or the shell parser refused (it did not run, as a shell says 126 for
 * a command it cannot execute), 2 for a request that can never be valid as
 * given (a timeout over the mode's limit, an argument too large), 125 for
 * anything else sandboxd failed at.
 */
export function exitCodeForRefusal(code: string | undefined): number {
  switch (code) {
    case "SBX_ERR_POLICY_DENIED":
    case "SBX_ERR_POLICY_NEEDS_APPROVAL":
    case "SBX_ERR_COMMAND_PARSE":
    case "SBX_ERR_APPROVAL_DENIED":
    case "SBX_ERR_APPROVAL_STALE":
      return EXIT.policy;
    // fail-fast: the phase waits for a person (EX_TEMPFAIL: the same command may run after a resume)
    case "SBX_ERR_PHASE_ESCALATED":
    case "SBX_ERR_PHASE_PAUSED":
      return EXIT.locked;
    case "SBX_ERR_TIMEOUT_RANGE":
    case "SBX_ERR_VALIDATION":
    case "SBX_ERR_REQUEST_TOO_LARGE":
    case "SBX_ERR_EXEC_CWD":
    case "SBX_ERR_ENV_RESERVED":
      return EXIT.usage;
    default:
      return EXIT.sandboxdFailed;
  }
}

/** `sandboxd exec`: the command's own code, 124 at its timeout, 128+N for death by signal N. */
export function exitCodeFor(result: { exitCode: number | null; signal: string | null; timedOut: boolean }): number {
  if (result.timedOut) return EXIT.timeout;
  if (result.exitCode !== null) return result.exitCode;
  const n = result.signal ? (osConstants.signals as Record<string, number | undefined>)[result.signal] : undefined;
  return n ? 128 + n : EXIT.sandboxdFailed;
}
