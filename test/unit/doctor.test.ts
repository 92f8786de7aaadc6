import { describe, expect, it } from "vitest";
import { engineChecks, formatChecks, runcVerdict } from "../../src/cli/doctor.js";

describe("doctor: runc and CVE-2024-21626", () => {
  it.each([
    ["1.1.11", "fail"],
    ["1.0.3", "fail"],
    ["1.1.5+ds1", "fail"],
    ["1.1.5+ds1 (commit 1.1.5+ds1-1)", "fail"],
    ["1.1.12", "ok"],
    ["v1.1.13", "ok"],
    ["1.2.0", "ok"],
    ["1.1.5+ds1 (commit 1.1.5+ds1-1+deb12u1)", "ok"],
    ["1.1.5+ds1 (commit 1.1.5+ds1-1+deb12u2)", "ok"],
  ])("runc %s → %s", (version, status) => {
    expect(runcVerdict(version).status).toBe(status);
  });

  it("a failing runc says what to do", () => {
    const c = runcVerdict("1.1.4");
    expect(c.detail).toContain("CVE-2024-21626");
    expect(c.hint).toMatch(/1\.1\.12/);
  });

  it("an unknown runc is a warning, not a pass", () => {
    expect(runcVerdict(null).status).toBe("warn");
    expect(runcVerdict("weird").status).toBe("warn");
  });
});

describe("doctor: engine facts", () => {
  const facts = {
    version: "20.10.24",
    apiVersion: "1.41",
    runc: "1.1.12",
    cgroupVersion: "1",
    cgroupDriver: "cgroupfs",
    securityOptions: ["name=seccomp,profile=default"],
  };
  it("no seccomp filter fails", () => {
    const checks = engineChecks({ ...facts, securityOptions: [] });
    expect(checks.find((c) => c.name === "seccomp")?.status).toBe("fail");
  });
  it("seccomp present passes; no AppArmor only warns", () => {
    const checks = engineChecks(facts);
    expect(checks.find((c) => c.name === "seccomp")?.status).toBe("ok");
    expect(checks.find((c) => c.name === "apparmor")?.status).toBe("warn");
  });
  it("the listing prints hints for what is not ok only", () => {
    const text = formatChecks(engineChecks({ ...facts, runc: "1.1.4" }));
    expect(text).toMatch(/^FAIL {2}runc/m);
    expect(text).toMatch(/hint: upgrade runc/);
    expect(text).not.toMatch(/ok .*\n\s+hint/);
  });
});
