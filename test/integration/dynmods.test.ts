/**
 * The daemon turns favordynmods on for the host's cgroup v2 mount at start
 * (src/util/dynmods.ts): a command after an idle moment then does not wait a
 * kernel grace period for its cgroup move. Real mount, real daemon.
 */
import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { afterAll, describe, expect, it } from "vitest";
import { cgroup2Mount, favorDynmods } from "../../src/util/dynmods.js";
import { startTestDaemon } from "../helpers/sandbox.js";

const mount = () => cgroup2Mount(readFileSync("/proc/self/mounts", "utf8"));

/** favordynmods off: a remount with no options through mount(2) itself (mount(8) would keep the ones the mount has) */
function turnOff(root: string): void {
  execFileSync("python3", ["-c", "import ctypes, sys; libc = ctypes.CDLL(None, use_errno=True); sys.exit(0 if libc.mount(b'cgroup2', sys.argv[1].encode(), None, 32, b'') == 0 else ctypes.get_errno())", root]);
}

describe("favordynmods on the host's cgroup v2 mount", () => {
  const m = mount();
  // a host whose v2 hierarchy hands out controllers gives commands no cgroups of their own: nothing to test there
  const perCommand = m !== null && readFileSync(`${m.root}/cgroup.subtree_control`, "utf8").trim() === "";
  afterAll(async () => {
    // left on, as a daemon leaves it
    if (perCommand) await favorDynmods(true);
  });

  it.runIf(perCommand)("a daemon that starts on a host where it is off turns it on, and leaves it on when it stops", async () => {
    turnOff(m!.root);
    expect(mount()!.options).not.toContain("favordynmods");
    const d = await startTestDaemon();
    try {
      expect(mount()!.options).toContain("favordynmods");
    } finally {
      await d.close();
    }
    expect(mount()!.options).toContain("favordynmods");
  });
});
