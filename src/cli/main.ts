#!/usr/bin/env node
/**
 * `sandboxd`: the entry. Agent harnesses run `sandboxd exec ID -- …` as a
 * process per command, so what this process loads before the request is what
 * they wait for. The common form of exec is read straight from argv
 * (./exec-args.ts) and run with node built-ins and a few small modules; every
 * other command, and any exec form only commander reads, loads the full
 * command tree (./program.ts). Nothing is imported statically here: a static
 * import would load before the choice is made.
 *
 * Exit codes: 0 success; 1 an error sandboxd reported (code and hint on
 * stderr); 2 bad usage. `exec` exits with the command's own code, 124 when
 * the command was killed at its timeout, 126 when policy or the shell parser
 * refused it, 2 when the request can never be valid (a timeout over the
 * mode's limit), 125 when sandboxd itself failed, 128+N when the command died
 * of signal N, 141 when the reader of its output went away.
 */
import module from "node:module";

/** EXIT.brokenPipe and EXIT.sandboxdFailed (./exit-codes.ts), without loading it first */
const BROKEN_PIPE = 141;
const SANDBOXD_FAILED = 125;

// Node 22.1+ keeps compiled code on disk between runs (NODE_COMPILE_CACHE
// chooses where); Node 20 has no such cache and goes without.
(module as { enableCompileCache?: () => unknown }).enableCompileCache?.();

// A reader that stops early (`| head`, `| grep -q`) closes stdout. That ends
// sandboxd quietly, as SIGPIPE ends a shell tool (128+13); the daemon sees the
// connection go and ends the command. Any other failed write (a full disk,
// ENOSPC; a file past its size limit, EFBIG) is said in one line, as the
// native exec client says it, and ends sandboxd with 125, not a stack trace.
process.stdout.on("error", (err: NodeJS.ErrnoException) => {
  if (err.code === "EPIPE") process.exit(BROKEN_PIPE);
  process.stderr.write(`sandboxd: ${err.code ? `write ${err.code}` : err.message}\n`);
  process.exit(SANDBOXD_FAILED);
});
// A stderr nobody reads any more (its reader exited) costs its lines, not the
// command's output or status: the exit code stays the command's, as natively.
process.stderr.on("error", () => undefined);

async function run(argv: string[]): Promise<number> {
  const { parseExecArgs } = await import("./exec-args.js");
  const exec = parseExecArgs(argv.slice(2));
  if (exec) return (await import("./exec.js")).runExec(exec);
  return (await import("./program.js")).main(argv);
}

run(process.argv).then(
  (code) => {
    process.exitCode = code;
  },
  (err: unknown) => {
    // every command reports its errors itself; reaching here is a bug, said as one
    process.stderr.write(`sandboxd: internal error: ${(err as Error).stack ?? String(err)}\n`);
    process.exitCode = SANDBOXD_FAILED;
  },
);
