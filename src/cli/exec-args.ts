/**
 * The hot path's argument reader: `sandboxd [--socket S] exec ID [options]
 * -- COMMAND…` read straight from argv, so `exec` starts without loading
 * commander and the whole command tree.
 *
 * It takes only forms whose meaning is plain, and the same meaning
 * commander gives them (program.ts declares `exec`); anything else —
 * --help, an unknown or repeated option, a value commander would reject or
 * read differently, a missing id — returns null, and the full command line
 * parses it, with its usage errors and hints.
 */
import { clientSocket } from "../config/paths.js";
import { DEFAULT_WAIT_APPROVAL_MS, type ExecCommand } from "./exec.js";

const VALUED = new Set(["--command", "-c", "--timeout", "--reason", "--socket"]);

/** `--timeout` as commander's parseTimeout takes it; null where that would be a usage error. */
function seconds(value: string, max = Infinity): number | null {
  if (value.trim() === "") return null;
  const n = Number(value);
  return Number.isFinite(n) && n > 0 && n <= max ? Math.round(n * 1000) : null;
}

export function parseExecArgs(args: readonly string[], env: NodeJS.ProcessEnv = process.env): ExecCommand | null {
  let i = 0;
  let socket: string | undefined;
  // the program's one global option, before the subcommand
  const a0 = args[0];
  if (a0 === "--socket" && args.length > 1) {
    socket = args[1];
    i = 2;
  } else if (a0?.startsWith("--socket=")) {
    socket = a0.slice("--socket=".length);
    i = 1;
  }
  if (args[i] !== "exec") return null;
  i += 1;
  const seen = new Set<string>();
  const positional: string[] = [];
  const c: Partial<ExecCommand> = {};
  let rest: string[] | null = null;
  for (; i < args.length; i++) {
    const a = args[i]!;
    if (a === "--") {
      rest = args.slice(i + 1);
      break;
    }
    if (!a.startsWith("-") || a === "-") {
      positional.push(a);
      continue;
    }
    const eq = a.startsWith("--") ? a.indexOf("=") : -1;
    const name = eq > 0 ? a.slice(0, eq) : a;
    const key = name === "-c" ? "--command" : name;
    if (seen.has(key)) return null;
    seen.add(key);
    let value: string | undefined;
    if (VALUED.has(name)) {
      if (eq > 0) value = a.slice(eq + 1);
      else {
        value = args[i + 1];
        // commander would take an option-looking word as the value, or say the value is missing
        if (value === undefined || value.startsWith("-")) return null;
        i += 1;
      }
    } else if (eq > 0 && name !== "--wait-approval") return null;
    switch (key) {
      case "--command":
        c.command = value!;
        break;
      case "--timeout": {
        const ms = seconds(value!);
        if (ms === null) return null;
        c.timeoutMs = ms;
        break;
      }
      case "--reason":
        c.reason = value!;
        break;
      case "--json":
        c.json = true;
        break;
      case "--wait-approval": {
        if (eq > 0) {
          const ms = seconds(a.slice(eq + 1), 3600);
          if (ms === null) return null;
          c.waitApprovalMs = ms;
        } else {
          // an optional value: commander takes the next word when it is not an option; that form goes to commander
          const next = args[i + 1];
          if (next !== undefined && !next.startsWith("-")) return null;
          c.waitApprovalMs = DEFAULT_WAIT_APPROVAL_MS;
        }
        break;
      }
      default:
        // --help, --socket after the subcommand, anything unknown: commander's to answer
        return null;
    }
  }
  const [id, ...words] = positional;
  if (id === undefined) return null;
  const argv = [...words, ...(rest ?? [])];
  // exactly one of argv and --command (commander's action says which is wrong)
  if ((argv.length > 0) === (c.command !== undefined)) return null;
  return { ...c, socket: clientSocket(socket, env), id, ...(c.command === undefined ? { argv } : {}) };
}
