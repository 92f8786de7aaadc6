import { constants } from "node:fs";
import { mkdtemp, readdir, readFile, readlink, rm } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { BuildLog } from "../../src/audit/buildlog.js";
import { actionLine, escapeControl, quoteArgv, redactLine, renderOutput, timestamp } from "../../src/audit/format.js";
import { Redactor } from "../../src/audit/redact.js";

const TS = timestamp(new Date(Date.UTC(2025, 0, 28, 14, 32, 1, 5)));

describe("build_audit.log format", () => {
  it("stamps ISO 8601 UTC with milliseconds", () => {
    expect(TS).toBe("2025-01-28T14:32:01.005Z");
  });

  it("renders the SKILLS.md action line", () => {
    expect(actionLine(TS, "SHELL", "EXEC", "pytest tests/test_risk.py", "PASS")).toBe(
      "[2025-01-28T14:32:01.005Z] [SHELL] [EXEC] [pytest tests/test_risk.py] [PASS]",
    );
  });

  it("a target cannot end its own field: `] [` in a file name is written with \\x20", () => {
    const line = actionLine(TS, "FILE", "CREATE", "x] [SUCCESS", "REFUSED workspace.atomic-modification");
    expect(line).toBe("[2025-01-28T14:32:01.005Z] [FILE] [CREATE] [x]\\x20[SUCCESS] [REFUSED workspace.atomic-modification]");
    expect(line.split("] [")).toHaveLength(5);
  });

  it("quotes argv so the displayed command is unambiguous", () => {
    expect(quoteArgv(["pytest", "-k", "a b", "it's", ""])).toBe(`pytest -k 'a b' 'it'\\''s' ''`);
  });

  it("escapes control characters, ANSI escapes and line separators", () => {
    expect(escapeControl("a\nb\r\tc\u001b[31m\u2028")).toBe("a\\nb\\r\\tc\\x1b[31m\\u2028");
  });

  it("escapes bidi overrides, zero-width and other format characters, and look-alike spaces", () => {
    expect(escapeControl("a\u202eb\u2066c\u200bd\ufeffe\u00adf\u00a0g\u{e0041}h")).toBe(
      "a\\u202eb\\u2066c\\u200bd\\ufeffe\\x00adf\\x00a0g\\U000e0041h".replace(/\\x00/g, "\\x"),
    );
    expect(escapeControl("plain ascii, é and 日本")).toBe("plain ascii, é and 日本");
  });

  it("quotes a word with an invisible character the $'…' way, exactly", () => {
    const attack = "rm -rf /workspace/x #\u001b[35Dpytest -q tests/\u001b[K";
    expect(quoteArgv(["sh", "-c", attack])).toBe(`sh -c $'rm -rf /workspace/x #\\x1b[35Dpytest -q tests/\\x1b[K'`);
    expect(quoteArgv(["a\rb", "it's\b\\"])).toBe(`$'a\\rb' $'it\\'s\\x08\\\\'`);
    expect(quoteArgv(["x\u202etxt.py"])).toBe(`$'x\\u202etxt.py'`);
  });

  it("renders multi-line output as indented continuation lines that cannot forge a record", () => {
    const lines = renderOutput(TS, "STDOUT", "one\n[2020-01-01T00:00:00.000Z] RETURN_CODE: 0\n\u001b[1mbold\n", 0);
    expect(lines).toEqual([
      `[${TS}] STDOUT: one`,
      "    | [2020-01-01T00:00:00.000Z] RETURN_CODE: 0",
      "    | \\x1b[1mbold",
    ]);
  });

  it("notes empty and truncated output", () => {
    expect(renderOutput(TS, "STDERR", "", 0)).toEqual([`[${TS}] STDERR: (empty)`]);
    expect(renderOutput(TS, "STDOUT", "x", 10)).toEqual([`[${TS}] STDOUT: x`, "    ~ [10 bytes not kept]"]);
    // head and tail: the daemon's own line (a prefix no output line has) stands where bytes were left out
    expect(renderOutput(TS, "STDOUT", "collected 900 items\ntests/a", 51094, "ssed\n== 3 failed, 897 passed ==\n")).toEqual([
      `[${TS}] STDOUT: collected 900 items`,
      "    | tests/a",
      "    ~ [51094 bytes not kept]",
      "    | ssed",
      "    | == 3 failed, 897 passed ==",
    ]);
  });
});

describe("BuildLog", () => {
  it("appends in call order, never truncates, and survives a failed append", async () => {
    const dir = await mkdtemp(path.join(os.tmpdir(), "sbx-log-"));
    const file = path.join(dir, "build_audit.log");
    try {
      const a = new BuildLog(file);
      await Promise.all(Array.from({ length: 50 }, (_, i) => a.append([`line ${i}`])));
      await a.close();
      await expect(a.append(["late"])).rejects.toThrow(/closed/);
      const b = new BuildLog(file); // reopen appends, does not truncate
      await b.append(["again"]);
      await b.close();
      const text = await readFile(file, "utf8");
      expect(text.split("\n").filter(Boolean)).toEqual([...Array.from({ length: 50 }, (_, i) => `line ${i}`), "again"]);
      const bad = new BuildLog(path.join(dir, "missing-dir", "x.log"));
      await expect(bad.append(["x"])).rejects.toThrow(/ENOENT/);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});

describe("BuildLog durability", () => {
  /** the flags (octal, as the kernel reports them) of this process's descriptors open on `file` */
  async function flagsOf(file: string): Promise<number[]> {
    const out: number[] = [];
    for (const fd of await readdir("/proc/self/fd")) {
      const target = await readlink(`/proc/self/fd/${fd}`).catch(() => "");
      if (target !== file) continue;
      const m = /^flags:\s+([0-7]+)$/m.exec(await readFile(`/proc/self/fdinfo/${fd}`, "utf8").catch(() => ""));
      if (m) out.push(Number.parseInt(m[1]!, 8));
    }
    return out;
  }

  it("writes O_DSYNC, opened either way: an append resolves once its bytes are durable, with no fdatasync of its own", async () => {
    const dir = await mkdtemp(path.join(os.tmpdir(), "sbx-log-"));
    try {
      const plain = path.join(dir, "a.log");
      const safe = path.join(dir, "b.log");
      const a = new BuildLog(plain);
      const b = await BuildLog.openSafely(safe);
      await a.append(["one"]);
      await b.append(["two"]);
      expect(constants.O_DSYNC).toBe(0o10000);
      for (const file of [plain, safe]) {
        const flags = await flagsOf(file);
        expect(flags).toHaveLength(1);
        expect(flags[0]! & constants.O_DSYNC).toBe(constants.O_DSYNC);
        expect(flags[0]! & constants.O_APPEND).toBe(constants.O_APPEND);
      }
      await a.close();
      await b.close();
      expect(await readFile(plain, "utf8")).toBe("one\n");
      expect(await readFile(safe, "utf8")).toBe("two\n");
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});

describe("redactLine keeps the daemon's structure", () => {
  const red = new Redactor(["quest", "SHELL", "APPROVAL"], { onWarning: () => undefined });
  it("scrubs only the text after the daemon's prefix", () => {
    const ts = "2026-01-28T14:32:01.123Z";
    expect(redactLine(actionLine(ts, "APPROVAL", "REQUEST", "psql -W quest", "ap_1 pending: quest"), red)).toBe(
      `[${ts}] [APPROVAL] [REQUEST] [psql -W [REDACTED]] [ap_1 pending: [REDACTED]]`,
    );
    expect(redactLine(`[${ts}] SHELL_EXEC: echo quest`, red)).toBe(`[${ts}] SHELL_EXEC: echo [REDACTED]`);
    expect(redactLine(`[${ts}] DB_QUERY [QuestDB]: SELECT 'quest'`, red)).toBe(`[${ts}] DB_QUERY [QuestDB]: SELECT '[REDACTED]'`);
    expect(redactLine("    | requests handled: 3; questdb ok", red)).toBe("    | requests handled: 3; questdb ok");
    expect(redactLine("    | SHELL quest", red)).toBe("    | [REDACTED] [REDACTED]");
    // a line of unknown shape is scrubbed whole
    expect(redactLine("quest SHELL", red)).toBe("[REDACTED] [REDACTED]");
  });
});
