/**
 * `sandboxd doctor` through the real CLI against the real engine.
 */
import { chmod, mkdir } from "node:fs/promises";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { TEST_IMAGE, cli, removeDir, tempDir } from "../helpers/sandbox.js";

const dirs: string[] = [];
afterAll(async () => {
  for (const d of dirs) await removeDir(d);
});

describe("sandboxd doctor", () => {
  it("checks the real engine, the image and the state dir, as JSON", async () => {
    const dir = await tempDir("doctor");
    dirs.push(dir);
    const state = path.join(dir, "state");
    await mkdir(state, { mode: 0o700 });
    const r = await cli(["--socket", path.join(dir, "none.sock"), "doctor", "--state-dir", state, "--json"], {});
    const out = JSON.parse(r.stdout) as { ok: boolean; checks: Array<{ name: string; status: string; detail: string }> };
    const by = new Map(out.checks.map((c) => [c.name, c]));
    expect(by.get("docker engine")?.status).toBe("ok");
    expect(by.get("sandbox image")?.detail).toBe(TEST_IMAGE);
    expect(by.get("state dir")?.status).toBe("ok");
    // built on this machine (cargo is here): the native exec client
    expect(by.get("exec client")).toMatchObject({ status: "ok", detail: expect.stringMatching(/dist\/native\/sandboxd-exec: the plain form/) });
    expect(r.code).toBe(out.ok ? 0 : 1);
  });

  it("a state dir others can read fails, with the chmod to run", async () => {
    const dir = await tempDir("doctor");
    dirs.push(dir);
    const state = path.join(dir, "state");
    await mkdir(state);
    await chmod(state, 0o755);
    const r = await cli(["--socket", path.join(dir, "none.sock"), "doctor", "--state-dir", state]);
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(/FAIL\s+state dir\s+.*mode 0755/);
    expect(r.stdout).toContain(`chmod 700 ${state}`);
  });
});
