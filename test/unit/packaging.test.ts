/**
 * The systemd unit under packaging/ passes systemd's own checker, and says
 * what the daemon needs: the engine first, root, 0700 runtime and state dirs.
 */
import { execFile } from "node:child_process";
import { existsSync } from "node:fs";
import { readFile } from "node:fs/promises";
import path from "node:path";
import { promisify } from "node:util";
import { describe, expect, it } from "vitest";

const ROOT = path.resolve(import.meta.dirname, "../..");
const UNIT = path.join(ROOT, "packaging", "sandboxd.service");
const analyze = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"].find((p) => existsSync(p));

describe("packaging/sandboxd.service", () => {
  it.skipIf(!analyze)("passes systemd-analyze verify", async () => {
    const { stderr } = await promisify(execFile)(analyze!, ["verify", UNIT]);
    expect(stderr).not.toMatch(/sandboxd\.service/);
  });

  it("starts after the engine, as root, with private runtime and state dirs, reloads with SIGHUP", async () => {
    const unit = await readFile(UNIT, "utf8");
    expect(unit).toMatch(/^Requires=docker\.service$/m);
    expect(unit).toMatch(/^After=docker\.service$/m);
    expect(unit).toMatch(/^ExecStart=\S+node \S+dist\/cli\/main\.js start$/m);
    expect(unit).toMatch(/^ExecReload=\/bin\/kill -HUP \$MAINPID$/m);
    expect(unit).toMatch(/^RuntimeDirectoryMode=0700$/m);
    expect(unit).toMatch(/^StateDirectoryMode=0700$/m);
    expect(unit).toMatch(/^EnvironmentFile=-\/etc\/sandboxd\/sandboxd\.env$/m);
  });
});
