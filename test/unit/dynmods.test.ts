/**
 * favordynmods on the cgroup v2 mount (src/util/dynmods.ts): when the daemon
 * turns it on, when it leaves the mount alone, and what `sandboxd doctor`
 * says of each.
 */
import { describe, expect, it } from "vitest";
import { dynmodsCheck } from "../../src/cli/doctor.js";
import { cgroup2Mount, favorDynmods, type DynmodsHost } from "../../src/util/dynmods.js";

const HYBRID = [
  "tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0",
  "cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0",
  "cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0",
].join("\n");

function fakeHost(opts: { mounts: string; controllers?: string; remount?: (root: string) => string | Error }): DynmodsHost & { remounts: string[] } {
  let mounts = opts.mounts;
  const remounts: string[] = [];
  return {
    remounts,
    mounts: async () => mounts,
    subtreeControl: async () => opts.controllers ?? "",
    remount: async (root) => {
      remounts.push(root);
      const r = opts.remount?.(root) ?? mounts.replace(`${root} cgroup2 rw,relatime`, `${root} cgroup2 rw,relatime,favordynmods`);
      if (r instanceof Error) throw r;
      mounts = r;
    },
  };
}

describe("favordynmods on the cgroup v2 mount", () => {
  it("reads the cgroup v2 mount and its options from /proc/self/mounts (a space in the path is \\040)", () => {
    expect(cgroup2Mount(HYBRID)).toEqual({ root: "/sys/fs/cgroup/unified", options: ["rw", "relatime"] });
    expect(cgroup2Mount("cgroup2 /a\\040b cgroup2 rw,nsdelegate,favordynmods 0 0")).toEqual({ root: "/a b", options: ["rw", "nsdelegate", "favordynmods"] });
    expect(cgroup2Mount("cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0")).toBeNull();
  });

  it("off where commands get cgroups of their own: remounted with it, and said so", async () => {
    const host = fakeHost({ mounts: HYBRID });
    expect(await favorDynmods(true, host)).toEqual({ state: "turned-on", root: "/sys/fs/cgroup/unified" });
    expect(host.remounts).toEqual(["/sys/fs/cgroup/unified"]);
    // once on, a second daemon finds it on and remounts nothing
    expect(await favorDynmods(true, host)).toEqual({ state: "on", root: "/sys/fs/cgroup/unified" });
    expect(host.remounts).toHaveLength(1);
  });

  it("SANDBOXD_CGROUP_FAVORDYNMODS=0 (enable false): the mount is left as it is", async () => {
    const host = fakeHost({ mounts: HYBRID });
    expect(await favorDynmods(false, host)).toEqual({ state: "off", root: "/sys/fs/cgroup/unified" });
    expect(host.remounts).toEqual([]);
  });

  it("a hierarchy that hands out controllers (no per-command cgroups there), or none at all: nothing is touched", async () => {
    const withControllers = fakeHost({ mounts: HYBRID, controllers: "cpu memory pids\n" });
    expect(await favorDynmods(true, withControllers)).toEqual({ state: "not-used", root: "/sys/fs/cgroup/unified" });
    const none = fakeHost({ mounts: "cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0" });
    expect(await favorDynmods(true, none)).toEqual({ state: "not-used", root: null });
    expect([...withControllers.remounts, ...none.remounts]).toEqual([]);
  });

  it("a remount that fails (not root), or that the kernel takes without the option (before 6.0): failed, with why", async () => {
    const denied = fakeHost({ mounts: HYBRID, remount: () => Object.assign(new Error("Command failed: mount"), { stderr: "mount: only root can use \"--options\" option\n" }) });
    expect(await favorDynmods(true, denied)).toEqual({ state: "failed", root: "/sys/fs/cgroup/unified", error: 'mount: only root can use "--options" option' });
    const ignored = fakeHost({ mounts: HYBRID, remount: () => HYBRID });
    const o = await favorDynmods(true, ignored);
    expect(o.state).toBe("failed");
    expect(o.error).toMatch(/does not show favordynmods/);
  });

  it("doctor: on is ok, off is a warning with the command that turns it on, not used is ok", () => {
    expect(dynmodsCheck({ state: "on", root: "/sys/fs/cgroup/unified" }).status).toBe("ok");
    const off = dynmodsCheck({ state: "off", root: "/sys/fs/cgroup/unified" });
    expect(off.status).toBe("warn");
    expect(off.hint).toContain("mount -o remount,favordynmods /sys/fs/cgroup/unified");
    expect(off.hint).toContain("SANDBOXD_CGROUP_FAVORDYNMODS=0");
    expect(dynmodsCheck({ state: "not-used", root: null })).toMatchObject({ status: "ok", detail: expect.stringMatching(/nothing moves/) });
  });
});
