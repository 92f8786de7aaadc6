/**
 * The credential walk's cache (src/workspace/settings.ts): a folder whose
 * (dev, ino, mtime, ctime) are unchanged is not read again, and a credential
 * file the operator adds between two phase starts is never missed.
 */
import { execFileSync } from "node:child_process";
import { closeSync, mkdirSync, mkdtempSync, openSync, renameSync, rmSync, statSync, utimesSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { loadPolicy } from "../../src/policy/index.js";
import { clearCredentialScanCache, hiddenBelowRoot, lastCredentialScan } from "../../src/workspace/index.js";
import { swapFolders } from "../helpers/swap.js";

// a folder changed within 2 s of its read is read again next time (the kernel's coarse clock): the tests wait that out
const settle = () => new Promise((r) => setTimeout(r, 2100));

describe("the credential walk's cache", () => {
  let root: string;
  let project: string;
  beforeEach(() => {
    clearCredentialScanCache();
    root = mkdtempSync(path.join(os.tmpdir(), "sbx-credscan-"));
    project = path.join(root, "project");
    for (const d of ["config", "src/app/models", "src/app/views", "deploy", "tests"]) mkdirSync(path.join(project, d), { recursive: true });
    writeFileSync(path.join(project, "config", "app.yaml"), "x: 1\n");
    writeFileSync(path.join(project, "deploy", "server.key"), "KEY\n");
    writeFileSync(path.join(project, "src/app/models", "m.py"), "M = 1\n");
  });
  afterEach(() => rmSync(root, { recursive: true, force: true }));

  const walk = async () => hiddenBelowRoot(project, (await loadPolicy()).workspace);

  it("reads no unchanged folder twice, and finds what it found", async () => {
    const folders = 8; // the root and its 7 folders
    await settle();
    expect(await walk()).toEqual(["deploy/server.key"]);
    expect(lastCredentialScan()).toMatchObject({ read: folders, reused: 0 });
    expect(await walk()).toEqual(["deploy/server.key"]);
    expect(lastCredentialScan()).toMatchObject({ read: 0, reused: folders });
  }, 10_000);

  it("a config/.env added between two phase starts is hidden in the second, and only its folder is read again", async () => {
    await settle();
    expect(await walk()).toEqual(["deploy/server.key"]);
    await settle();
    expect(await walk()).toEqual(["deploy/server.key"]);
    writeFileSync(path.join(project, "config", ".env"), "DATABASE_URL=postgres://prod\n");
    expect(await walk()).toEqual(["config/.env", "deploy/server.key"]);
    expect(lastCredentialScan().read).toBe(1);
  }, 10_000);

  it("a walk of an unchanged project copies no cached record; a change three folders down copies only the three on its way", async () => {
    await settle();
    await walk();
    expect(await walk()).toEqual(["deploy/server.key"]);
    expect(lastCredentialScan()).toMatchObject({ read: 0, reused: 8, copied: 0 });
    writeFileSync(path.join(project, "src/app/views", ".env"), "A=1\n");
    expect(await walk()).toEqual(["deploy/server.key", "src/app/views/.env"]);
    // views/ read; the root, src/ and src/app/ copied to hold its new record; the rest shared
    expect(lastCredentialScan()).toMatchObject({ read: 1, reused: 7, copied: 3 });
    await settle();
    expect(await walk()).toEqual(["deploy/server.key", "src/app/views/.env"]); // views/ was racy: read once more
    expect(await walk()).toEqual(["deploy/server.key", "src/app/views/.env"]);
    expect(lastCredentialScan()).toMatchObject({ read: 0, copied: 0 });
  }, 15_000);

  it("a removed folder is gone from the next walk's records, and what changed beside it is found", async () => {
    await settle();
    await walk();
    rmSync(path.join(project, "deploy"), { recursive: true });
    writeFileSync(path.join(project, "tests", "id_rsa"), "KEY\n");
    await settle();
    expect(await walk()).toEqual(["tests/id_rsa"]);
    expect(await walk()).toEqual(["tests/id_rsa"]);
    expect(lastCredentialScan()).toMatchObject({ read: 0, reused: 7, copied: 0 }); // the root and its 6 folders left
  }, 15_000);

  it("two walks side by side on a changed project both find every credential file: one never changes the cached records the other reads", async () => {
    // bulk/ holds 50 folders with a .env each and 3,000 folders below them: enough that each walk yields (2 ms slices) and the two interleave
    for (let d = 0; d < 50; d++) {
      for (let e = 0; e < 60; e++) mkdirSync(path.join(project, "bulk", `d${d}`, `e${e}`), { recursive: true });
      writeFileSync(path.join(project, "bulk", `d${d}`, ".env"), "A=1\n");
    }
    const all = [...Array.from({ length: 50 }, (_, d) => `bulk/d${d}/.env`), "deploy/server.key"].sort();
    await settle();
    expect(await walk()).toEqual(all);
    // bulk/ itself changes (a new file): read anew; its 50 folders are unchanged, and each keeps its finding
    writeFileSync(path.join(project, "bulk", "notes.txt"), "n\n");
    await settle();
    const [a, b] = await Promise.all([walk(), walk()]);
    expect(lastCredentialScan().yields).toBeGreaterThan(0);
    expect(a).toEqual(all);
    expect(b).toEqual(all);
    expect(await walk()).toEqual(all);
    expect(lastCredentialScan()).toMatchObject({ read: 0, copied: 0 });
  }, 20_000);

  it("a folder's mtime set back after a credential file was added does not hide it (ctime moves)", async () => {
    const views = path.join(project, "src/app/views");
    const old = 1_600_000_000; // whole seconds: set back exactly
    utimesSync(views, old, old);
    await settle();
    await walk();
    writeFileSync(path.join(views, ".env"), "A=1\n");
    utimesSync(views, old, old);
    expect(statSync(views).mtimeMs).toBe(old * 1000);
    await settle(); // not racy any more: only the ctime can tell
    expect(await walk()).toContain("src/app/views/.env");
  }, 10_000);

  it("a folder renamed or replaced by another with a credential file is read anew", async () => {
    await settle();
    await walk();
    // another folder put in place of src/app/models, holding a key
    const other = path.join(project, "elsewhere");
    mkdirSync(other);
    writeFileSync(path.join(other, "id_rsa"), "KEY\n");
    rmSync(path.join(project, "src/app/models"), { recursive: true });
    renameSync(other, path.join(project, "src/app/models"));
    // and deploy/ moved under tests/
    renameSync(path.join(project, "deploy"), path.join(project, "tests", "deploy"));
    await settle();
    const found = await walk();
    expect(found).toContain("tests/deploy/server.key");
    expect(found).not.toContain("deploy/server.key");
    expect(found).toEqual(expect.arrayContaining([expect.stringMatching(/^src\/app\/models\//)]));
  }, 15_000);

  it("a folder swapped with another at its path between the walk's stat and its read (mv a a.old; mv a.new a) leaves no record of the one folder with the other's entries: once it did, and the next walks missed its credential files", async () => {
    // a/ holds 200 folders with a .env each, a2/ the same folders without: while a walk reads
    // them, a/ and a2/ swap names over and over (renameat2 RENAME_EXCHANGE in a loop)
    const n = 200;
    for (let i = 0; i < n; i++) {
      mkdirSync(path.join(project, "a", `b${i}`), { recursive: true });
      mkdirSync(path.join(project, "a2", `b${i}`), { recursive: true });
      writeFileSync(path.join(project, "a", `b${i}`, ".env"), "A=1\n");
    }
    const all = Array.from({ length: n }, (_, i) => `a/b${i}/.env`);
    await settle(); // the b folders are old: a record of one is trusted while its times hold
    for (let round = 0; round < 3; round++) {
      clearCredentialScanCache();
      const stop = await swapFolders(project, "a", "a2");
      try {
        await walk();
      } finally {
        await stop(); // a/ is the folder with the .env files again, a2/ the other
      }
      // read by path, each b folder had the stat of one and the entries of the other about a
      // third of the time: 30–80 of the 200 .env files were missing from here on
      const found = await walk();
      expect(all.filter((p) => !found.includes(p))).toEqual([]);
      expect(found.filter((p) => p.startsWith("a2/"))).toEqual([]);
    }
  }, 30_000);

  it("on a file system whose inode numbers a double cannot hold (overlayfs with xino), two folders made together are not taken for each other: once a swap of their parents left one's .env out", async () => {
    // the project on an overlay: lower on this disk, upper on a tmpfs (xino: the lower's inode
    // numbers get the layer in their top bits, past 2^53), folder renames as redirects
    const lower = path.join(root, "lower");
    const up = path.join(root, "up");
    const ov = path.join(root, "ov");
    const mountOverlay = () =>
      execFileSync("mount", ["-t", "overlay", "overlay", "-o", `lowerdir=${lower},upperdir=${up}/u,workdir=${up}/w,xino=on,redirect_dir=on`, ov]);
    // candidates: p0/b … p31/b. Two b folders are one double only when their inode numbers fall in one
    // step of 2048 at 2^63; ext4 gives folders made together near numbers, not always that near, so the
    // pair is found, not assumed (a and a2 alone fell 8,000 apart once)
    const candidates = Array.from({ length: 32 }, (_, i) => `p${i}`);
    for (const c of candidates) mkdirSync(path.join(lower, c, "b"), { recursive: true });
    mkdirSync(up);
    mkdirSync(ov);
    execFileSync("mount", ["-t", "tmpfs", "-o", "size=8m", "tmpfs", up]);
    try {
      mkdirSync(path.join(up, "u"));
      mkdirSync(path.join(up, "w"));
      mountOverlay();
      const byDouble = new Map<number, string>();
      let pair: [string, string] | undefined;
      try {
        for (const c of candidates) {
          const ino = statSync(path.join(ov, c, "b"), { bigint: true }).ino;
          const other = byDouble.get(Number(ino));
          if (other !== undefined) {
            pair = [other, c];
            break;
          }
          byDouble.set(Number(ino), c);
        }
      } finally {
        execFileSync("umount", [ov]);
      }
      if (!pair) throw new Error(`no two of ${candidates.length} folders made together have inode numbers one double apart: ${[...byDouble.keys()].join(", ")}`);
      const [a, a2] = pair;
      writeFileSync(path.join(lower, a2, "b", ".env"), "A=1\n");
      // both b folders' times set in one call (tar -xp does the same): equal to the double
      execFileSync("touch", ["-d", "2024-01-01", path.join(lower, a, "b"), path.join(lower, a2, "b")]);
      mountOverlay();
      try {
        const [x, y] = [statSync(path.join(ov, a, "b"), { bigint: true }), statSync(path.join(ov, a2, "b"), { bigint: true })];
        expect(x.ino).not.toBe(y.ino);
        // as numbers, Node's lstat: the same folder twice
        expect(statSync(path.join(ov, a, "b")).ino).toBe(statSync(path.join(ov, a2, "b")).ino);
        expect(statSync(path.join(ov, a, "b")).ctimeMs).toBe(statSync(path.join(ov, a2, "b")).ctimeMs);
        await settle();
        const scan = async () => hiddenBelowRoot(ov, (await loadPolicy()).workspace);
        expect(await scan()).toEqual([`${a2}/b/.env`]);
        // the two swap names (renames of their own: each b keeps its inode and times)
        renameSync(path.join(ov, a), path.join(ov, "t"));
        renameSync(path.join(ov, a2), path.join(ov, a));
        renameSync(path.join(ov, "t"), path.join(ov, a2));
        // a/b was taken from the cache as the a/b before (no .env): the .env was missed
        expect(await scan()).toEqual([`${a}/b/.env`]);
      } finally {
        execFileSync("umount", [ov]);
      }
    } finally {
      execFileSync("umount", [up]);
    }
  }, 15_000);

  it("a folder changed within the kernel's clock tick of its read is read again, not trusted", async () => {
    await walk(); // no settle: every folder is recent
    writeFileSync(path.join(project, "config", ".env"), "A=1\n");
    expect(await walk()).toContain("config/.env");
    expect(lastCredentialScan().reused).toBe(0);
  });

  it("a folder of 200k entries is read in batches: the event loop (other phases' commands) never waits the whole folder (one readdirSync held it 160–230 ms)", async () => {
    const big = path.join(project, "data");
    mkdirSync(big);
    for (let i = 0; i < 200_000; i++) closeSync(openSync(path.join(big, `f${i}.csv`), "w"));
    writeFileSync(path.join(big, "prod.pem"), "KEY\n");
    let last = performance.now();
    let worst = 0;
    const probe = setInterval(() => {
      const now = performance.now();
      worst = Math.max(worst, now - last);
      last = now;
    }, 1);
    try {
      expect(await walk()).toEqual(["data/prod.pem", "deploy/server.key"]);
    } finally {
      clearInterval(probe);
    }
    // Counted, not timed (a loaded machine slows the walk and so makes it yield more, never less):
    // the walk let the event loop in every 2 ms slice while it read and tested the folder's
    // 200k names. One readdirSync and one loop over the names (160–230 ms of CPU here) yielded
    // only between folders: a few times in all.
    const { yields } = lastCredentialScan();
    console.log(`200k-entry folder: the walk yielded ${yields} times; the longest wait of a 1 ms timer was ${worst.toFixed(1)} ms`);
    expect(yields).toBeGreaterThanOrEqual(20);
  }, 60_000);
});
