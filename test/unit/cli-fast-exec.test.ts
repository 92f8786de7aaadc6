/**
 * The CLI's hot path: `sandboxd exec` read straight from argv (exec-args.ts)
 * and run from the bundle alone (dist/cli/main.cjs), without commander or
 * any daemon code; every form it does not take goes to the full command line.
 */
import { execFile } from "node:child_process";
import { copyFile, mkdtemp, rm } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { promisify } from "node:util";
import { afterAll, describe, expect, it } from "vitest";
import { parseExecArgs } from "../../src/cli/exec-args.js";
import { FrameReader, StreamFrame, frameHeader } from "../../src/frames.js";
import { CLI_BUNDLE } from "../helpers/sandbox.js";

const env = { SANDBOXD_SOCKET: "/run/s.sock" } as NodeJS.ProcessEnv;
const parse = (...args: string[]) => parseExecArgs(args, env);

describe("exec-args: the forms the hot path takes, as commander reads them", () => {
  it("reads the id, the command after -- and the options before it", () => {
    expect(parse("exec", "ph_0123456789ab", "--", "pytest", "-q")).toEqual({ socket: "/run/s.sock", id: "ph_0123456789ab", argv: ["pytest", "-q"] });
    expect(parse("--socket", "/x.sock", "exec", "ph_1", "--timeout", "2.5", "--reason", "why -- not", "--json", "--", "true")).toEqual({
      socket: "/x.sock",
      id: "ph_1",
      argv: ["true"],
      timeoutMs: 2500,
      reason: "why -- not",
      json: true,
    });
    expect(parse("--socket=/y.sock", "exec", "--timeout=1", "ph_1", "-c", "ls -la")).toEqual({ socket: "/y.sock", id: "ph_1", command: "ls -la", timeoutMs: 1000 });
    // words before -- are the command's too (commander's variadic argument), and -- may be followed by option-like words
    expect(parse("exec", "ph_1", "echo", "a", "--", "--b")?.argv).toEqual(["echo", "a", "--b"]);
    expect(parse("exec", "ph_1", "--wait-approval", "--", "x")?.waitApprovalMs).toBe(600_000);
    expect(parse("exec", "ph_1", "--wait-approval=300", "--", "x")?.waitApprovalMs).toBe(300_000);
  });

  it("leaves every other form to commander: help, unknown or repeated options, bad values, a missing id or command", () => {
    for (const args of [
      ["ps"],
      ["exec"],
      ["exec", "ph_1"],
      ["exec", "--help"],
      ["exec", "ph_1", "-h", "--", "x"],
      ["exec", "ph_1", "pytest", "-q"], // commander says: put the command after --
      ["exec", "ph_1", "--timeout", "0", "--", "x"],
      ["exec", "ph_1", "--timeout", "abc", "--", "x"],
      ["exec", "ph_1", "--timeout", "", "--", "x"],
      ["exec", "ph_1", "--timeout", "--", "x"],
      ["exec", "ph_1", "--timeout", "1", "--timeout", "2", "--", "x"],
      ["exec", "ph_1", "--wait-approval", "30", "--", "x"], // an optional value: commander's reading
      ["exec", "ph_1", "--wait-approval=3601", "--", "x"],
      ["exec", "ph_1", "-c", "ls", "--", "x"], // both a string and argv
      ["exec", "ph_1", "--json=1", "--", "x"],
      ["exec", "ph_1", "--socket", "/z", "--", "x"], // the global option after the subcommand
      ["--socket", "/z", "--json", "exec", "ph_1", "--", "x"],
    ]) {
      expect(parse(...args), args.join(" ")).toBeNull();
    }
  });
});

describe("the byte stream's frames", () => {
  it("are read whole however the bytes are split, a payload inside one chunk without a copy; unknown kinds pass through", () => {
    const events = Buffer.from(JSON.stringify({ type: "exit" }));
    const out = Buffer.from("out é");
    const wire = Buffer.concat([frameHeader(StreamFrame.Stdout, out.length), out, frameHeader(9, 3), Buffer.from("new"), frameHeader(StreamFrame.Event, events.length), events]);
    for (let i = 0; i <= wire.length; i++) {
      for (let k = i; k <= wire.length; k += 5) {
        const r = new FrameReader();
        const frames = [...r.push(wire.subarray(0, i)), ...r.push(wire.subarray(i, k)), ...r.push(wire.subarray(k))];
        expect(frames.map((f) => [f.kind, f.payload.toString()])).toEqual([
          [StreamFrame.Stdout, "out é"],
          [9, "new"],
          [StreamFrame.Event, '{"type":"exit"}'],
        ]);
        expect(r.pending).toBe(0);
      }
    }
    const r = new FrameReader();
    const [f] = r.push(wire);
    expect(f!.payload.buffer).toBe(wire.buffer);
    expect(() => new FrameReader().push(frameHeader(2, 0xffffffff))).toThrow(/not a sandboxd frame stream/);
  });
});

describe("the bundle runs exec by itself", () => {
  const dirs: string[] = [];
  afterAll(async () => {
    for (const d of dirs) await rm(d, { recursive: true, force: true });
  });

  it("exec needs nothing beside dist/cli/main.cjs (no commander, no command tree); other commands load them", async () => {
    const dir = await mkdtemp(path.join(os.tmpdir(), "sbx-cli-alone-"));
    dirs.push(dir);
    const alone = path.join(dir, "main.cjs");
    await copyFile(CLI_BUNDLE, alone);
    const run = (args: string[]) =>
      promisify(execFile)(process.execPath, [alone, "--socket", path.join(dir, "none.sock"), ...args]).then(
        () => ({ code: 0, stderr: "" }),
        (e: { code: number; stderr: string }) => ({ code: e.code, stderr: e.stderr }),
      );
    const exec = await run(["exec", "ph_0123456789ab", "--timeout", "5", "--", "true"]);
    expect(exec.stderr).toMatch(/cannot reach the sandboxd daemon at .*none\.sock \(ENOENT\) \[SBX_ERR_DAEMON_UNREACHABLE\]/);
    expect(exec.code).toBe(125);
    // a form only commander reads: the command tree is not there to load
    const other = await run(["exec", "ph_0123456789ab", "pytest", "-q"]);
    expect(other.stderr).toMatch(/program\.js/);
    expect(other.code).not.toBe(0);
  });
});
