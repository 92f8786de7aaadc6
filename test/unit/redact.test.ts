import { mkdtemp, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { LogSecrets, REDACTED, Redactor, SHORT_SECRET_LENGTH, collectSecrets, findSecrets, redactDeep, redactingWriter, secretsFromDotenv } from "../../src/audit/redact.js";
import { SandboxdError } from "../../src/errors.js";

const quiet = { onWarning: () => undefined };

/** Stream `text` through a fresh StreamRedactor in the given pieces. */
function streamed(r: Redactor, pieces: string[]): string {
  const s = r.stream();
  return pieces.map((p) => s.push(p)).join("") + s.end();
}

/** Deterministic PRNG so failures reproduce. */
function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 2 ** 32;
  };
}

const word = (c: string | undefined) => c !== undefined && /[A-Za-z0-9_]/.test(c);

/**
 * What may survive redaction: an occurrence of a short secret that is glued
 * to a word character at an edge, or that touches or overlaps another
 * surviving occurrence (a run of secret text glued at its own edge).
 * Returns the occurrences that break that.
 */
function leaked(out: string, secrets: string[]): string[] {
  const occ: Array<[number, number, string]> = [];
  for (const sec of secrets) {
    if (sec.length < 4) continue;
    for (let i = out.indexOf(sec); i >= 0; i = out.indexOf(sec, i + 1)) occ.push([i, i + sec.length, sec]);
  }
  return occ
    .filter(([s, e, sec]) => {
      if (sec.length >= SHORT_SECRET_LENGTH) return true;
      const glued = (word(out[s - 1]) && word(out[s])) || (word(out[e - 1]) && word(out[e]));
      const touches = occ.some(([s2, e2]) => (s2 !== s || e2 !== e) && s2 <= e && e2 >= s);
      return !glued && !touches;
    })
    .map(([, , sec]) => sec);
}

describe("Redactor.redact", () => {
  it("scrubs by value wherever the value appears", () => {
    const r = new Redactor(["s3cr3t-token-value", "pg-pass-123"], quiet);
    expect(r.redact("curl -H 'Authorization: Bearer s3cr3t-token-value' x")).toBe(`curl -H 'Authorization: Bearer ${REDACTED}' x`);
    // glued to itself: one run of secret text, scrubbed as one
    expect(r.redact("pg-pass-123pg-pass-123 and pg-pass-12")).toBe(`${REDACTED} and pg-pass-12`);
    expect(r.redact("nothing here")).toBe("nothing here");
  });

  it("prefers the longest secret and merges overlapping ones so no fragment survives", () => {
    const r = new Redactor(["abcdef", "abcdefghij", "defghijklm", "klmnop"], quiet);
    expect(r.redact("xx abcdefghij yy")).toBe(`xx ${REDACTED} yy`);
    // abcdef + defghijklm + klmnop overlap in a chain: one marker, no leaked "ghij…op"
    expect(r.redact("1abcdefghijklmnop2")).toBe(`1${REDACTED}2`);
    expect(r.redact("defghijklm")).toBe(REDACTED);
    // a shorter secret entirely inside a longer one
    const nested = new Redactor(["password123", "word"], quiet);
    expect(nested.redact("my password123 word")).toBe(`my ${REDACTED} ${REDACTED}`);
  });

  it("ignores secrets shorter than 4 characters, with a warning that does not show them", () => {
    const warnings: string[] = [];
    const r = new Redactor(["abc", "", "abcd"], { onWarning: (m) => warnings.push(m) });
    expect(r.redact("abc abcd")).toBe(`abc ${REDACTED}`);
    expect(warnings).toHaveLength(1);
    expect(warnings[0]).toMatch(/1 secret value is shorter than 4/);
    expect(warnings[0]).not.toContain("abc");
  });

  it("handles regex metacharacters, surrogate pairs and a Buffer variant", () => {
    const r = new Redactor(["a.b*c+(d)?[e]$", "k€y😀pass"], quiet);
    expect(r.redact("x a.b*c+(d)?[e]$ y aXbbbc")).toBe(`x ${REDACTED} y aXbbbc`);
    expect(r.redact("😀k€y😀pass😀")).toBe(`😀${REDACTED}😀`);
    expect(r.redactBuffer(Buffer.from("é k€y😀pass é")).toString()).toBe(`é ${REDACTED} é`);
  });

  it("a Redactor with no secrets passes text through", () => {
    const r = new Redactor([], quiet);
    expect(r.redact("abc")).toBe("abc");
    expect(streamed(r, ["a", "b"])).toBe("ab");
  });
});

describe("short secrets match on token boundaries, long ones anywhere", () => {
  it("QuestDB's default password `quest` is scrubbed as a token, not inside words", () => {
    const red = new Redactor(["quest"], quiet);
    expect(red.redact("requests handled: 3; questdb ok")).toBe("requests handled: 3; questdb ok");
    expect(red.redact("approval.request requestReason")).toBe("approval.request requestReason");
    expect(red.redact("password is quest")).toBe(`password is ${REDACTED}`);
    expect(red.redact("postgresql://admin:quest@localhost:8812/qdb")).toBe(`postgresql://admin:${REDACTED}@localhost:8812/qdb`);
    expect(red.redact("quest")).toBe(REDACTED);
    expect(red.redact("(quest) 'quest' quest.quest-quest")).toBe(`(${REDACTED}) '${REDACTED}' ${REDACTED}.${REDACTED}-${REDACTED}`);
    // glued to a word character on either side: not a token, kept (docs/AUDIT.md says what this can miss)
    expect(red.redact("_quest quest1 Xquest")).toBe("_quest quest1 Xquest");
  });

  it("a secret whose own edge is not a word character matches next to anything", () => {
    const red = new Redactor(["-pw!", "p@ss"], quiet);
    expect(red.redact("ab-pw!cd")).toBe(`ab${REDACTED}cd`);
    expect(red.redact("xp@ss")).toBe("xp@ss"); // p is a word char glued to x
    expect(red.redact("x:p@ss:y")).toBe(`x:${REDACTED}:y`);
  });

  it(`secrets of ${SHORT_SECRET_LENGTH}+ chars match anywhere; a short one inside a long one is covered by it`, () => {
    const long = "a".repeat(SHORT_SECRET_LENGTH - 1) + "Z";
    const red = new Redactor([long, "aaaa"], quiet);
    expect(red.redact(`x${long}y`)).toBe(`x${REDACTED}y`);
    expect(red.redact("baaaab aaaa")).toBe(`baaaab ${REDACTED}`);
    // a rejected longer candidate does not hide an accepted shorter one ending at the same place
    const nested = new Redactor(["xquest", "quest"], quiet);
    expect(nested.redact("axquest")).toBe("axquest");
    expect(nested.redact("a-xquest")).toBe(`a-${REDACTED}`);
  });

  it("streams decide a short secret at a chunk's end when the next char comes, and at end()", () => {
    const red = new Redactor(["quest"], quiet);
    const text = "request quest questdb quest";
    const want = red.redact(text);
    expect(want).toBe(`request ${REDACTED} questdb ${REDACTED}`);
    for (let i = 0; i <= text.length; i++) {
      for (let k = i; k <= text.length; k++) expect(streamed(red, [text.slice(0, i), text.slice(i, k), text.slice(k)])).toBe(want);
    }
    const s = red.stream();
    expect(s.push("ok quest")).toBe("ok ");
    expect(s.push("db\n")).toBe("questdb\n");
  });
});

describe("redacting structured values and log lines", () => {
  it("redactDeep scrubs every string of an API error body, keys included", () => {
    const r = new Redactor(["tok-123456"], quiet);
    const body = new SandboxdError("SBX_ERR_POLICY_DENIED", "policy denied `curl -H tok-123456`", {
      details: { argv: ["curl", "-H", "tok-123456"], "tok-123456": 1, n: 2, ok: true, nil: null },
    }).toBody();
    const out = redactDeep(body, r);
    expect(JSON.stringify(out)).not.toContain("tok-123456");
    expect(out.error.message).toBe(`policy denied \`curl -H ${REDACTED}\``);
    expect(out.error.details).toEqual({ argv: ["curl", "-H", REDACTED], [REDACTED]: 1, n: 2, ok: true, nil: null });
  });

  it("redactingWriter scrubs each JSON log line, including a secret that JSON escaped", async () => {
    const dir = await mkdtemp(path.join(os.tmpdir(), "sbx-redact-"));
    try {
      await writeFile(path.join(dir, ".env"), 'DB_PASSWORD=pa"ss\\word\n');
      const r = new Redactor(await collectSecrets(dir), quiet);
      const lines: string[] = [];
      const w = redactingWriter(r, { write: (l: string) => lines.push(l) });
      w.write(`${JSON.stringify({ level: 30, msg: "connecting with pa\"ss\\word" })}\n`);
      expect(lines[0]).toBe(`{"level":30,"msg":"connecting with ${REDACTED}"}\n`);
      // the daemon's log: every live phase's secrets, registered and removed with the phase
      const live = new LogSecrets();
      const daemonLog: string[] = [];
      const w2 = redactingWriter(live, { write: (l: string) => daemonLog.push(l) });
      live.add("ph_a", r);
      live.add("ph_b", new Redactor(["other-phase-tok"], quiet));
      w2.write('{"msg":"pa\\"ss\\\\word other-phase-tok"}\n');
      live.remove("ph_a");
      w2.write('{"msg":"pa\\"ss\\\\word"}\n');
      expect(daemonLog[0]).toBe(`{"msg":"${REDACTED} ${REDACTED}"}\n`);
      expect(daemonLog[1]).toContain("word");
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});

describe("StreamRedactor", () => {
  const secret = "sk_live_0123456789abcdef";
  const r = new Redactor([secret, "ghp_ZYXWVUTSRQ"], quiet);
  const text = `start ${secret} middle ghp_ZYXWVUTSRQ${secret} end`;
  const want = r.redact(text);

  it("scrubs a secret split at every point into 2 chunks", () => {
    expect(want).toBe(`start ${REDACTED} middle ${REDACTED} end`);
    for (let i = 0; i <= text.length; i++) {
      expect(streamed(r, [text.slice(0, i), text.slice(i)])).toBe(want);
    }
  });

  it("scrubs a secret split into 3 chunks at every pair of points", () => {
    const t = `>${secret}<`;
    const w = r.redact(t);
    for (let i = 0; i <= t.length; i++) {
      for (let k = i; k <= t.length; k++) {
        expect(streamed(r, [t.slice(0, i), t.slice(i, k), t.slice(k)])).toBe(w);
      }
    }
  });

  it("scrubs one character at a time, and holds back only a partial match, never a fixed window", () => {
    const s = r.stream();
    let out = "";
    for (const ch of text) {
      out += s.push(ch);
    }
    out += s.end();
    expect(out).toBe(want);
    const s2 = r.stream();
    // nothing here can begin a secret: all of it goes out at once
    expect(s2.push("x".repeat(100))).toBe("x".repeat(100));
    expect(s2.holding).toBe(0);
    // a line ends: nothing is held, whatever came before
    expect(s2.push("line 1 sk_live_01\n")).toBe("line 1 sk_live_01\n");
    // the start of a secret is held, exactly as long as it is one
    expect(s2.push("tail sk_live")).toBe("tail ");
    expect(s2.holding).toBe("sk_live".length);
    expect(s2.push("_0X")).toBe("sk_live_0X");
    expect(s2.holding).toBe(0);
    expect(s2.end()).toBe("");
  });

  it("flushes a secret at the very end with end(), and a partial secret unredacted", () => {
    const s = r.stream();
    const a = s.push(`tail ${secret.slice(0, 10)}`);
    const b = s.push(secret.slice(10));
    expect(a + b).not.toContain("sk_live");
    expect(a + b + s.end()).toBe(`tail ${REDACTED}`);
    expect(streamed(r, ["tail sk_live_01"])).toBe("tail sk_live_01");
  });

  it("matches redact() on random texts, random secrets (overlapping, nested) and random chunking", () => {
    const rand = rng(42);
    const alphabet = "abcab-\n😀 _";
    const pick = (n: number) => Array.from({ length: n }, () => alphabet[Math.floor(rand() * alphabet.length)]).join("");
    for (let round = 0; round < 400; round++) {
      const secrets = Array.from({ length: 1 + Math.floor(rand() * 5) }, () => pick(4 + Math.floor(rand() * 6)));
      const red = new Redactor(secrets, quiet);
      let t = "";
      while (t.length < 120) t += rand() < 0.3 ? secrets[Math.floor(rand() * secrets.length)]! : pick(1 + Math.floor(rand() * 6));
      const expected = red.redact(t);
      const pieces: string[] = [];
      let pos = 0;
      while (pos < t.length) {
        const n = Math.floor(rand() * 12);
        pieces.push(t.slice(pos, pos + n));
        pos += n;
      }
      expect(streamed(red, pieces)).toBe(expected);
      expect(leaked(expected, secrets)).toEqual([]);
    }
  });

  it("does not split a surrogate pair between two emitted pieces", () => {
    const red = new Redactor(["zzzzzz"], quiet);
    const s = red.stream();
    const parts = [s.push("ab😀"), s.push("cd😀e😀"), s.push("f"), s.end()];
    for (const p of parts) expect(p).not.toMatch(/[\ud800-\udbff]$|^[\udc00-\udfff]/);
    expect(parts.join("")).toBe("ab😀cd😀e😀f");
  });

  it("byte streams: UTF-8 split inside a character and inside a secret", () => {
    const red = new Redactor(["pässwörd-€€"], quiet);
    const bytes = Buffer.from("x pässwörd-€€ y €");
    for (let i = 0; i <= bytes.length; i++) {
      for (let k = i; k <= bytes.length; k += 3) {
        const s = red.byteStream();
        const out = Buffer.concat([s.push(bytes.subarray(0, i)), s.push(bytes.subarray(i, k)), s.push(bytes.subarray(k)), s.end()]);
        expect(out.toString()).toBe(`x ${REDACTED} y €`);
      }
    }
  });

  it("a very large secret set (sparse automaton) scrubs the same way", () => {
    const rand = rng(9);
    const abc = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    const secrets = Array.from({ length: 2100 }, () => Array.from({ length: 64 }, () => abc[Math.floor(rand() * abc.length)]).join(""));
    const red = new Redactor(secrets, quiet);
    const text = `a ${secrets[0]} b ${secrets[2099]}${secrets[7]} c`;
    expect(red.redact(text)).toBe(`a ${REDACTED} b ${REDACTED} c`);
    expect(streamed(red, [text.slice(0, 40), text.slice(40, 100), text.slice(100)])).toBe(red.redact(text));
  });

  it("is fast enough: 100 secrets over 1 MB in well under a second", () => {
    const rand = rng(7);
    const secrets = Array.from({ length: 100 }, (_, i) => `secret-${i}-${Math.floor(rand() * 1e12).toString(36)}`);
    const red = new Redactor(secrets, quiet);
    const chunk = "Lorem ipsum dolor sit amet, secret-5 consectetur adipiscing elit 0123456789.\n";
    const text = chunk.repeat(Math.ceil(1_000_000 / chunk.length)) + secrets[42];
    const t0 = performance.now();
    const out = red.redact(text);
    const ms = performance.now() - t0;
    expect(out.endsWith(REDACTED)).toBe(true);
    expect(ms).toBeLessThan(1000);
  });
});

/** Stream `bytes` through a fresh ByteStreamRedactor in pieces cut at the given offsets. */
function streamedBytes(r: Redactor, bytes: Buffer, cuts: number[]): Buffer {
  const s = r.byteStream();
  const out: Buffer[] = [];
  let pos = 0;
  for (const c of [...cuts, bytes.length]) {
    out.push(s.push(bytes.subarray(pos, c)));
    pos = c;
  }
  out.push(s.end());
  return Buffer.concat(out);
}

describe("ByteStreamRedactor: output scrubbed as bytes, never decoded", () => {
  const secret = "sk_live_0123456789abcdef";
  const r = new Redactor([secret, "ghp_ZYXWVUTSRQ", "pässwörd-€€"], quiet);
  const text = `start ${secret} middle ghp_ZYXWVUTSRQ${secret} é pässwörd-€€ end 😀`;
  const bytes = Buffer.from(text);

  it("scrubs a secret split across a chunk boundary at every byte, inside characters too", () => {
    const want = `start ${REDACTED} middle ${REDACTED} é ${REDACTED} end 😀`;
    expect(r.redact(text)).toBe(want);
    for (let i = 0; i <= bytes.length; i++) expect(streamedBytes(r, bytes, [i]).toString()).toBe(want);
    for (let i = 0; i <= 40; i++) for (let k = i; k <= 40; k++) expect(streamedBytes(r, bytes, [i, k]).toString()).toBe(want);
    // one byte at a time
    expect(streamedBytes(r, bytes, Array.from({ length: bytes.length }, (_, i) => i)).toString()).toBe(want);
  });

  it("holds back only a partial match, and passes everything else on as the same bytes (a view, no copy)", () => {
    const s = r.byteStream();
    const plain = Buffer.from("x".repeat(65536));
    const out = s.push(plain);
    expect(out.length).toBe(65536);
    expect(out.buffer).toBe(plain.buffer); // not copied
    expect(s.holding).toBe(0);
    // a line ends: nothing is held, whatever came before
    expect(s.push(Buffer.from("line 1 sk_live_01\n")).toString()).toBe("line 1 sk_live_01\n");
    expect(s.holding).toBe(0);
    // the start of a secret is held, exactly as long as it is one: the rest goes out now
    expect(s.push(Buffer.from("tail sk_live")).toString()).toBe("tail ");
    expect(s.holding).toBe("sk_live".length);
    // ... also when it stops inside a character of a secret
    expect(s.push(Buffer.concat([Buffer.from("_0X p"), Buffer.from([0xc3])])).toString()).toBe("sk_live_0X ");
    expect(s.holding).toBe(2);
    expect(s.push(Buffer.from([0xa4])).toString()).toBe("");
    expect(s.holding).toBe(3);
    expect(s.end().toString()).toBe("pä");
  });

  it("passes bytes that are not UTF-8 through unchanged, and scrubs a secret next to them", () => {
    const raw = Buffer.concat([Buffer.from([0xff, 0xfe, 0x00, 0xc3]), Buffer.from(` ${secret} `), Buffer.from([0x80, 0xe2, 0x82])]);
    const want = Buffer.concat([Buffer.from([0xff, 0xfe, 0x00, 0xc3]), Buffer.from(` ${REDACTED} `), Buffer.from([0x80, 0xe2, 0x82])]);
    for (let i = 0; i <= raw.length; i++) expect(streamedBytes(r, raw, [i]).equals(want)).toBe(true);
    expect(r.redactBuffer(raw).equals(want)).toBe(true);
  });

  it("a redactor without secrets returns each chunk as it is", () => {
    const none = new Redactor([], quiet).byteStream();
    const c = Buffer.from("anything");
    expect(none.push(c)).toBe(c);
    expect(none.end().length).toBe(0);
  });

  it("matches redact() of the text on random texts, secrets and byte chunking (cuts inside characters included)", () => {
    const rand = rng(4242);
    for (let round = 0; round < 400; round++) {
      // whole characters (a lone surrogate has no UTF-8 form to compare with); ASCII every other round
      const alphabet = Array.from(round % 2 === 0 ? "abcab-\n_ " : "abcab-\n😀 _é");
      const pick = (n: number) => Array.from({ length: n }, () => alphabet[Math.floor(rand() * alphabet.length)]).join("");
      const secrets = Array.from({ length: 1 + Math.floor(rand() * 5) }, () => pick(4 + Math.floor(rand() * 10)));
      const red = new Redactor(secrets, quiet);
      let t = "";
      while (t.length < 120) t += rand() < 0.3 ? secrets[Math.floor(rand() * secrets.length)]! : pick(1 + Math.floor(rand() * 6));
      const b = Buffer.from(t);
      const cuts: number[] = [];
      for (let pos = Math.floor(rand() * 12); pos < b.length; pos += Math.floor(rand() * 12)) cuts.push(pos);
      const got = streamedBytes(red, b, cuts);
      expect(got.equals(red.redactBuffer(b))).toBe(true);
      // the token rule counts bytes here: the same as the text's code units for ASCII; for other text a run of
      // secrets can be long in bytes and short in characters, and is then scrubbed anywhere (only ever more)
      if (round % 2 === 0) expect(got.toString()).toBe(red.redact(t));
      expect(leaked(got.toString(), secrets)).toEqual([]);
    }
  });

  it("is fast: 200 MiB of output with 50 secrets in a few seconds at most", () => {
    const rand = rng(11);
    const secrets = Array.from({ length: 50 }, (_, i) => `tok-${i}-${Math.floor(rand() * 1e12).toString(36)}`);
    const red = new Redactor(secrets, quiet);
    const s = red.byteStream();
    const chunk = Buffer.from("Lorem ipsum dolor sit amet, tok-5 consectetur adipiscing elit 0123456789.\n".repeat(880));
    const t0 = performance.now();
    let n = 0;
    for (let total = 0; total < 200 * 2 ** 20; total += chunk.length) n += s.push(chunk).length;
    n += s.end().length;
    const ms = performance.now() - t0;
    expect(n).toBeGreaterThan(200 * 2 ** 20);
    expect(ms).toBeLessThan(20_000);
    console.log(`byte redaction: 200 MiB, 50 secrets: ${Math.round(ms)} ms`);
  });
});

describe("which values are secrets", () => {
  it("name heuristics: keys, tokens, passwords, credentials; not PWD, booleans or small numbers", () => {
    const f = findSecrets(
      {
        OPENAI_API_KEY: "sk-abc",
        GITHUB_TOKEN: "ghp_x1y2",
        DB_PASSWORD: "hunter22",
        DB_PASS: "p4ss",
        AWS_SECRET_ACCESS_KEY: "wJalrXUtnFEMI",
        SENTRY_DSN: "https://k3y@o1.ingest.sentry.io/2",
        PWD: "/work/main",
        OLDPWD: "/home/me",
        FEATURE_AUTH_ENABLED: "true",
        TOKEN_TTL: "3600",
        PATH: "/usr/bin:/bin",
        HOME: "/home/me",
      },
      "env",
    );
    const names = new Set(f.filter((x) => x.why === "name").map((x) => x.name));
    expect(names).toEqual(new Set(["OPENAI_API_KEY", "GITHUB_TOKEN", "DB_PASSWORD", "DB_PASS", "AWS_SECRET_ACCESS_KEY", "SENTRY_DSN"]));
    expect(f.map((x) => x.value)).not.toContain("/work/main");
    expect(f.find((x) => x.why === "url-password")).toBeUndefined(); // sentry's key is the username; the whole DSN is scrubbed by name
  });

  it("extracts URL passwords, secret query parameters and libpq passwords under any name", () => {
    const f = findSecrets(
      {
        DATABASE_URL: "postgres://trader:p%40ss%2Fw0rd@db.internal:5432/trading",
        REDIS_URL: "redis://:r3dis-pw@localhost:6379/0",
        FEED_URL: "wss://feed.example.com/stream?apikey=feedkey123&symbol=BTC",
        PG_CONNINFO: "host=localhost user=trader password='pg pw 42' dbname=trading",
        PLAIN_URL: "http://localhost:9000",
      },
      "env",
    );
    const values = f.map((x) => x.value);
    expect(values).toEqual(expect.arrayContaining(["p%40ss%2Fw0rd", "p@ss/w0rd", "r3dis-pw", "feedkey123", "pg pw 42"]));
    expect(values).not.toContain("trader");
    expect(values).not.toContain("BTC");
    expect(values).not.toContain("http://localhost:9000");
  });

  it("every other .env value of 6+ chars unless plainly not a secret", () => {
    const f = secretsFromDotenv(
      [
        "EXCHANGE_ACCOUNT=acct-77f3e9",
        "DB_HOST=localhost",
        "DB_PORT=5432",
        "QUESTDB=127.0.0.1:8812",
        "MODE=paper",
        "LOG_LEVEL=warning",
        "DEBUG=false",
        "RATIO=0.75",
        "ENDPOINT=https://api.example.com/v1",
        "SHORT=abcde",
        "DB_USER=trader_bot",
      ].join("\n"),
    );
    expect(f.filter((x) => x.why === "dotenv-value").map((x) => x.name).sort()).toEqual(["DB_USER", "EXCHANGE_ACCOUNT"]);
  });

  it("parses .env with quotes, comments, export prefix and multi-line values", () => {
    const text = [
      "# a comment API_KEY=not-this-one",
      "export API_KEY=exported-key-1",
      'QUOTED_SECRET="double quoted # not a comment"',
      "SINGLE_TOKEN='single-quoted-tok'",
      "INLINE_PASSWORD=inline-pw # trailing comment",
      'PRIVATE_KEY="-----BEGIN PRIVATE KEY-----\\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\\n-----END PRIVATE KEY-----"',
      "EMPTY_SECRET=",
    ].join("\n");
    const values = secretsFromDotenv(text).map((x) => x.value);
    expect(values).toEqual(
      expect.arrayContaining(["exported-key-1", "double quoted # not a comment", "single-quoted-tok", "inline-pw"]),
    );
    expect(values).not.toContain("not-this-one");
    expect(values.some((v) => v.includes("MIIEvQIBADANBgkqhkiG9w0BAQEFAASC"))).toBe(true);
  });

  it("collectSecrets reads the project's .env (missing → none) and the passed env, with printable variants", async () => {
    const dir = await mkdtemp(path.join(os.tmpdir(), "sbx-redact-"));
    try {
      expect(await collectSecrets(dir)).toEqual([]);
      await writeFile(
        path.join(dir, ".env"),
        'DB_PASSWORD=p@ss w"rd\nPRIVATE_KEY="-----BEGIN KEY-----\\nAAAABBBBCCCCDDDD\\n-----END KEY-----"\nDB_PORT=5432\n',
      );
      const secrets = await collectSecrets(dir, { SERVICE_TOKEN: "svc-token-9", PATH: "/usr/bin" }, { notSecret: [] });
      expect(secrets).toEqual(expect.arrayContaining(["p@ss w\"rd", "p%40ss%20w%22rd", 'p@ss w\\"rd', "AAAABBBBCCCCDDDD", "svc-token-9"]));
      expect(secrets).not.toContain("5432");
      expect(secrets).not.toContain("/usr/bin");
      const red = new Redactor(secrets, quiet);
      expect(red.redact("key:\r\nAAAABBBBCCCCDDDD\r\n url=x?p=p%40ss%20w%22rd")).toBe(`key:\r\n${REDACTED}\r\n url=x?p=${REDACTED}`);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it("no false positives on short or ordinary values", () => {
    const secrets = secretsFromDotenv("A=yes\nB=1234\nC=on\nD=abc\nE=localhost:5432\nF=production\nG=10.0.0.12\n");
    expect(secrets).toEqual([]);
    const red = new Redactor(secrets.map((s) => s.value), quiet);
    const line = "pytest -k production --port 5432 yes on abc";
    expect(red.redact(line)).toBe(line);
  });
});
