/**
 * The CLI's usage errors and conveniences, through the real CLI (and, for
 * names, the real daemon).
 */
import { execFile } from "node:child_process";
import { writeFile } from "node:fs/promises";
import path from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { CLI, cli, makeProject, removeDir, requireEngineAndImage, startTestDaemon, tempDir, type TestDaemon } from "../helpers/sandbox.js";

let d: TestDaemon;
const dirs: string[] = [];
beforeAll(async () => {
  await requireEngineAndImage();
  d = await startTestDaemon();
});
afterAll(async () => {
  await d?.close();
  for (const x of dirs) await removeDir(x);
});

describe("usage errors say what to do", () => {
  it("a command group without its subcommand is a usage error (2) showing the group's help", async () => {
    const r = await cli(["phase"], { socket: d.socket });
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/Usage: sandboxd phase/);
    expect(r.stderr).toMatch(/start .*<project>/);
  });

  it("`exec ID pytest -q` without -- names the fix", async () => {
    const r = await cli(["exec", "ph_0123456789ab", "pytest", "-q"], { socket: d.socket });
    expect(r.code).toBe(2);
    expect(r.stderr).toContain("unknown option '-q'");
    expect(r.stderr).toMatch(/hint: put the command after --/);
  });

  it("`--help` is not an error", async () => {
    expect((await cli(["phase", "--help"])).code).toBe(0);
  });
});

describe("phases by name", () => {
  it("phase show and stop take the phase's name when one phase has it; an unknown name says where to look", async () => {
    const project = await makeProject();
    dirs.push(project);
    const started = await cli(["phase", "start", project, "--phase", "9.4-names", "--mode", "test"], { socket: d.socket });
    expect(started.code).toBe(0);
    const id = started.stdout.trim();
    const shown = await cli(["phase", "show", "9.4-names", "--json"], { socket: d.socket });
    expect(JSON.parse(shown.stdout).id).toBe(id);
    const missing = await cli(["phase", "show", "no-such-phase"], { socket: d.socket });
    expect(missing.code).toBe(1);
    expect(missing.stderr).toMatch(/no phase with id or name "no-such-phase" \[SBX_ERR_PHASE_NOT_FOUND\]/);
    expect(missing.stderr).toMatch(/sandboxd ps --all/);
    const stopped = await cli(["phase", "stop", "9.4-names"], { socket: d.socket });
    expect(stopped.stdout).toBe(`${id} stopped\n`);
  });
});

describe("shell completion", () => {
  it("bash: completes subcommands and options from the real command tree", async () => {
    const dir = await tempDir("compl");
    dirs.push(dir);
    const script = path.join(dir, "c.sh");
    await writeFile(script, (await cli(["completion", "bash"])).stdout);
    const probe = async (words: string[]) => {
      const line = `source ${script}; COMP_WORDS=(${words.map((w) => `'${w}'`).join(" ")}); COMP_CWORD=${words.length - 1}; _sandboxd; echo "\${COMPREPLY[@]}"`;
      const { stdout } = await promisify(execFile)("bash", ["-c", line], { env: { ...process.env, PATH: `${path.dirname(CLI)}:${process.env.PATH}` } });
      return stdout.trim().split(/\s+/);
    };
    expect(await probe(["sandboxd", "phase", "s"])).toEqual(["start", "show", "stop"]);
    expect(await probe(["sandboxd", "audit", "tail", "--f"])).toEqual(["--follow"]);
    expect(await probe(["sandboxd", "ap"])).toEqual(["approvals"]);
  });

  it("zsh: the same script through bashcompinit; an unknown shell is a usage error", async () => {
    const z = await cli(["completion", "zsh"]);
    expect(z.stdout).toMatch(/^#compdef sandboxd/);
    expect(z.stdout).toContain("bashcompinit");
    expect((await cli(["completion", "fish"])).code).toBe(2);
  });
});
