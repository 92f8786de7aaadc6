/**
 * Secrets never reach a log (SKILLS.md "Credential Handling": never log API
 * keys, database passwords, secret tokens). Commands get the project's .env
 * values; everything the daemon writes — audit records, stored output, the
 * streamed copy, the operational log, error messages — goes through a
 * Redactor that replaces each secret *value* with [REDACTED], wherever it
 * appears and under whatever name, including when it is split across output
 * chunks (StreamRedactor).
 *
 * Which values are secrets (collectSecrets; docs/AUDIT.md "Redaction"):
 *  1. the value of any variable, from .env or from the environment the daemon
 *     passes to commands, whose name looks like a credential (SECRET_NAME);
 *  2. the password of any URL-looking value (`postgres://u:PASS@h/db`), the
 *     value of a secret-named URL query parameter, and `password=…` in a
 *     libpq-style connection string;
 *  3. every other .env value of 6 characters or more, unless it plainly is
 *     not a secret: a number, a boolean, an IP address, `localhost[:port]`,
 *     a URL without credentials, or a common configuration word (NOT_SECRET).
 * For each value the URL-encoded and JSON-escaped forms are scrubbed too, and
 * each line (≥ 8 chars) of a multi-line value (a PEM key) on its own. Other
 * encodings (base64, hex) of a secret are NOT recognised.
 *
 * Matching is Aho-Corasick, over UTF-16 code units for text and over bytes
 * for command output (ByteStreamRedactor: output is never decoded on its way
 * through the daemon): one pass whatever the number of secrets. Overlapping occurrences are merged into one
 * [REDACTED], so no fragment of any secret survives.
 */
import { readFile } from "node:fs/promises";
import path from "node:path";
import dotenv from "dotenv";

export const REDACTED = "[REDACTED]";
/** Shorter secrets are not scrubbed: replacing every "abc" would wreck ordinary text. */
export const MIN_SECRET_LENGTH = 4;

/** A variable name that looks like it holds a credential. */
export const SECRET_NAME = /KEY|TOKEN|SECRET|PASSWORD|PASSWD|PASS|PWD|CREDENTIAL|CREDS|AUTH|PRIVATE|DSN|SALT|COOKIE|SESSION|SIGNATURE/i;
/** Names matching SECRET_NAME that are not credentials (the shell's working directory). */
const NOT_SECRET_NAMES = new Set(["PWD", "OLDPWD"]);

/** Values under a secret-looking name that are still not secrets. */
const LITERAL = /^(true|false|yes|no|on|off|null|none|nil|undefined|enabled|disabled)$/i;
/** Every other .env value is a secret unless it is one of these. */
const NUMBER = /^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$/;
const IPV4 = /^(\d{1,3}\.){3}\d{1,3}(:\d+)?$/;
const LOCALHOST = /^(localhost|127\.0\.0\.1|0\.0\.0\.0|::1|\[::1\])(:\d+)?$/i;
const NOT_SECRET = new Set(
  [
    "localhost",
    "development",
    "production",
    "staging",
    "testing",
    "default",
    "postgres",
    "postgresql",
    "redis",
    "questdb",
    "sqlite",
    "mysql",
    "debug",
    "verbose",
    "warning",
    "error",
    "critical",
    "paper",
    "simulation",
    "backtest",
    "utf-8",
    "utf8",
    "disable",
    "require",
    "prefer",
    "UTC",
  ].map((w) => w.toLowerCase()),
);
const DOTENV_MIN_LENGTH = 6;
const PEM_LINE_MIN_LENGTH = 8;
const CONNINFO_PASSWORD = /\b(?:password|passwd|pwd)\s*=\s*(?:'((?:[^'\\]|\\.)*)'|([^\s'][^\s]*))/gi;

export interface SecretFinding {
  /** the variable it came from */
  name: string;
  value: string;
  why: "name" | "url-password" | "url-query" | "conninfo-password" | "dotenv-value";
}

function plainlyNotSecret(value: string): boolean {
  const v = value.trim();
  if (LITERAL.test(v) || NUMBER.test(v) || IPV4.test(v) || LOCALHOST.test(v)) return true;
  if (NOT_SECRET.has(v.toLowerCase())) return true;
  const url = parseUrl(v);
  if (url && url.password === "" && url.username === "" && url.search === "" && url.hash === "") return true;
  return false;
}

function parseUrl(value: string): URL | null {
  if (!/^[a-z][a-z0-9+.-]*:\/\//i.test(value)) return null;
  try {
    return new URL(value);
  } catch {
    return null;
  }
}

function safeDecode(s: string): string {
  try {
    return decodeURIComponent(s);
  } catch {
    return s;
  }
}

/** Secrets inside one value that hold regardless of the variable's name. */
function embedded(name: string, value: string): SecretFinding[] {
  const found: SecretFinding[] = [];
  for (const word of value.split(/\s+/)) {
    const url = parseUrl(word);
    if (!url) continue;
    if (url.password) {
      found.push({ name, value: url.password, why: "url-password" });
      found.push({ name, value: safeDecode(url.password), why: "url-password" });
    }
    for (const [k, v] of url.searchParams) {
      if (v && SECRET_NAME.test(k)) found.push({ name, value: v, why: "url-query" });
    }
  }
  for (const m of value.matchAll(CONNINFO_PASSWORD)) {
    const pw = m[1] ?? m[2];
    if (pw) found.push({ name, value: pw, why: "conninfo-password" });
  }
  return found;
}

/**
 * Which values of `vars` are secrets. `origin` "dotenv" applies all three
 * rules; "env" (the daemon's own environment passed to commands) only the
 * name and embedded-credential rules, since it holds PATH, HOME and the like.
 */
export function findSecrets(vars: Record<string, string | undefined>, origin: "dotenv" | "env", opts: { notSecret?: readonly string[] } = {}): SecretFinding[] {
  const exempt = new Set(opts.notSecret ?? []);
  const found: SecretFinding[] = [];
  for (const [name, value] of Object.entries(vars)) {
    if (value === undefined || value === "" || exempt.has(name)) continue;
    found.push(...embedded(name, value));
    const v = value.trim();
    if (SECRET_NAME.test(name) && !NOT_SECRET_NAMES.has(name.toUpperCase())) {
      const shortNumber = /^\d+$/.test(v) && v.length < 6;
      if (!LITERAL.test(v) && !shortNumber) found.push({ name, value, why: "name" });
      continue;
    }
    if (origin === "dotenv" && v.length >= DOTENV_MIN_LENGTH && !plainlyNotSecret(v)) {
      found.push({ name, value, why: "dotenv-value" });
    }
  }
  return found;
}

/** A secret plus the other forms in which it is likely to be printed. */
export function variants(value: string): string[] {
  const out = new Set<string>([value]);
  const trimmed = value.trim();
  if (trimmed) out.add(trimmed);
  const encoded = encodeURIComponent(value);
  if (encoded !== value) out.add(encoded);
  const json = JSON.stringify(value).slice(1, -1);
  if (json !== value) out.add(json);
  if (/[\r\n]/.test(value)) {
    for (const line of value.split(/\r?\n/)) {
      const l = line.trim();
      if (l.length >= PEM_LINE_MIN_LENGTH) out.add(l);
    }
  }
  return [...out];
}

/** Parses .env text (dotenv rules: quotes, comments, `export` prefix) and returns its secret findings. */
export function secretsFromDotenv(text: string, opts: { notSecret?: readonly string[] } = {}): SecretFinding[] {
  return findSecrets(dotenv.parse(text), "dotenv", opts);
}

/**
 * The secret values for a project: from `projectDir/.env` (missing file →
 * none) and from `env`, the variables the daemon passes to commands.
 * Deduplicated, with the variants each is likely printed in.
 */
export async function collectSecrets(
  projectDir: string,
  env: Record<string, string | undefined> = {},
  opts: { notSecret?: readonly string[] } = {},
): Promise<string[]> {
  let text = "";
  try {
    text = await readFile(path.join(projectDir, ".env"), "utf8");
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== "ENOENT") throw e;
  }
  const findings = [...secretsFromDotenv(text, opts), ...findSecrets(env, "env", opts)];
  const values = new Set<string>();
  for (const f of findings) for (const v of variants(f.value)) values.add(v);
  return [...values];
}

/* ------------------------------ matching ------------------------------ */

/**
 * Secrets shorter than this are matched only on token boundaries: an
 * occurrence (or a run of touching occurrences) must not cut a run of word
 * characters [A-Za-z0-9_] in two at either edge, so `quest` is scrubbed in
 * `pw=quest;` or `admin:quest@` but not inside `request` or `questdb`
 * (replacing those damaged ordinary text and, by its pattern, revealed the
 * secret). A run of secret text this long or longer is scrubbed anywhere: a
 * 12-char value inside an unrelated word is vanishingly unlikely, and a key
 * glued to other characters (`tok=sk_live_…x`, or to itself) must still go.
 */
export const SHORT_SECRET_LENGTH = 12;

/** [A-Za-z0-9_] */
function isWord(c: number): boolean {
  return (c >= 48 && c <= 57) || (c >= 65 && c <= 90) || (c >= 97 && c <= 122) || c === 95;
}

/** Finds the merged [start, end) intervals of secret occurrences in a text. */
export interface IntervalFinder {
  intervals(text: string): Array<[number, number]>;
}

/** What a scan found, and where it left the automaton (for streams). */
interface Scan {
  intervals: Array<[number, number]>;
  /** automaton state after the last char: its depth is the longest suffix that may still begin a secret */
  state: number;
  /** start of the first cluster a stream must still hold back (text.length: none) */
  undecidedFrom: number;
}

/** Dense transition tables above this many cells fall back to the sparse trie walk. */
const MAX_DENSE_CELLS = 8_000_000;

/** A sequence of symbols the automaton reads: a string's UTF-16 code units, or bytes. */
interface Symbols {
  readonly length: number;
  at(i: number): number;
}
const textSymbols = (text: string): Symbols => ({ length: text.length, at: (i) => text.charCodeAt(i) });
const byteSymbols = (bytes: Uint8Array): Symbols => ({ length: bytes.length, at: (i) => bytes[i]! });

/**
 * Aho-Corasick automaton over symbols: UTF-16 code units (for text), or
 * bytes (for output as the command wrote it: the patterns are the secrets'
 * UTF-8 encodings). The trie is compiled into a dense DFA over the symbols
 * that occur in some secret (every other symbol is class 0 and leads back to
 * the root), so scanning costs one table lookup per symbol whatever the
 * number of secrets. The token rule (SHORT_SECRET_LENGTH, isWord) counts
 * symbols: word characters are ASCII, one byte and one code unit alike, and
 * a non-ASCII secret is as long or longer in bytes (so it is scrubbed
 * anywhere at least as often).
 */
class Matcher implements IntervalFinder {
  private readonly goto: Array<Map<number, number>> = [new Map()];
  private readonly fail: number[] = [0];
  /** length of the pattern that ends exactly at this state, 0 if none */
  private readonly term: Int32Array;
  /** nearest state on the fail chain (excluding itself) where a pattern ends, 0 if none */
  private readonly dict: Int32Array;
  /** 1 when some pattern ends at this state or on its fail chain */
  private readonly hit: Uint8Array;
  /** trie depth: length of the string this state stands for */
  readonly depth: Int32Array;
  private readonly classOf: Uint16Array | null = null;
  private readonly width: number = 0;
  private readonly delta: Int32Array | null = null;

  /** `alphabet`: 65536 for code units, 256 for bytes */
  constructor(patterns: readonly Symbols[], alphabet: number) {
    const term: number[] = [0];
    const depth: number[] = [0];
    for (const p of patterns) {
      let s = 0;
      for (let i = 0; i < p.length; i++) {
        const c = p.at(i);
        let t = this.goto[s]!.get(c);
        if (t === undefined) {
          t = this.goto.length;
          this.goto.push(new Map());
          this.fail.push(0);
          term.push(0);
          depth.push(i + 1);
          this.goto[s]!.set(c, t);
        }
        s = t;
      }
      term[s] = p.length;
    }
    const dict: number[] = new Array<number>(term.length).fill(0);
    const order: number[] = [];
    for (const t of this.goto[0]!.values()) order.push(t);
    for (let qi = 0; qi < order.length; qi++) {
      const s = order[qi]!;
      for (const [c, t] of this.goto[s]!) {
        let f = this.fail[s]!;
        while (f !== 0 && !this.goto[f]!.has(c)) f = this.fail[f]!;
        const ft = this.goto[f]!.get(c);
        this.fail[t] = ft !== undefined && ft !== t ? ft : 0;
        const ff = this.fail[t]!;
        dict[t] = term[ff]! > 0 ? ff : dict[ff]!;
        order.push(t);
      }
    }
    this.term = Int32Array.from(term);
    this.dict = Int32Array.from(dict);
    this.depth = Int32Array.from(depth);
    this.hit = Uint8Array.from(term, (len, s) => (len > 0 || dict[s]! > 0 ? 1 : 0));

    const classOf = new Uint16Array(alphabet);
    let classes = 0;
    for (const p of patterns) {
      for (let i = 0; i < p.length; i++) {
        const c = p.at(i);
        if (classOf[c] === 0) classOf[c] = ++classes;
      }
    }
    const width = classes + 1;
    const nodes = this.goto.length;
    if (nodes * width > MAX_DENSE_CELLS) return;
    const delta = new Int32Array(nodes * width);
    const fill = (s: number) => {
      const f = this.fail[s]!;
      for (let k = 1; k < width; k++) delta[s * width + k] = s === 0 ? 0 : delta[f * width + k]!;
      for (const [c, t] of this.goto[s]!) delta[s * width + classOf[c]!] = t;
    };
    fill(0);
    for (const s of order) fill(s); // BFS order: a state's fail state is filled before it
    this.classOf = classOf;
    this.width = width;
    this.delta = delta;
  }

  /**
   * Every occurrence of every pattern in `text`, as merged [start, end)
   * intervals: overlapping occurrences become one interval. Sorted, disjoint.
   */
  intervals(text: string): Array<[number, number]> {
    return this.scan(text, -1, true).intervals;
  }

  /**
   * Finds every occurrence (the longest secret ending at each position),
   * merges overlapping and touching ones into clusters, and keeps a cluster
   * when it is at least SHORT_SECRET_LENGTH long or is a whole token: it
   * does not cut a run of word characters in two at either edge. `before`
   * is the symbol just before `text` (-1: none). A stream passes
   * `continues`: clusters starting within that many symbols of the start
   * continue a kept cluster already emitted, so they are kept. When not
   * `final` the input may go on, and a short cluster that reaches the part a
   * future secret could start in (the automaton's depth at the end) could
   * still grow or gain a glued neighbour: it is undecided, left out, and
   * `undecidedFrom` says where the first one starts (the stream holds it
   * back).
   */
  scan(text: string, before: number, final: boolean, continues = -1): Scan {
    const raw: number[] = [];
    let s = 0;
    const n = text.length;
    if (this.delta && this.classOf) {
      const { delta, classOf, width, hit } = this;
      for (let i = 0; i < n; i++) {
        s = delta[s * width + classOf[text.charCodeAt(i)]!]!;
        if (hit[s] === 1) this.push(raw, i, s);
      }
    } else s = this.walk(textSymbols(text), raw);
    return this.decide(textSymbols(text), raw, s, before, final, continues);
  }

  /** scan() over bytes (the hot path: a command's output as it arrives). */
  scanBytes(bytes: Uint8Array, before: number, final: boolean, continues = -1): Scan {
    const raw: number[] = [];
    let s = 0;
    const n = bytes.length;
    if (this.delta && this.classOf) {
      const { delta, classOf, width, hit } = this;
      for (let i = 0; i < n; i++) {
        s = delta[s * width + classOf[bytes[i]!]!]!;
        if (hit[s] === 1) this.push(raw, i, s);
      }
    } else s = this.walk(byteSymbols(bytes), raw);
    return this.decide(byteSymbols(bytes), raw, s, before, final, continues);
  }

  /** the sparse trie walk, for secret sets too large for a dense table */
  private walk(seq: Symbols, raw: number[]): number {
    const { goto, fail, hit } = this;
    let s = 0;
    for (let i = 0; i < seq.length; i++) {
      const c = seq.at(i);
      let t = goto[s]!.get(c);
      while (t === undefined && s !== 0) {
        s = fail[s]!;
        t = goto[s]!.get(c);
      }
      s = t ?? 0;
      if (hit[s] === 1) this.push(raw, i, s);
    }
    return s;
  }

  /** Records the occurrence ending at `i` in `raw` (clusters as flat [start, end] pairs), merged with those it overlaps or touches. */
  private push(raw: number[], i: number, s: number): void {
    const term = this.term;
    const start = i + 1 - term[term[s]! > 0 ? s : this.dict[s]!]!;
    let k = raw.length;
    let from = start;
    // merge with earlier clusters this occurrence overlaps or touches (it may reach back over several)
    while (k > 0 && raw[k - 1]! >= from) {
      from = Math.min(from, raw[k - 2]!);
      k -= 2;
    }
    raw.length = k;
    raw.push(from, i + 1);
  }

  private decide(seq: Symbols, raw: number[], s: number, before: number, final: boolean, continues: number): Scan {
    const n = seq.length;
    const intervals: Array<[number, number]> = [];
    let undecidedFrom = n;
    // a secret still to come starts within the automaton's depth: clusters reaching it may grow
    const settledBefore = n - this.depth[s]!;
    for (let k = 0; k < raw.length; k += 2) {
      const start = raw[k]!;
      const end = raw[k + 1]!;
      if (end - start >= SHORT_SECRET_LENGTH || start <= continues) {
        intervals.push([start, end]);
        continue;
      }
      if (!final && end >= settledBefore) {
        undecidedFrom = Math.min(undecidedFrom, start);
        continue;
      }
      const left = start === 0 ? before : seq.at(start - 1);
      if (left >= 0 && isWord(left) && isWord(seq.at(start))) continue;
      if (end < n && isWord(seq.at(end - 1)) && isWord(seq.at(end))) continue;
      intervals.push([start, end]);
    }
    return { intervals, state: s, undecidedFrom };
  }
}

export interface RedactorOptions {
  /** called once per problem (e.g. secrets too short to scrub); default process.emitWarning */
  onWarning?: (message: string) => void;
}

export class Redactor {
  private readonly matcher: Matcher | null;
  /** length of the longest secret */
  readonly longest: number;
  readonly size: number;
  readonly warnings: readonly string[];

  constructor(secrets: Iterable<string>, opts: RedactorOptions = {}) {
    const all = new Set<string>();
    let short = 0;
    for (const s of secrets) {
      if (s.length === 0) continue;
      if (s.length < MIN_SECRET_LENGTH) short += 1;
      else all.add(s);
    }
    const warnings: string[] = [];
    if (short > 0) {
      // never name or show the value itself
      warnings.push(
        `${short} secret value${short === 1 ? " is" : "s are"} shorter than ${MIN_SECRET_LENGTH} characters and will not be scrubbed from logs; use longer secrets`,
      );
    }
    this.warnings = warnings;
    const warn = opts.onWarning ?? ((m: string) => process.emitWarning(m, { code: "SANDBOXD_SHORT_SECRET" }));
    for (const w of warnings) warn(w);
    const list = [...all].sort((a, b) => b.length - a.length);
    this.size = list.length;
    this.longest = list[0]?.length ?? 0;
    this.list = list;
    this.matcher = list.length > 0 ? new Matcher(list.map(textSymbols), 65536) : null;
  }

  private readonly list: readonly string[];
  private byteMatcher: Matcher | null | undefined;

  /** the automaton over the secrets' UTF-8 bytes, made at the first byte stream */
  private bytes(): Matcher | null {
    if (this.byteMatcher === undefined) {
      this.byteMatcher = this.list.length > 0 ? new Matcher(this.list.map((x) => byteSymbols(Buffer.from(x, "utf8"))), 256) : null;
    }
    return this.byteMatcher;
  }

  /** `text` with every secret occurrence replaced by [REDACTED]. */
  redact(text: string): string {
    if (!this.matcher || text.length === 0) return text;
    return render(text, this.matcher.intervals(text), -1, text.length).out;
  }

  /** Bytes in, bytes out: each secret's UTF-8 encoding replaced, every other byte as it was. */
  redactBuffer(bytes: Uint8Array): Buffer {
    const s = this.byteStream();
    return Buffer.concat([s.push(bytes), s.end()]);
  }

  /** A redactor for one output stream, safe across chunk boundaries. */
  stream(): StreamRedactor {
    return new StreamRedactor(this.matcher);
  }

  /** The same for bytes, never decoded: a command's output on its way to the log and the client. */
  byteStream(): ByteStreamRedactor {
    return new ByteStreamRedactor(this.bytes());
  }
}

/**
 * `value` with every string in it (object keys included) redacted: for API
 * error bodies, stored command results, structured log objects. Plain
 * objects and arrays are copied; other values are returned as they are.
 */
export function redactDeep<T>(value: T, redactor: { redact(text: string): string }): T {
  const walk = (v: unknown): unknown => {
    if (typeof v === "string") return redactor.redact(v);
    if (Array.isArray(v)) return v.map(walk);
    if (typeof v === "object" && v !== null) {
      const proto: unknown = Object.getPrototypeOf(v);
      if (proto !== Object.prototype && proto !== null) return v;
      const out: Record<string, unknown> = {};
      for (const [k, x] of Object.entries(v)) out[redactor.redact(k)] = walk(x);
      return out;
    }
    return v;
  };
  return walk(value) as T;
}

/**
 * A destination for line-oriented loggers (pino writes each record with one
 * `write(line)` call) that redacts every line before passing it on. Secrets
 * inside JSON strings are caught through their JSON-escaped variant
 * (collectSecrets adds it).
 */
export function redactingWriter<W extends { write(chunk: string): unknown }>(
  redactor: { redact(text: string): string },
  dest: W,
): { write(chunk: string): unknown } {
  return { write: (chunk: string) => dest.write(redactor.redact(chunk)) };
}

/**
 * The secrets of every live phase, for the daemon's process-wide log. Each
 * phase registers its Redactor when its recorder is made and removes it when
 * the phase has ended (after its last log line); `redact` applies them all.
 * A line about one phase may so lose another phase's secret too, which is
 * only ever more scrubbing. Log lines are few (no command output goes to the
 * log), so scanning each with every live phase's automaton costs little.
 */
export class LogSecrets {
  private readonly byOwner = new Map<string, { redact(text: string): string; size: number }>();

  add(owner: string, redactor: { redact(text: string): string; size: number }): void {
    if (redactor.size > 0) this.byOwner.set(owner, redactor);
  }

  remove(owner: string): void {
    this.byOwner.delete(owner);
  }

  redact(text: string): string {
    for (const r of this.byOwner.values()) text = r.redact(text);
    return text;
  }
}

/**
 * Emits text up to `cut`; intervals must be sorted, disjoint and not
 * touching. `cover` ≥ 0 means an earlier [REDACTED] reaches `cover` chars
 * into `buf` (0: up to its very start), so intervals overlapping or touching
 * that reach continue the marker instead of starting a new one; -1 means
 * none. Returns the output and, when the last marker reaches `cut` or
 * beyond, how far past `cut` it reaches (else -1).
 */
function render(buf: string, ivs: ReadonlyArray<[number, number]>, cover: number, cut: number): { out: string; cover: number } {
  let out = "";
  let pos = 0;
  let i = 0;
  if (cover >= 0) {
    let end = cover;
    // an interval touching the marker continues it (touching occurrences are one cluster)
    while (i < ivs.length && ivs[i]![0] <= end) end = Math.max(end, ivs[i++]![1]);
    if (end >= cut) return { out: "", cover: end - cut };
    pos = end;
  }
  for (; i < ivs.length; i++) {
    const [s, e] = ivs[i]!;
    if (s >= cut) break;
    out += buf.slice(pos, s) + REDACTED;
    if (e >= cut) return { out, cover: e - cut };
    pos = e;
  }
  if (pos < cut) out += buf.slice(pos, cut);
  return { out, cover: -1 };
}

/**
 * Redacts a stream of text chunks. `push` returns what is safe to emit now
 * and holds back only the chars that are a partial match of some secret —
 * the automaton's depth after the last char, i.e. the longest suffix that is
 * a prefix of a secret (plus a short secret that just ended, until the next
 * char says whether it is a token). Output that cannot begin a secret, such
 * as a line ending in "\n", goes out at once, whole. `end` flushes. The
 * concatenated output equals `redact()` of the concatenated input, wherever
 * the chunks were split.
 */
export class StreamRedactor {
  private held = "";
  /** chars at the start of `held` already inside an emitted [REDACTED] (0: it ends just before `held`), -1: none */
  private cover = -1;
  /** the input code unit just before `held` (-1 at the start), for token boundaries */
  private before = -1;
  private ended = false;

  constructor(private readonly matcher: Matcher | null) {}

  /** chars currently held back (a possible secret in the making) */
  get holding(): number {
    return this.held.length;
  }

  push(chunk: string): string {
    if (this.ended) throw new Error("StreamRedactor: push after end");
    if (!this.matcher) return chunk;
    if (chunk.length === 0) return "";
    const buf = this.held + chunk;
    const scan = this.matcher.scan(buf, this.before, false, this.cover);
    // hold back what may still begin a secret (the automaton's depth), and a short run of secret text that may still grow
    let cut = Math.min(buf.length - this.matcher.depth[scan.state]!, scan.undecidedFrom);
    // never split a surrogate pair between two emitted pieces
    if (cut > 0 && cut < buf.length && isHighSurrogate(buf.charCodeAt(cut - 1))) cut -= 1;
    return this.emit(buf, scan.intervals, cut);
  }

  end(): string {
    if (this.ended) return "";
    this.ended = true;
    if (!this.matcher) return "";
    const buf = this.held;
    return this.emit(buf, this.matcher.scan(buf, this.before, true, this.cover).intervals, buf.length);
  }

  private emit(buf: string, ivs: Array<[number, number]>, cut: number): string {
    const r = render(buf, ivs, this.cover, cut);
    if (cut > 0) this.before = buf.charCodeAt(cut - 1);
    this.held = buf.slice(cut);
    this.cover = r.cover;
    return r.out;
  }
}

const REDACTED_BYTES = Buffer.from(REDACTED, "latin1");

/** render() for bytes: the kept bytes are views of `buf` (no copy when nothing is replaced). */
function renderBytes(buf: Buffer, ivs: ReadonlyArray<[number, number]>, cover: number, cut: number): { out: Buffer; cover: number } {
  const parts: Buffer[] = [];
  let pos = 0;
  let i = 0;
  const done = (c: number) => ({ out: parts.length === 1 ? parts[0]! : Buffer.concat(parts), cover: c });
  if (cover >= 0) {
    let end = cover;
    while (i < ivs.length && ivs[i]![0] <= end) end = Math.max(end, ivs[i++]![1]);
    if (end >= cut) return { out: EMPTY, cover: end - cut };
    pos = end;
  }
  for (; i < ivs.length; i++) {
    const [s, e] = ivs[i]!;
    if (s >= cut) break;
    if (s > pos) parts.push(buf.subarray(pos, s));
    parts.push(REDACTED_BYTES);
    if (e >= cut) return done(e - cut);
    pos = e;
  }
  if (pos < cut) parts.push(buf.subarray(pos, cut));
  return parts.length === 0 ? { out: EMPTY, cover: -1 } : done(-1);
}
const EMPTY = Buffer.alloc(0);

/**
 * StreamRedactor over bytes, for command output: the automaton reads the
 * bytes as they arrive, nothing is decoded or re-encoded, and what goes out
 * is a view of the input wherever no secret was replaced. It holds back only
 * the bytes that are a partial match of some secret (the automaton's depth
 * after the last byte; plus a short secret that just ended, until the next
 * byte says whether it is a token): a cut may fall inside a UTF-8 character,
 * which the reader's decoder joins again. The concatenated output equals
 * redactBuffer() of the concatenated input, wherever the chunks were split.
 */
export class ByteStreamRedactor {
  private held: Buffer = EMPTY;
  /** bytes at the start of `held` already inside an emitted [REDACTED] (0: it ends just before `held`), -1: none */
  private cover = -1;
  /** the input byte just before `held` (-1 at the start), for token boundaries */
  private before = -1;
  private ended = false;

  constructor(private readonly matcher: Matcher | null) {}

  /** bytes currently held back (a possible secret in the making) */
  get holding(): number {
    return this.held.length;
  }

  push(chunk: Uint8Array): Buffer {
    if (this.ended) throw new Error("ByteStreamRedactor: push after end");
    const c = Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
    if (!this.matcher) return c;
    if (c.length === 0) return EMPTY;
    const buf = this.held.length === 0 ? c : Buffer.concat([this.held, c]);
    const scan = this.matcher.scanBytes(buf, this.before, false, this.cover);
    const cut = Math.min(buf.length - this.matcher.depth[scan.state]!, scan.undecidedFrom);
    return this.emit(buf, scan.intervals, cut);
  }

  end(): Buffer {
    if (this.ended || !this.matcher) {
      this.ended = true;
      return EMPTY;
    }
    this.ended = true;
    const buf = this.held;
    return this.emit(buf, this.matcher.scanBytes(buf, this.before, true, this.cover).intervals, buf.length);
  }

  private emit(buf: Buffer, ivs: Array<[number, number]>, cut: number): Buffer {
    const r = renderBytes(buf, ivs, this.cover, cut);
    if (cut > 0) this.before = buf[cut - 1]!;
    // what is held is copied: a view would keep the whole chunk it came in alive
    this.held = cut < buf.length ? Buffer.from(buf.subarray(cut)) : EMPTY;
    this.cover = r.cover;
    return r.out;
  }
}

function isHighSurrogate(c: number): boolean {
  return c >= 0xd800 && c <= 0xdbff;
}
