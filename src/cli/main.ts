#!/usr/bin/env node
/**
 * The sandboxd command line: the daemon (`start`) and its operator client.
 *
 * Exit codes: 0 success; 1 an error sandboxd reported (code and hint on
 * stderr); 2 bad usage. `exec` exits with the command's own code, 124 when
 * the command was killed at its timeout, 126 when policy refused it, 125 when
 * sandboxd itself failed, 128+N when the command died of signal N.
 */
import { Argument, Command, Option, InvalidArgumentError } from "commander";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { SandboxdError } from "../errors.js";
import { clientSocket, resolveSettings } from "../config/settings.js";
import type { ExecResult } from "../phases/manager.js";
import type { PhaseView } from "../phases/types.js";
import type { Approval } from "../approvals/queue.js";
import { escapeControl, quoteArgv } from "../audit/format.js";
import type { AuditRecord } from "../audit/journal.js";
import { VERSION } from "../version.js";
import { ApiClient } from "./client.js";
import { EXIT, exitCodeFor } from "./exit-codes.js";
import { renderRecord } from "./render.js";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..");

class CliExit extends Error {
  constructor(readonly code: number) {
    super(`exit ${code}`);
  }
}

/** Text for a terminal: invisible characters escaped line by line (a message may hold a command from the sandbox). */
function visible(text: string): string {
  return text.split("\n").map(escapeControl).join("\n");
}

function printError(err: unknown): void {
  if (err instanceof SandboxdError) {
    process.stderr.write(visible(`sandboxd: ${err.message} [${err.code}]\n  hint: ${err.hint}`) + "\n");
  } else {
    process.stderr.write(visible(`sandboxd: ${(err as Error).message ?? String(err)}`) + "\n");
  }
}

function client(cmd: Command): ApiClient {
  const opts = cmd.optsWithGlobals<{ socket?: string }>();
  return new ApiClient(clientSocket(opts.socket));
}

function printJson(value: unknown): void {
  process.stdout.write(JSON.stringify(value, null, 2) + "\n");
}

function age(iso: string): string {
  const s = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m`;
  if (s < 86400) return `${Math.floor(s / 3600)}h`;
  return `${Math.floor(s / 86400)}d`;
}

/**
 * Every human-facing listing goes through here: each cell is escaped
 * (src/audit/format.ts escapeControl: controls, ANSI escapes, bidi overrides,
 * separators), so a value from the sandbox cannot move the cursor, rewrite
 * what was printed or reorder the line. `--json` prints the values exactly.
 */
function table(input: string[][]): string {
  const rows = input.map((r) => r.map(escapeControl));
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => (r[i] ?? "").length)));
  return rows.map((r) => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]!))).join("  ")).join("\n") + "\n";
}

function printPhase(p: PhaseView): void {
  const lines = [
    ["id", p.id],
    ["phase", p.name],
    ["mode", p.mode],
    ["state", p.state],
    ["project", p.project],
    ["runs as", `${p.uid}:${p.gid}`],
    ["container", p.containerName],
    ["created", p.createdAt],
    ...(p.stoppedAt ? [["stopped", p.stoppedAt]] : []),
    ...(p.endReason ? [["end reason", p.endReason]] : []),
  ];
  process.stdout.write(table(lines.map(([k, v]) => [`${k}:`, v ?? ""])));
}

/** argv quoted (invisible characters as $'…' escapes), or the command string as given; escaped again by table() */
function approvalCommand(a: Approval): string {
  return a.argv ? quoteArgv(a.argv) : a.sql !== null && a.sql !== undefined ? `SQL: ${a.sql}` : (a.command ?? "");
}

function printApproval(a: Approval): void {
  const ext = a as Approval & { files?: Array<{ path: string; sha256: string | null }>; retries?: number; reasons?: string[] };
  const lines: Array<[string, string]> = [
    ["id", a.id],
    ["phase", a.phaseId],
    ["state", a.state],
    ["command", approvalCommand(a)],
    ...(a.argv ? [["argv", JSON.stringify(a.argv)] as [string, string]] : []),
    ["rule", `${a.ruleId} (${a.clause})`],
    ["policy says", a.policyReason],
    ["agent's reason", a.requestReason ?? "-"],
    ...(ext.reasons ?? []).map((r): [string, string] => ["later reason", r]),
    ...(ext.files ?? []).map((f): [string, string] => ["runs file", `${f.path} sha256:${f.sha256 ?? "(missing)"}`]),
    ["requested", a.requestedAt],
    ...(a.decidedAt ? [["decided", a.decidedAt] as [string, string]] : []),
    ...(a.note ? [["note", a.note] as [string, string]] : []),
    ...(a.usedAt ? [["used", a.usedAt] as [string, string]] : []),
  ];
  process.stdout.write(table(lines.map(([k, v]) => [`${k}:`, v])));
}

function parseTimeout(value: string): number {
  const n = Number(value);
  if (!Number.isFinite(n) || n <= 0) throw new InvalidArgumentError("give the timeout in seconds, a positive number (e.g. 30 or 0.5)");
  return Math.round(n * 1000);
}

function program(): Command {
  const prog = new Command("sandboxd")
    .description("Run autonomous coding agents' phases in disposable, policy-mediated Docker sandboxes.")
    .version(VERSION)
    .addOption(new Option("--socket <path>", "daemon socket (default: $SANDBOXD_SOCKET, /run/sandboxd/sandboxd.sock as root)"))
    .showHelpAfterError("(run with --help for usage)")
    .configureOutput({ outputError: (str, write) => write(`sandboxd: ${str.replace(/^error: /, "")}`) })
    .exitOverride();

  prog
    .command("start")
    .description("run the daemon in the foreground (SIGTERM or Ctrl-C stops it and its phases)")
    .option("--state-dir <dir>", "where phase records and audit logs live (default: $SANDBOXD_STATE_DIR, /var/lib/sandboxd as root)")
    .option("--policy <file>", "the policy every phase runs under (default: $SANDBOXD_POLICY, policies/default.yaml); SIGHUP re-reads it")
    .action(async (opts: { stateDir?: string; policy?: string }, cmd: Command) => {
      const { startDaemon } = await import("../daemon.js");
      const settings = resolveSettings({
        socket: cmd.optsWithGlobals<{ socket?: string }>().socket,
        stateDir: opts.stateDir,
        policy: opts.policy,
      });
      const daemon = await startDaemon(settings);
      process.on("SIGHUP", () => void daemon.reload());
      await new Promise<void>((resolve) => {
        let stopping = false;
        const stop = (sig: string) => {
          if (stopping) return;
          stopping = true;
          daemon.log.info({ signal: sig }, "signal received");
          daemon.close().then(resolve, (e: Error) => {
            daemon.log.error({ err: e.message }, "shutdown failed");
            resolve();
          });
        };
        process.once("SIGTERM", () => stop("SIGTERM"));
        process.once("SIGINT", () => stop("SIGINT"));
      });
    });

  prog
    .command("doctor")
    .description("check the host: engine and runc versions, cgroups, seccomp/AppArmor, the sandbox image, socket and state-dir permissions, conntrack, disk")
    .option("--state-dir <dir>", "the state dir to check (default: $SANDBOXD_STATE_DIR, /var/lib/sandboxd as root)")
    .option("--json", "print the checks as JSON")
    .action(async (opts: { stateDir?: string; json?: boolean }, cmd: Command) => {
      const { default: Docker } = await import("dockerode");
      const doctor = await import("./doctor.js");
      const settings = resolveSettings({ socket: cmd.optsWithGlobals<{ socket?: string }>().socket, stateDir: opts.stateDir });
      const docker = new Docker();
      let engine: import("./doctor.js").DoctorInput["engine"];
      let imagePresent: boolean | null = null;
      try {
        const [version, info] = await Promise.all([docker.version(), docker.info() as Promise<Record<string, unknown>>]);
        const components = (version as { Components?: Array<{ Name: string; Version: string; Details?: { GitCommit?: string } }> }).Components ?? [];
        const runc = components.find((c) => c.Name.toLowerCase() === "runc");
        engine = {
          version: version.Version,
          apiVersion: version.ApiVersion,
          // Debian's packages carry their revision (which names a backported fix) only in the commit field
          runc: runc ? `${runc.Version}${runc.Details?.GitCommit && runc.Details.GitCommit !== runc.Version ? ` (commit ${runc.Details.GitCommit})` : ""}` : null,
          cgroupVersion: typeof info.CgroupVersion === "string" ? info.CgroupVersion : null,
          cgroupDriver: typeof info.CgroupDriver === "string" ? info.CgroupDriver : null,
          securityOptions: Array.isArray(info.SecurityOptions) ? (info.SecurityOptions as string[]) : [],
        };
        imagePresent = await docker
          .getImage(settings.image)
          .inspect()
          .then(
            () => true,
            () => false,
          );
      } catch (err) {
        engine = { error: (err as Error).message };
      }
      const checks = await doctor.hostChecks({
        engine,
        imagePresent,
        image: settings.image,
        stateDir: settings.stateDir,
        socket: settings.socket,
        isRoot: process.getuid?.() === 0,
        nodeVersion: process.version,
      });
      if (opts.json) printJson({ checks, ok: checks.every((c) => c.status !== "fail") });
      else process.stdout.write(doctor.formatChecks(checks));
      if (checks.some((c) => c.status === "fail")) throw new CliExit(EXIT.error);
    });

  const image = prog.command("image").description("manage the sandbox image");
  image
    .command("build")
    .description("build the sandbox image from sandbox/Dockerfile (creates an offline Debian base first when no registry is reachable)")
    .option("--tag <ref>", "image reference", process.env.SANDBOXD_IMAGE || "sandboxd-sandbox:latest")
    .option("--base <ref>", "base image (default debian:bookworm-slim, or the offline base when it cannot be pulled)")
    .option("--force", "rebuild even when the image is current")
    .option("--no-cache", "do not use the build cache")
    .option("--json", "print the result as JSON (progress still goes to stderr)")
    .action(async (opts: { tag: string; base?: string; force?: boolean; cache: boolean; json?: boolean }) => {
      const { default: Docker } = await import("dockerode");
      const img = await import("../runtime/image.js");
      const docker = new Docker();
      const log = (line: string) => process.stderr.write(line.endsWith("\n") ? line : line + "\n");
      const common = {
        tag: opts.tag,
        dockerfileDir: path.join(ROOT, "sandbox"),
        shimBundlePath: path.join(ROOT, "dist", "shim", "shim.cjs"),
        log,
      };
      if (opts.base || !opts.cache) {
        const base = await img.ensureBaseImage(docker, { base: opts.base ?? img.DEFAULT_BASE_IMAGE, log });
        const r = await img.buildSandboxImage(docker, { ...common, base, noCache: !opts.cache });
        if (opts.json) printJson({ tag: opts.tag, ...r });
        else process.stdout.write(`${opts.tag} built (image ${r.imageId.replace(/^sha256:/, "").slice(0, 12)})\n`);
      } else {
        const r = await img.ensureSandboxImage(docker, { ...common, force: opts.force ?? false });
        if (opts.json) printJson(r);
        else {
          const what = r.built ? (r.cached ? "rebuilt from the layer cache" : "built") : "already current: nothing to do (--force rebuilds)";
          process.stdout.write(`${r.tag} ${what} (image ${r.imageId.replace(/^sha256:/, "").slice(0, 12)}, base ${r.base})\n`);
        }
      }
    });

  const phase = prog.command("phase").description("start, inspect and stop phases");
  phase
    .command("start")
    .description("start a phase: a fresh sandbox container with the project mounted at /workspace")
    .argument("<project>", "the project directory")
    .requiredOption("--phase <name>", "the phase's name from the implementation plan, e.g. 2.3")
    .addOption(new Option("--mode <mode>", "backtest, paper or test").choices(["backtest", "paper", "test"]).makeOptionMandatory())
    .option("--policy <file>", "a stricter policy file for this phase (it can only narrow the daemon's policy)")
    .option("--json", "print the phase record as JSON")
    .action(async (project: string, opts: { phase: string; mode: string; policy?: string; json?: boolean }, cmd: Command) => {
      const { phase: p } = await client(cmd).request<{ phase: PhaseView }>("POST", "/v1/phases", {
        project: path.resolve(project),
        phase: opts.phase,
        mode: opts.mode,
        ...(opts.policy ? { policy: path.resolve(opts.policy) } : {}),
      });
      if (opts.json) printJson(p);
      else process.stdout.write(p.id + "\n");
    });
  phase
    .command("show")
    .description("show one phase")
    .argument("<id>", "phase id (ph_…) or the phase's name (e.g. 2.3) when one phase has it")
    .option("--json", "print JSON")
    .action(async (ref: string, opts: { json?: boolean }, cmd: Command) => {
      const api = client(cmd);
      const id = await resolvePhaseRef(api, ref);
      const { phase: p } = await api.request<{ phase: PhaseView }>("GET", `/v1/phases/${encodeURIComponent(id)}`);
      if (opts.json) printJson(p);
      else printPhase(p);
    });
  phase
    .command("stop")
    .description("stop a phase: end its commands, remove its container, keep its logs and audit trail")
    .argument("<id>", "phase id (ph_…) or the name of one running phase")
    .option("--json", "print the final phase record as JSON")
    .action(async (ref: string, opts: { json?: boolean }, cmd: Command) => {
      const api = client(cmd);
      const id = await resolvePhaseRef(api, ref, { runningOnly: true });
      const { phase: p } = await api.request<{ phase: PhaseView }>("DELETE", `/v1/phases/${encodeURIComponent(id)}`);
      if (opts.json) printJson(p);
      else process.stdout.write(`${p.id} ${p.state}\n`);
    });

  prog
    .command("ps")
    .description("list phases (running ones; --all for every phase on record)")
    .option("-a, --all", "include stopped and failed phases")
    .option("--json", "print JSON")
    .action(async (opts: { all?: boolean; json?: boolean }, cmd: Command) => {
      const { phases } = await client(cmd).request<{ phases: PhaseView[] }>("GET", "/v1/phases");
      const shown = opts.all ? phases : phases.filter((p) => p.state === "running" || p.state === "starting" || p.state === "stopping");
      if (opts.json) return printJson(shown);
      const rows = [["ID", "PHASE", "MODE", "STATE", "AGE", "RUNNING", "PROJECT"]];
      for (const p of shown) rows.push([p.id, p.name, p.mode, p.state, age(p.createdAt), String(p.runningExecs), p.project]);
      process.stdout.write(table(rows));
    });

  prog
    .command("exec")
    .description("run a command in a phase's sandbox, streaming its output; exits with the command's exit code")
    .argument("<id>", "phase id")
    .argument("[argv...]", "the command and its arguments (put them after --)")
    .option("-c, --command <string>", "a shell command string instead of argv; parsed and judged part by part (anything the parser cannot vouch for is refused)")
    .option("--timeout <seconds>", "kill the command after this many seconds (default 60; paper mode allows up to 300)", parseTimeout)
    .option("--reason <text>", "why the command is run (recorded in the audit trail)")
    .option("--json", "do not stream; print the result record as JSON when the command ends")
    .addHelpText(
      "after",
      "\nExit status: the command's own; 124 killed at its timeout; 126 refused by policy;\n125 sandboxd failed; 128+N the command died of signal N.\n\nExample:\n  sandboxd exec ph_0123456789ab --timeout 30 -- pytest -q tests/",
    )
    .action(async (id: string, argv: string[], opts: { timeout?: number; reason?: string; json?: boolean; command?: string }, cmd: Command) => {
      const api = client(cmd);
      if ((argv.length > 0) === (opts.command !== undefined)) {
        cmd.error("give the command either after -- as argv, or as --command \"STRING\" (not both)", { exitCode: EXIT.usage });
      }
      const body = { ...(opts.command !== undefined ? { command: opts.command } : { argv }), ...(opts.timeout ? { timeoutMs: opts.timeout } : {}), ...(opts.reason ? { reason: opts.reason } : {}) };
      const url = `/v1/phases/${encodeURIComponent(id)}/exec`;
      try {
        if (opts.json) {
          const { result } = await api.request<{ result: ExecResult }>("POST", url, body);
          printJson(result);
          throw new CliExit(exitCodeFor(result));
        }
        const res = await api.stream("POST", `${url}?stream=1`, body);
        const code = await followExecStream(res);
        throw new CliExit(code);
      } catch (err) {
        if (err instanceof CliExit) throw err;
        printError(err);
        const policy = err instanceof SandboxdError && (err.code === "SBX_ERR_POLICY_DENIED" || err.code === "SBX_ERR_POLICY_NEEDS_APPROVAL");
        throw new CliExit(policy ? EXIT.policy : EXIT.sandboxdFailed);
      }
    });

  const approvals = prog
    .command("approvals")
    .description("human approvals: commands the policy sends to a person (SKILLS.md: \"requires human approval\")");
  approvals
    .command("ls")
    .description("list pending approval requests (--all: with decided, used and expired ones)")
    .option("-a, --all", "include decided, used and expired requests")
    .option("--phase <id>", "only this phase's requests")
    .option("--json", "print JSON")
    .action(async (opts: { all?: boolean; phase?: string; json?: boolean }, cmd: Command) => {
      const q = new URLSearchParams();
      if (opts.all) q.set("all", "1");
      if (opts.phase) q.set("phase", opts.phase);
      const { approvals: list } = await client(cmd).request<{ approvals: Approval[] }>("GET", `/v1/approvals?${q.toString()}`);
      if (opts.json) return printJson(list);
      if (list.length === 0) {
        process.stdout.write(opts.all ? "no approval requests\n" : "no pending approval requests\n");
        return;
      }
      const rows = [["ID", "PHASE", "STATE", "REQUESTED", "RULE", "COMMAND"]];
      for (const a of list) {
        rows.push([a.id, a.phaseId, a.state, a.requestedAt, a.ruleId, approvalCommand(a)]);
      }
      process.stdout.write(table(rows));
    });
  approvals
    .command("show")
    .description("show one approval request in full: the exact command (invisible characters escaped), why, and the files it is bound to")
    .argument("<id>", "approval id (ap_…)")
    .option("--json", "print JSON (the exact values)")
    .action(async (id: string, opts: { json?: boolean }, cmd: Command) => {
      const { approval: a } = await client(cmd).request<{ approval: Approval }>("GET", `/v1/approvals/${encodeURIComponent(id)}`);
      if (opts.json) return printJson(a);
      printApproval(a);
    });
  for (const decision of ["approve", "deny"] as const) {
    approvals
      .command(decision)
      .description(
        decision === "approve"
          ? "approve a request: that exact command may then run once in its phase"
          : "deny a request: the command stays refused",
      )
      .argument("<id>", "approval id (ap_…)")
      .option("--note <text>", "why (recorded in the audit trail)")
      .option("--json", "print the decided request as JSON")
      .action(async (id: string, opts: { note?: string; json?: boolean }, cmd: Command) => {
        const { approval: a } = await client(cmd).request<{ approval: Approval }>(
          "POST",
          `/v1/approvals/${encodeURIComponent(id)}/${decision}`,
          opts.note ? { note: opts.note } : {},
        );
        if (opts.json) return printJson(a);
        process.stdout.write(`${a.id} ${a.state}\n`);
      });
  }

  const audit = prog.command("audit").description("read and verify the audit trail (audit.jsonl: hash-chained, one record per event)");
  audit
    .command("tail")
    .description("print the latest audit records (-f: keep printing as they are written)")
    .option("--phase <id>", "only this phase's records")
    .option("-n, --lines <n>", "how many records to print first", (v) => {
      const n = Number(v);
      if (!Number.isInteger(n) || n <= 0) throw new InvalidArgumentError("give a positive whole number");
      return n;
    }, 20)
    .option("-f, --follow", "keep printing new records until interrupted")
    .option("--json", "one JSON record per line, exactly as stored")
    .action(async (opts: { phase?: string; lines: number; follow?: boolean; json?: boolean }, cmd: Command) => {
      const q = new URLSearchParams({ last: String(opts.lines) });
      if (opts.phase) q.set("phase", opts.phase);
      const print = (r: AuditRecord) => process.stdout.write(opts.json ? JSON.stringify(r) + "\n" : renderRecord(r) + "\n");
      if (!opts.follow) {
        const { records } = await client(cmd).request<{ records: AuditRecord[] }>("GET", `/v1/audit?${q.toString()}`);
        records.forEach(print);
        return;
      }
      q.set("follow", "1");
      const res = await client(cmd).stream("GET", `/v1/audit?${q.toString()}`);
      let buf = "";
      for await (const chunk of res) {
        buf += (chunk as Buffer).toString("utf8");
        let nl: number;
        while ((nl = buf.indexOf("\n")) >= 0) {
          const line = buf.slice(0, nl);
          buf = buf.slice(nl + 1);
          if (line) print(JSON.parse(line) as AuditRecord);
        }
      }
    });
  audit
    .command("show")
    .description("print every audit record of one phase")
    .argument("<phase>", "phase id")
    .option("--json", "print the records as a JSON array")
    .action(async (phaseId: string, opts: { json?: boolean }, cmd: Command) => {
      const api = client(cmd);
      await api.request("GET", `/v1/phases/${encodeURIComponent(phaseId)}`); // 404 for an unknown phase
      const { records } = await api.request<{ records: AuditRecord[] }>("GET", `/v1/audit?phase=${encodeURIComponent(phaseId)}`);
      if (opts.json) return printJson(records);
      for (const r of records) process.stdout.write(renderRecord(r) + "\n");
    });
  audit
    .command("verify")
    .description("check the hash chain and its anchor: names the first bad record, or says the chain is intact up to N")
    .option("--state-dir <dir>", "verify the files in this state dir directly, without the daemon")
    .option("--json", "print the result as JSON")
    .action(async (opts: { stateDir?: string; json?: boolean }, cmd: Command) => {
      const { verifyJournal, describeVerifyResult } = await import("../audit/verify.js");
      const result = opts.stateDir
        ? await verifyJournal(path.resolve(opts.stateDir))
        : (await client(cmd).request<{ verify: Awaited<ReturnType<typeof verifyJournal>> }>("GET", "/v1/audit/verify")).verify;
      if (opts.json) printJson(result);
      else process.stdout.write(describeVerifyResult(result) + "\n");
      if (!result.ok) throw new CliExit(EXIT.error);
    });

  prog
    .command("logs")
    .description("print a phase's container logs (the shim's own log); -f follows them live")
    .argument("<id>")
    .option("-f, --follow", "keep printing as the container writes")
    .action(async (id: string, opts: { follow?: boolean }, cmd: Command) => {
      const res = await client(cmd).stream("GET", `/v1/phases/${encodeURIComponent(id)}/logs${opts.follow ? "?follow=1" : ""}`);
      for await (const chunk of res) process.stdout.write(chunk as Buffer);
    });

  prog
    .command("completion")
    .description("print a shell completion script: eval \"$(sandboxd completion bash)\" in ~/.bashrc (or zsh in ~/.zshrc)")
    .addArgument(new Argument("<shell>", "bash or zsh").choices(["bash", "zsh"]))
    .action(async (shell: "bash" | "zsh") => {
      const { bashCompletion, zshCompletion } = await import("./completion.js");
      process.stdout.write(shell === "bash" ? bashCompletion(prog) : zshCompletion(prog));
    });

  return prog;
}

/**
 * A phase named the way people name it: its id, or its name (e.g. 2.3) when
 * exactly one phase (one running phase, for stop) has that name.
 */
async function resolvePhaseRef(api: ApiClient, ref: string, opts: { runningOnly?: boolean } = {}): Promise<string> {
  if (/^ph_[0-9a-f]{12}$/.test(ref)) return ref;
  const { phases } = await api.request<{ phases: PhaseView[] }>("GET", "/v1/phases");
  const named = phases.filter((p) => p.name === ref && (!opts.runningOnly || p.state === "running"));
  const live = named.filter((p) => p.state === "running");
  const pick = live.length === 1 ? live : named;
  if (pick.length === 1) return pick[0]!.id;
  if (pick.length === 0) {
    throw new SandboxdError("SBX_ERR_PHASE_NOT_FOUND", `no ${opts.runningOnly ? "running " : ""}phase with id or name ${JSON.stringify(ref)}`, {
      hint: "`sandboxd ps --all` lists phases with their ids and names",
    });
  }
  throw new SandboxdError("SBX_ERR_VALIDATION", `${pick.length} phases are named ${JSON.stringify(ref)}: ${pick.map((p) => `${p.id} (${p.state})`).join(", ")}`, {
    hint: "give the phase's id instead",
  });
}

async function followExecStream(res: AsyncIterable<unknown>): Promise<number> {
  let buffered = "";
  let code: number = EXIT.sandboxdFailed;
  const handle = (line: string) => {
    if (!line) return;
    const ev = JSON.parse(line) as
      | { type: "stdout" | "stderr"; data: string }
      | { type: "exit"; result: ExecResult }
      | { type: "error"; error: { code: string; message: string; hint: string } };
    if (ev.type === "exit") {
      code = exitCodeFor(ev.result);
      if (ev.result.timedOut) process.stderr.write(`sandboxd: command killed after its timeout (${ev.result.durationMs} ms)\n`);
    } else if (ev.type === "error") {
      process.stderr.write(visible(`sandboxd: ${ev.error.message} [${ev.error.code}]\n  hint: ${ev.error.hint}`) + "\n");
      code = EXIT.sandboxdFailed;
    } else if (ev.type === "stdout") process.stdout.write(ev.data);
    else process.stderr.write(ev.data);
  };
  for await (const chunk of res) {
    buffered += (chunk as Buffer).toString("utf8");
    let nl: number;
    while ((nl = buffered.indexOf("\n")) >= 0) {
      handle(buffered.slice(0, nl));
      buffered = buffered.slice(nl + 1);
    }
  }
  handle(buffered);
  return code;
}

async function main(argv: string[]): Promise<number> {
  try {
    await program().parseAsync(argv);
    return 0;
  } catch (err) {
    if (err instanceof CliExit) return err.code;
    const ce = err as { code?: string; exitCode?: number };
    if (typeof ce.code === "string" && ce.code.startsWith("commander.")) {
      // help and version are not errors
      if (ce.code === "commander.helpDisplayed" || ce.code === "commander.version") return 0;
      // `sandboxd phase` without a subcommand shows the group's help as an error (exit code 1 from commander)
      if (ce.code === "commander.help") return ce.exitCode === 0 ? 0 : EXIT.usage;
      if (ce.code === "commander.unknownOption" && argv.slice(2).includes("exec") && !argv.includes("--")) {
        // `sandboxd exec ID pytest -q`: the command's own options were taken for sandboxd's
        process.stderr.write("  hint: put the command after --, e.g. `sandboxd exec ph_0123456789ab -- pytest -q tests/`\n");
      }
      return EXIT.usage;
    }
    printError(err);
    return EXIT.error;
  }
}

main(process.argv).then((code) => {
  process.exitCode = code;
});
