/**
 * Canonical JSON: the exact bytes the audit hash chain is computed over, and
 * the exact bytes of each audit.jsonl line.
 *
 * - object keys sorted by UTF-16 code units (JavaScript's default sort, as in
 *   RFC 8785), no whitespace, UTF-8;
 * - strings as JSON.stringify writes them, plus `\u007f`-`\u009f`, U+2028 and
 *   U+2029 escaped as `\uXXXX`, so a line contains no character that any
 *   common tool (Python's splitlines, editors, terminals) treats as a line
 *   break or control sequence;
 * - numbers as JSON.stringify writes them (shortest round-trip form); NaN and
 *   ±Infinity are rejected, as are lone surrogates (they have no UTF-8 form),
 *   undefined inside arrays, and anything that is not plain JSON data
 *   (functions, bigint, Dates, Buffers, class instances). `undefined` object
 *   properties are omitted, as JSON.stringify does.
 *
 * Parsing a canonical line with JSON.parse and canonicalising the result gives
 * the same bytes back, which is what `verifyJournal` checks.
 */

export type JsonValue = null | boolean | number | string | JsonValue[] | { [key: string]: JsonValue };

const EXTRA_ESCAPES = /[\u007f-\u009f\u2028\u2029]/g;
const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;
const LONE_SURROGATE_G = new RegExp(LONE_SURROGATE.source, "g");
/** Cheap pre-check: most strings have none of the characters the slow paths care about. */
const ANY_SURROGATE = /[\uD800-\uDFFF]/;
const ANY_SPECIAL = /[\u007f-\u009f\u2028\u2029\uD800-\uDFFF]/;

/** Replace every lone surrogate with U+FFFD (what String.prototype.toWellFormed does). */
export function toWellFormed(text: string): string {
  return ANY_SURROGATE.test(text) ? text.replace(LONE_SURROGATE_G, "\uFFFD") : text;
}

function str(s: string): string {
  if (!ANY_SPECIAL.test(s)) return JSON.stringify(s);
  if (LONE_SURROGATE.test(s)) throw new TypeError("canonical JSON: string contains a lone surrogate");
  return JSON.stringify(s).replace(EXTRA_ESCAPES, (ch) => `\\u${ch.charCodeAt(0).toString(16).padStart(4, "0")}`);
}

function write(value: unknown, at: string): string {
  switch (typeof value) {
    case "string":
      return str(value);
    case "boolean":
      return value ? "true" : "false";
    case "number":
      if (!Number.isFinite(value)) throw new TypeError(`canonical JSON: non-finite number at ${at}`);
      return JSON.stringify(value);
    case "object": {
      if (value === null) return "null";
      if (Array.isArray(value)) {
        return `[${value.map((v, i) => {
          if (v === undefined) throw new TypeError(`canonical JSON: undefined at ${at}[${i}]`);
          return write(v, `${at}[${i}]`);
        }).join(",")}]`;
      }
      const proto: unknown = Object.getPrototypeOf(value);
      if (proto !== Object.prototype && proto !== null) {
        throw new TypeError(`canonical JSON: ${at} is not a plain object`);
      }
      const obj = value as Record<string, unknown>;
      const parts: string[] = [];
      for (const key of Object.keys(obj).sort()) {
        const v = obj[key];
        if (v === undefined) continue;
        parts.push(`${str(key)}:${write(v, `${at}.${key}`)}`);
      }
      return `{${parts.join(",")}}`;
    }
    default:
      throw new TypeError(`canonical JSON: ${typeof value} at ${at} is not JSON data`);
  }
}

/**
 * Canonical JSON of an object with one more string member `key` set to
 * `value`, computed from `members` (see canonicalMembers) without
 * serialising the rest again.
 */
export function withMember(members: ReadonlyArray<readonly [string, string]>, key: string, value: string): string {
  const extra = `${str(key)}:${str(value)}`;
  const parts: string[] = [];
  let placed = false;
  for (const [k, text] of members) {
    if (!placed && k > key) {
      parts.push(extra);
      placed = true;
    }
    if (k !== key) parts.push(text);
  }
  if (!placed) parts.push(extra);
  return `{${parts.join(",")}}`;
}

/** The sorted `"key":value` members of a plain object's canonical form. */
export function canonicalMembers(obj: Record<string, unknown>): Array<[string, string]> {
  const out: Array<[string, string]> = [];
  for (const key of Object.keys(obj).sort()) {
    const v = obj[key];
    if (v === undefined) continue;
    out.push([key, `${str(key)}:${write(v, `$.${key}`)}`]);
  }
  return out;
}

/** Canonical JSON text of `value` (throws TypeError on anything that is not plain, finite, well-formed JSON data). */
export function canonicalJson(value: unknown): string {
  return write(value, "$");
}

/** Canonical JSON as UTF-8 bytes. */
export function canonicalBytes(value: unknown): Buffer {
  return Buffer.from(canonicalJson(value), "utf8");
}
