import { describe, expect, it } from "vitest";
import { exitCodeFor } from "../../src/cli/exit-codes.js";
import { resolveSettings } from "../../src/config/settings.js";
import { ERRORS, SandboxdError } from "../../src/errors.js";

describe("settings", () => {
  it("takes flags over environment over defaults", () => {
    const s = resolveSettings({ socket: "/tmp/a.sock" }, { SANDBOXD_SOCKET: "/tmp/b.sock", SANDBOXD_STATE_DIR: "/tmp/st" });
    expect(s.socket).toBe("/tmp/a.sock");
    expect(s.stateDir).toBe("/tmp/st");
    expect(Object.isFrozen(s)).toBe(true);
  });

  it("reports every invalid setting at once", () => {
    let err: unknown;
    try {
      resolveSettings({ socket: "/tmp/" + "x".repeat(120) }, { SANDBOXD_IMAGE: "bad image!", SANDBOXD_LOG_LEVEL: "loud" });
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(SandboxdError);
    const e = err as SandboxdError;
    expect(e.code).toBe("SBX_ERR_CONFIG");
    expect(e.message).toMatch(/socket: .*104 bytes/);
    expect(e.message).toMatch(/image: /);
    expect(e.message).toMatch(/logLevel: /);
  });
});

describe("the warm pool's size", () => {
  it("is a small pool by default, 0 turns it off, anything but a whole number up to 16 is refused", () => {
    expect(resolveSettings({}, {}).poolSize).toBe(0);
    expect(resolveSettings({}, {}).poolMaxAgeSeconds).toBe(1800);
    expect(resolveSettings({}, { SANDBOXD_POOL_MAX_AGE: "60" }).poolMaxAgeSeconds).toBe(60);
    for (const bad of ["0", "-1", "1.5", "ten", "604801"]) {
      expect(() => resolveSettings({}, { SANDBOXD_POOL_MAX_AGE: bad }), bad).toThrow(/poolMaxAgeSeconds: SANDBOXD_POOL_MAX_AGE /);
    }
    expect(resolveSettings({}, { SANDBOXD_POOL_SIZE: "2" }).poolSize).toBe(2);
    expect(resolveSettings({}, { SANDBOXD_POOL_SIZE: "0" }).poolSize).toBe(0);
    for (const bad of ["two", "1.5", "-1", "17"]) {
      expect(() => resolveSettings({}, { SANDBOXD_POOL_SIZE: bad }), bad).toThrow(/poolSize/);
    }
  });
});

describe("the spare layer disk", () => {
  it("is kept by default; SANDBOXD_SPARE_LAYER=0 turns it off", () => {
    expect(resolveSettings({}, {}).spareLayer).toBe(true);
    expect(resolveSettings({}, { SANDBOXD_SPARE_LAYER: "0" }).spareLayer).toBe(false);
    expect(resolveSettings({}, { SANDBOXD_SPARE_LAYER: "1" }).spareLayer).toBe(true);
  });
});

describe("the default policy path", () => {
  it("is the same file whether the CLI or the policy loader names it", async () => {
    const settings = await import("../../src/config/settings.js");
    const load = await import("../../src/policy/load.js");
    expect(settings.DEFAULT_POLICY_FILE).toBe(load.DEFAULT_POLICY_FILE);
  });
});

describe("errors", () => {
  it("every code has a 4xx/5xx status and an actionable hint", () => {
    for (const [code, spec] of Object.entries(ERRORS)) {
      expect(code).toMatch(/^SBX_ERR_[A-Z_]+$/);
      expect(spec.status).toBeGreaterThanOrEqual(400);
      expect(spec.hint.length).toBeGreaterThan(15);
    }
    const e = new SandboxdError("SBX_ERR_PHASE_NOT_FOUND", "no phase with id ph_1");
    expect(e.toBody()).toEqual({ error: { code: "SBX_ERR_PHASE_NOT_FOUND", message: "no phase with id ph_1", hint: ERRORS.SBX_ERR_PHASE_NOT_FOUND.hint } });
  });
});

describe("exec exit codes", () => {
  it("maps results to the documented CLI statuses", () => {
    expect(exitCodeFor({ exitCode: 0, signal: null, timedOut: false })).toBe(0);
    expect(exitCodeFor({ exitCode: 3, signal: null, timedOut: false })).toBe(3);
    expect(exitCodeFor({ exitCode: null, signal: "SIGKILL", timedOut: true })).toBe(124);
    expect(exitCodeFor({ exitCode: null, signal: "SIGTERM", timedOut: false })).toBe(143);
    expect(exitCodeFor({ exitCode: null, signal: "SIGWHAT", timedOut: false })).toBe(125);
  });
});
