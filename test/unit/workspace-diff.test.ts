/**
 * diffChangeSet: two real directories stand for the accepted project and the
 * phase's view; text hunks are checked against `git diff --no-index` on the
 * same files.
 */
import { execFileSync, spawnSync } from "node:child_process";
import { chmodSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { FileChange } from "../../src/workspace/changes.js";
import { diffChangeSet, quotePath, renderUnifiedDiff, type DiffSource, type FileVersion } from "../../src/workspace/diff.js";

let root: string;
let oldDir: string;
let newDir: string;

function version(dir: string, p: string): FileVersion | null {
  const file = path.join(dir, p);
  try {
    const st = statSync(file);
    return { size: st.size, mode: st.mode & 0o7777, read: async () => readFileSync(file) };
  } catch {
    return null;
  }
}
const reads: string[] = [];
const source: DiffSource = {
  accepted: async (p) => {
    const v = version(oldDir, p);
    return v && { ...v, read: () => (reads.push(`old:${p}`), v.read()) };
  },
  view: async (p) => {
    const v = version(newDir, p);
    return v && { ...v, read: () => (reads.push(`new:${p}`), v.read()) };
  },
};

function put(dir: string, p: string, content: string | Buffer, mode = 0o644): void {
  mkdirSync(path.dirname(path.join(dir, p)), { recursive: true });
  writeFileSync(path.join(dir, p), content);
  chmodSync(path.join(dir, p), mode);
}

/** the hunks git prints for two files (everything from the first @@) */
function gitHunks(a: string, b: string): string {
  const r = spawnSync("git", ["diff", "--no-index", "--no-color", a, b], { encoding: "utf8" });
  const text = r.stdout;
  // without git's function-context heading after the range ("@@ -2,7 +2,7 @@ line 1"), which a diff of a change set does not guess
  return text.slice(text.indexOf("@@")).replace(/^(@@ [^@]+ @@).*$/gm, "$1");
}

const change = (c: Partial<FileChange> & Pick<FileChange, "kind" | "path">): FileChange => ({ isDir: false, sizeBytes: 0, ...c });

beforeAll(() => {
  root = mkdtempSync(path.join(os.tmpdir(), "ws-diff-"));
  oldDir = path.join(root, "old");
  newDir = path.join(root, "new");
  const lines = Array.from({ length: 30 }, (_, i) => `line ${i + 1}`);
  put(oldDir, "services/risk.py", `${lines.join("\n")}\n`);
  put(newDir, "services/risk.py", `${lines.map((l, i) => (i === 4 ? "changed 5" : i === 24 ? "changed 25" : l)).join("\n")}\nappended`);
  put(newDir, "tests/test_risk.py", "def test_x():\n    assert True\n");
  put(oldDir, "services/gone.py", "x = 1\n");
  put(oldDir, "services/old_name.py", "same = True\n");
  put(newDir, "services/new_name.py", "same = True\n");
  put(oldDir, "services/a.py", "a = 1\nb = 2\n");
  put(newDir, "services/b.py", "a = 1\nb = 3\n");
  put(oldDir, "scripts/run.sh", "#!/bin/sh\n");
  put(newDir, "scripts/run.sh", "#!/bin/sh\n", 0o755);
  put(oldDir, "data/blob.bin", Buffer.from([1, 2, 0, 3]));
  put(newDir, "data/blob.bin", Buffer.from([1, 2, 0, 4]));
  put(newDir, "data/latin.txt", Buffer.from("caf\xe9\n", "latin1"));
  put(newDir, "data/huge.csv", "x".repeat(2000));
  put(newDir, "evil\nname.py", "x = 1\n");
  put(newDir, "trojan.py", "ok = 1\x1b[2K\rhidden = 2 \u202e# comment\n");
  return () => rmSync(root, { recursive: true, force: true });
});

afterAll(() => undefined);

describe("diffChangeSet", () => {
  it("modifies: unified hunks identical to git's", async () => {
    const d = await diffChangeSet({ changes: [change({ kind: "modify", path: "services/risk.py" })] }, source);
    const [head, ...rest] = d.split("@@");
    expect(head).toBe("diff --git a/services/risk.py b/services/risk.py\n--- a/services/risk.py\n+++ b/services/risk.py\n");
    expect(`@@${rest.join("@@")}`).toBe(gitHunks(path.join(oldDir, "services/risk.py"), path.join(newDir, "services/risk.py")));
    expect(d).toContain("\\ No newline at end of file");
  });

  it("creates and deletes against /dev/null with the file mode", async () => {
    const d = await diffChangeSet({ changes: [change({ kind: "create", path: "tests/test_risk.py", mode: 0o644 }), change({ kind: "delete", path: "services/gone.py" })] }, source);
    expect(d).toBe(
      [
        "diff --git a/services/gone.py b/services/gone.py",
        "deleted file mode 100644",
        "--- a/services/gone.py",
        "+++ /dev/null",
        "@@ -1 +0,0 @@",
        "-x = 1",
        "diff --git a/tests/test_risk.py b/tests/test_risk.py",
        "new file mode 100644",
        "--- /dev/null",
        "+++ b/tests/test_risk.py",
        "@@ -0,0 +1,2 @@",
        "+def test_x():",
        "+    assert True",
        "",
      ].join("\n"),
    );
    // the same hunks as git
    expect(d.slice(d.indexOf("@@ -0,0"))).toBe(gitHunks("/dev/null", path.join(newDir, "tests/test_risk.py")));
  });

  it("shows a rename as a rename, with hunks only when the content changed", async () => {
    const pure = await diffChangeSet({ changes: [change({ kind: "rename", from: "services/old_name.py", path: "services/new_name.py" })] }, source);
    expect(pure).toBe("diff --git a/services/old_name.py b/services/new_name.py\nrename from services/old_name.py\nrename to services/new_name.py\n");
    const edited = await diffChangeSet({ changes: [change({ kind: "rename", from: "services/a.py", path: "services/b.py" })] }, source);
    expect(edited).toBe(
      "diff --git a/services/a.py b/services/b.py\nrename from services/a.py\nrename to services/b.py\n--- a/services/a.py\n+++ b/services/b.py\n@@ -1,2 +1,2 @@\n a = 1\n-b = 2\n+b = 3\n",
    );
  });

  it("shows a mode change", async () => {
    const d = await diffChangeSet({ changes: [change({ kind: "modify", path: "scripts/run.sh", modeOnly: true, mode: 0o755 })] }, source);
    expect(d).toBe("diff --git a/scripts/run.sh b/scripts/run.sh\nold mode 100644\nnew mode 100755\n");
  });

  it("summarises binary files, non-UTF-8 files and files over the cap (the latter never read)", async () => {
    reads.length = 0;
    const d = await diffChangeSet(
      {
        changes: [
          change({ kind: "modify", path: "data/blob.bin" }),
          change({ kind: "create", path: "data/latin.txt" }),
          change({ kind: "create", path: "data/huge.csv", sizeBytes: 2000 }),
        ],
      },
      source,
      { maxBytes: 1000 },
    );
    expect(d).toContain("Binary files a/data/blob.bin and b/data/blob.bin differ");
    expect(d).toContain("Binary files /dev/null and b/data/latin.txt differ");
    expect(d).toContain("diff --git a/data/huge.csv b/data/huge.csv\nnew file mode 100644\nFile too large to show: absent → 2000 bytes (diff cap 1000 bytes)\n");
    expect(reads).not.toContain("new:data/huge.csv");
  });

  it("quotes paths with control characters as git does, and escapes control characters and bidi overrides in content", async () => {
    const d = await diffChangeSet({ changes: [change({ kind: "create", path: "evil\nname.py" }), change({ kind: "create", path: "trojan.py" })] }, source);
    expect(d).toContain('diff --git "a/evil\\nname.py" "b/evil\\nname.py"');
    expect(d).toContain('+++ "b/evil\\nname.py"');
    expect(d).toContain("+ok = 1\\x1b[2K\\rhidden = 2 \\u{202e}# comment");
    // every line of the diff is one line: nothing in it can move the cursor or reorder text
    expect(d).not.toMatch(/[\u0000-\u0008\u000b-\u001f\u007f\u202e]/);
    expect(quotePath('a"b\\c')).toBe('"a\\"b\\\\c"');
    expect(quotePath("\u0085x")).toBe('"\\302\\205x"');
    expect(quotePath("café.py")).toBe("café.py");
  });

  it("names deleted and renamed directories; skips created ones", async () => {
    const d = await diffChangeSet(
      {
        changes: [
          change({ kind: "delete", path: "services/legacy", isDir: true }),
          change({ kind: "rename", from: "lib", path: "pkg", isDir: true }),
          change({ kind: "create", path: "newdir", isDir: true }),
        ],
      },
      source,
    );
    expect(d).toBe("Directory renamed: lib → pkg\nDirectory services/legacy deleted (with everything in it)\n");
  });

  it("renders bytes already read the same way (renderUnifiedDiff)", async () => {
    const changes: FileChange[] = [
      change({ kind: "rename", from: "services/a.py", path: "services/b.py" }),
      change({ kind: "create", path: "tests/test_risk.py", mode: 0o644 }),
      change({ kind: "modify", path: "data/blob.bin" }),
    ];
    const read = (dir: string, p: string) => readFileSync(path.join(dir, p));
    const viaSource = await diffChangeSet({ changes }, source);
    const viaBytes = renderUnifiedDiff([
      { change: changes[0]!, before: read(oldDir, "services/a.py"), after: read(newDir, "services/b.py"), beforeMode: 0o644 },
      { change: changes[1]!, before: null, after: read(newDir, "tests/test_risk.py") },
      { change: changes[2]!, before: read(oldDir, "data/blob.bin"), after: read(newDir, "data/blob.bin"), beforeMode: 0o644 },
    ]);
    expect(viaBytes).toBe(viaSource);
    expect(renderUnifiedDiff([{ change: change({ kind: "create", path: "big.txt" }), before: null, after: Buffer.alloc(50, "a") }], { maxBytes: 10 })).toContain(
      "File too large to show: absent → 50 bytes (diff cap 10 bytes)",
    );
  });

  it("is empty for an empty change set", async () => {
    expect(await diffChangeSet({ changes: [] }, source)).toBe("");
  });

  it("git itself shows the same rename headers", () => {
    // git's own output for a rename, as the reference for the header lines used above
    const repo = path.join(root, "repo");
    mkdirSync(repo);
    const git = (...args: string[]) => execFileSync("git", ["-c", "user.email=t@t", "-c", "user.name=t", ...args], { cwd: repo, encoding: "utf8" });
    git("init", "-q");
    writeFileSync(path.join(repo, "old_name.py"), "same = True\n");
    git("add", "-A");
    git("commit", "-qm", "x");
    git("mv", "old_name.py", "new_name.py");
    const out = git("diff", "--cached", "-M");
    expect(out).toContain("rename from old_name.py\nrename to new_name.py\n");
  });
});
