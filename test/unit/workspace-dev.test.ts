/**
 * The layer checks that the view reached a container by comparing its
 * st_dev with the container's mountinfo "major:minor": the two must be
 * decoded alike, including anonymous devices past minor 255 (overlays,
 * tmpfs — a busy host has hundreds).
 */
import { readFileSync, statSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { devString } from "../../src/workspace/layer.js";

/** Linux's new_encode_dev, as stat reports st_dev. */
const makedev = (major: number, minor: number) => (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & ~0xff) << 12);

describe("devString", () => {
  it("decodes st_dev as mountinfo writes it, past minor 255 too", () => {
    expect(devString(makedev(8, 1))).toBe("8:1");
    expect(devString(makedev(259, 3))).toBe("259:3");
    expect(devString(makedev(0, 274))).toBe("0:274"); // was "1048576:274"
    expect(devString(makedev(0, 70_000))).toBe("0:70000");
  });

  it("agrees with /proc/self/mountinfo for the mounts this process sees", () => {
    let checked = 0;
    for (const line of readFileSync("/proc/self/mountinfo", "utf8").split("\n")) {
      const f = line.split(" ");
      const mp = f[4];
      if (!mp || /\\/.test(mp)) continue;
      let dev: number;
      try {
        dev = statSync(mp).dev;
      } catch {
        continue;
      }
      // a later mount on the same point hides this one: compare only the top of each point
      const top = readFileSync("/proc/self/mountinfo", "utf8").split("\n").filter((l) => l.split(" ")[4] === mp).at(-1)!.split(" ")[2];
      expect(devString(dev), mp).toBe(top);
      checked += 1;
    }
    expect(checked).toBeGreaterThan(0);
  });
});
