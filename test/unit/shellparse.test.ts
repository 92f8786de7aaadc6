import { execFileSync } from "node:child_process";
import { chmodSync, existsSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { MAX_COMMAND_LENGTH, initShellParser, parseCommand } from "../../src/policy/shellparse.js";
import { unwrap } from "../../src/policy/wrappers.js";

/** the -c string of a shell argv (src/policy/wrappers.ts), or undefined */
function innerShellCommand(argv: string[]): string | undefined {
  const inner = unwrap(argv)?.inner[0];
  return inner?.kind === "script" ? inner.script : undefined;
}

/** [input, expected argv list | the reason a refusal must name] */
type Case = [string, string[][] | RegExp];

const ok = (...commands: string[][]): string[][] => commands;

const cases: Case[] = [
  // simple commands and the operators that join them
  ["pytest tests/", ok(["pytest", "tests/"])],
  ["pytest tests/ && black --check .", ok(["pytest", "tests/"], ["black", "--check", "."])],
  ["pytest || mypy services/", ok(["pytest"], ["mypy", "services/"])],
  ["pytest; isort --check-only .", ok(["pytest"], ["isort", "--check-only", "."])],
  ["pylint services/ | sort | head -n 5", ok(["pylint", "services/"], ["sort"], ["head", "-n", "5"])],
  ["pytest\nblack --check .\n", ok(["pytest"], ["black", "--check", "."])],
  ["  pytest   -q  ", ok(["pytest", "-q"])],
  ["pytest &&\n  black .", ok(["pytest"], ["black", "."])],
  ["pytest \\\n  tests/", ok(["pytest", "tests/"])],
  // comments
  ["pytest -q # run the tests", ok(["pytest", "-q"])],
  ["pytest;#c\nblack .", ok(["pytest"], ["black", "."])],
  ["pytest x#y", ok(["pytest", "x#y"])],
  // a line continuation glues `#` to the word before it: the shell runs `rm`
  ["pytest\\\n#; rm -rf /", /`#` the grammar reads as a comment but the shell may not/],
  ["# only a comment", /no command to run/],
  // quoting and escapes
  [`pytest "a b" 'c d'`, ok(["pytest", "a b", "c d"])],
  [`a"b"'c'd`, ok(["abcd"])],
  [`"py"test -q`, ok(["pytest", "-q"])],
  ["pytest a\\ b", ok(["pytest", "a b"])],
  [`pytest "it's" 'say "hi"'`, ok(["pytest", "it's", 'say "hi"'])],
  [`pytest "a\\"b\\\\c\\$d\\\`e"`, ok(["pytest", 'a"b\\c$d`e'])],
  [`pytest "a\\nb"`, ok(["pytest", "a\\nb"])],
  [`pytest "a\\\nb"`, ok(["pytest", "ab"])],
  ["pytest '$(id)' '`id`' '$HOME'", ok(["pytest", "$(id)", "`id`", "$HOME"])],
  ["pytest \\$HOME \\*", ok(["pytest", "$HOME", "*"])],
  [`python -c 'print("x")'`, ok(["python", "-c", 'print("x")'])],
  ["pytest a=b --x=y -- -n", ok(["pytest", "a=b", "--x=y", "--", "-n"])],
  ["pytest ''", ok(["pytest", ""])],
  // unicode
  [`python main.py --name "Zürich 🚀" ü`, ok(["python", "main.py", "--name", "Zürich 🚀", "ü"])],
  ["pytest\u00a0tests", /Unicode space or format character U\+00A0/],
  ["pytest\u200btests", /U\+200B/],
  // redirections
  ["pytest 2>&1", ok(["pytest"])],
  ["pytest tests/ >/dev/null 2>&1", ok(["pytest", "tests/"])],
  ["pytest 2>/dev/null </dev/null", ok(["pytest"])],
  ["pytest >>/dev/null", ok(["pytest"])],
  ["pytest > out.txt", /redirection .*only 2>&1/],
  ["pytest 2>&1 x", /redirection followed by more words/],
  ["pytest 2>&3", /redirection/],
  ["pytest &> log", /redirection/],
  ["pytest >| x", /redirection/],
  ["cat < /etc/passwd", /redirection/],
  ["cat <<< hi", /here-string/],
  ["cat <<'EOF'\nhi\nEOF", /heredoc/],
  // substitutions, wherever they hide
  ["echo `id`", /command substitution/],
  ['echo "$(id)"', /command substitution/],
  ['echo "`id`"', /command substitution/],
  ["cat <<EOF\n$(id)\nEOF", /command substitution at 2:1/],
  ["echo ${x:-$(id)}", /command substitution/],
  ["diff <(ls) <(ls -a)", /process substitution/],
  ["pytest $(cat args)", /command substitution/],
  // expansions
  ["echo $HOME", /parameter expansion/],
  ['echo "${HOME}"', /parameter expansion/],
  ['echo "a$"', /`\$` inside double quotes/],
  ["echo $((1+2))", /arithmetic expansion/],
  ["rm *.pyc", /unquoted glob character/],
  ["ls a?", /unquoted glob character/],
  ["ls x[ab]", /unquoted glob character/],
  ["echo {a,b}", /brace expansion/],
  ["ls ~/x", /tilde expansion/],
  ["echo $'a\\nb'", /\$'…' string/],
  // structure the policy does not judge
  ["X=1 pytest", /variable assignment/],
  ["export X=1", /declaration/],
  ["X=1", /variable assignment/],
  ["(cd x && pytest)", /subshell/],
  ["{ pytest; }", /command group/],
  ["f() { pytest; }; f", /function definition/],
  ["if true; then pytest; fi", /if statement/],
  ["for f in a b; do pytest; done", /for loop/],
  ["while true; do pytest; done", /while\/until loop/],
  ["case x in x) pytest;; esac", /case statement/],
  ["! pytest", /negation/],
  ["[[ -f x ]] && pytest", /test expression/],
  ["time pytest", /shell keyword `time`/],
  ["pytest &", /background/],
  ["pytest & rm -rf /", /background/],
  ["pytest |& tee x", /`\|&`/],
  ["pytest;; black", /operator ";;"/],
  ["; pytest", /syntax|operator/],
  // what the grammar and the shell could read differently
  ["a \\ b", /text between words/],
  ["py\\\ntest", /text between words/],
  ["pytest 2 >&1", ok(["pytest", "2"])],
  // syntax errors and incomplete input
  ['pytest "unterminated', /syntax|incomplete/],
  ["pytest )", /syntax|incomplete|operator/],
  ["pytest &&", /syntax|incomplete|without a command/],
  ["pytest |", /syntax|incomplete|without a command/],
  // input the parser does not even look at
  ["", /empty/],
  ["   \n\t  ", /empty/],
  ["pytest\rtests", /control character U\+000D/],
  ["pytest\u0000x", /control character U\+0000/],
  ["pytest \u001b[31m", /control character U\+001B/],
  [`pytest ${"a ".repeat(MAX_COMMAND_LENGTH)}`, /characters long; the limit is/],
  [`${"pytest && ".repeat(3000)}pytest`, /more than 500 nested operators/],
];

describe("parseCommand (tree-sitter-bash)", () => {
  it("throws a clear error when used before initShellParser()", async () => {
    vi.resetModules();
    const fresh = await import("../../src/policy/shellparse.js");
    expect(fresh.isShellParserReady()).toBe(false);
    expect(() => fresh.parseCommand("pytest")).toThrow(/before initShellParser/);
    vi.resetModules();
  });

  beforeAll(async () => {
    await initShellParser();
  });

  it("has a table of at least 40 tricky strings", () => {
    expect(cases.length).toBeGreaterThanOrEqual(40);
  });

  for (const [input, expected] of cases) {
    const label = JSON.stringify(input.length > 60 ? `${input.slice(0, 60)}…` : input);
    if (expected instanceof RegExp) {
      it(`refuses ${label}`, () => {
        const r = parseCommand(input);
        expect(r.ok).toBe(false);
        if (!r.ok) expect(r.reason).toMatch(expected);
      });
    } else {
      it(`parses ${label}`, () => {
        expect(parseCommand(input)).toEqual({ ok: true, commands: expected });
      });
    }
  }

  it("parses long input within the limit", () => {
    const args = Array.from({ length: 4000 }, (_, i) => `t${i}`);
    const r = parseCommand(`pytest ${args.join(" ")}`);
    expect(r).toEqual({ ok: true, commands: [["pytest", ...args]] });
  });

  it("initShellParser() is idempotent", async () => {
    await initShellParser();
    await initShellParser();
    expect(parseCommand("pytest")).toEqual({ ok: true, commands: [["pytest"]] });
  });
});

describe("bash -c / sh -c nesting", () => {
  beforeAll(async () => {
    await initShellParser();
  });

  it("finds the -c string of sh, bash and dash, whatever options and $0 surround it", () => {
    expect(innerShellCommand(["bash", "-c", "pytest -q"])).toBe("pytest -q");
    expect(innerShellCommand(["sh", "-c", "pytest"])).toBe("pytest");
    expect(innerShellCommand(["/bin/sh", "-c", "pytest"])).toBe("pytest");
    expect(innerShellCommand(["bash", "-lc", "pytest"])).toBe("pytest");
    expect(innerShellCommand(["bash", "-e", "-o", "pipefail", "-c", "pytest"])).toBe("pytest");
    expect(innerShellCommand(["bash", "--norc", "-xc", "pytest", "arg0", "arg1"])).toBe("pytest");
    expect(innerShellCommand(["sh", "-c", "rm -rf x", "x"])).toBe("rm -rf x");
    expect(innerShellCommand(["bash", "script.sh"])).toBeUndefined();
    expect(unwrap(["bash", "script.sh", "-c", "x"])?.inner).toEqual([{ kind: "file", path: "script.sh" }]);
    expect(innerShellCommand(["zsh", "-c", "pytest"])).toBeUndefined();
  });

  it("peels two levels of quoting", () => {
    const outer = parseCommand(`sh -c 'bash -c "pytest -q && black --check ."'`);
    expect(outer).toEqual({ ok: true, commands: [["sh", "-c", 'bash -c "pytest -q && black --check ."']] });
    const middle = parseCommand(innerShellCommand((outer as { commands: string[][] }).commands[0]!)!);
    expect(middle).toEqual({ ok: true, commands: [["bash", "-c", "pytest -q && black --check ."]] });
    const inner = parseCommand(innerShellCommand((middle as { commands: string[][] }).commands[0]!)!);
    expect(inner).toEqual({ ok: true, commands: [["pytest", "-q"], ["black", "--check", "."]] });
  });

  it("keeps a substitution inside an inner string for the inner parse to refuse", () => {
    const outer = parseCommand(`bash -c 'echo $(id)'`);
    expect(outer).toEqual({ ok: true, commands: [["bash", "-c", "echo $(id)"]] });
    const inner = parseCommand("echo $(id)");
    expect(inner.ok).toBe(false);
  });
});

/**
 * The parser's argv must be what the shell really executes. Every accepted
 * string of the table (that runs no builtin) is run by /bin/sh (dash, the
 * sandbox's shell) and by bash, with PATH pointing at a program that records
 * its argv.
 */
describe("parsed argv equals what dash and bash execute", () => {
  let dir: string;
  const programs = ["pytest", "black", "isort", "mypy", "pylint", "python", "sort", "head", "abcd", "a", "b", "c"];
  const shells = ["/bin/sh", "/bin/bash"].filter((s) => existsSync(s));

  beforeAll(async () => {
    await initShellParser();
    dir = mkdtempSync(path.join(os.tmpdir(), "sbx-argv-"));
    const dump = path.join(dir, "argv-dump");
    writeFileSync(
      dump,
      // one write per run (pipeline members run at once: several writes each would interleave)
      `#!/bin/sh\nus=$(printf '\\037'); r="\${0##*/}"; for a in "$@"; do r="$r$us$a"; done; printf '%s\\036' "$r" >> "$ARGV_OUT"\n`,
    );
    chmodSync(dump, 0o755);
    for (const p of programs) symlinkSync(dump, path.join(dir, p));
  });

  afterAll(() => {
    rmSync(dir, { recursive: true, force: true });
  });

  const runnable = cases.filter(
    (c): c is [string, string[][]] =>
      Array.isArray(c[1]) && c[1].every((argv) => programs.includes(argv[0]!)) && !c[0].includes("||"),
  );

  it("has strings to compare", () => {
    expect(shells).toContain("/bin/sh");
    expect(runnable.length).toBeGreaterThanOrEqual(12);
  });

  for (const [input, expected] of runnable) {
    it(`runs ${JSON.stringify(input)} as parsed`, () => {
      for (const shell of shells) {
        const out = path.join(dir, `out-${path.basename(shell)}`);
        writeFileSync(out, "");
        execFileSync(shell, ["-c", input], { env: { PATH: dir, ARGV_OUT: out }, stdio: ["ignore", "ignore", "pipe"] });
        const ran = readFileSync(out, "utf8")
          .split("\x1e")
          .filter((r) => r !== "")
          .map((r) => r.split("\x1f"));
        // pipeline members run concurrently: compare as multisets
        const key = (a: string[][]) => a.map((x) => JSON.stringify(x)).sort();
        expect({ shell, ran: key(ran) }).toEqual({ shell, ran: key(expected) });
      }
    });
  }
});

/**
 * Random strings over shell-significant tokens (fixed seed): whatever the
 * parser accepts must run, in dash and in bash, exactly as parsed.
 */
describe("fuzz: accepted strings run as parsed", () => {
  let dir: string;
  const shells = ["/bin/sh", "/bin/bash"].filter((s) => existsSync(s));
  const alphabet = ["p", "q", " ", " ", "a", "-", "\\", "'", '"', "\n", ";", "&&", "|", "#", "\\\n", "2>&1", ">/dev/null",
    "2", ">", "&", "=", "ü", "/", "\\ ", "\\#", '"\\""', "''", ":", "$", "`", "(", ")", "*", "{", "~"];

  beforeAll(async () => {
    await initShellParser();
    dir = mkdtempSync(path.join(os.tmpdir(), "sbx-fuzz-"));
    const dump = path.join(dir, "p");
    writeFileSync(
      dump,
      // one write per run (pipeline members run at once: several writes each would interleave)
      `#!/bin/sh\nus=$(printf '\\037'); r="\${0##*/}"; for a in "$@"; do r="$r$us$a"; done; printf '%s\\036' "$r" >> "$ARGV_OUT"\n`,
    );
    chmodSync(dump, 0o755);
    symlinkSync(dump, path.join(dir, "q"));
  });

  afterAll(() => {
    rmSync(dir, { recursive: true, force: true });
  });

  it("finds no string the parser accepts that a shell runs differently", () => {
    let seed = 20250128;
    const rnd = () => (seed = (seed * 1103515245 + 12345) & 0x7fffffff) / 0x7fffffff;
    const mismatches: string[] = [];
    let compared = 0;
    for (let n = 0; n < 4000; n++) {
      let s = rnd() < 0.5 ? "p" : "q";
      const len = 1 + Math.floor(rnd() * 12);
      for (let i = 0; i < len; i++) s += alphabet[Math.floor(rnd() * alphabet.length)];
      const r = parseCommand(s);
      if (!r.ok || s.includes("||") || !r.commands.every((c) => c[0] === "p" || c[0] === "q")) continue;
      compared++;
      for (const shell of shells) {
        const out = path.join(dir, "out");
        writeFileSync(out, "");
        try {
          execFileSync(shell, ["-c", s], { env: { PATH: dir, ARGV_OUT: out }, stdio: ["ignore", "ignore", "ignore"], timeout: 5000 });
        } catch {
          /* a failing command is still compared: what ran is what counts */
        }
        const ran = readFileSync(out, "utf8").split("\x1e").filter((x) => x !== "").map((x) => x.split("\x1f"));
        const key = (a: string[][]) => a.map((x) => JSON.stringify(x)).sort().join(" ");
        if (key(ran) !== key(r.commands)) mismatches.push(`${shell} ${JSON.stringify(s)}: parsed ${key(r.commands)}, ran ${key(ran)}`);
      }
    }
    expect(compared).toBeGreaterThan(50);
    expect(mismatches).toEqual([]);
  }, 120_000);
});
