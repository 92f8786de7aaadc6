/**
 * The witness: the latest head the daemon signed for one state dir, kept
 * beside the signing key — outside the state dir, where the adversary of
 * docs/AUDIT.md "Threat model" (who can write the state dir, not the key)
 * cannot write.
 *
 * Why: a signed anchor proves that *some* head was signed, not that it is
 * the latest. Someone who can write the state dir can keep an old copy of
 * audit.jsonl and audit.anchor (or just an old anchor, and cut the journal
 * back to its signed seq), put it back later, and every signature still
 * verifies. Only something they cannot write can say the trail was longer:
 * this file. The daemon refuses to open a trail that does not reach the
 * witnessed head with its hash, and `audit verify` checks it the same way.
 *
 * Where: `<key file>.heads/<first 16 hex of SHA-256 of the state dir's
 * absolute path>` — one per state dir, as one key may sign several.
 * What: the signed head `{hash, key, seq, sig, stateDir}` as canonical JSON,
 * padded to 512 bytes and overwritten in place with one pwrite, like the
 * anchor; written with every new signature (at most one per signIntervalMs)
 * and made durable when the anchor is.
 */
import { createHash } from "node:crypto";
import { readFile } from "node:fs/promises";
import path from "node:path";
import { SandboxdError } from "../errors.js";
import { canonicalJson } from "./canonical.js";
import type { SignedHead } from "./journal.js";

export const WITNESS_BYTES = 512;

export interface Witness extends SignedHead {
  stateDir: string;
}

/**
 * Where the witness of `stateDir` lives: in `dir` (SANDBOXD_AUDIT_WITNESS_DIR,
 * for a key kept on a read-only mount), else beside the key at `keyFile`.
 */
export function witnessFile(keyFile: string, stateDir: string, dir?: string): string {
  const id = createHash("sha256").update(path.resolve(stateDir)).digest("hex").slice(0, 16);
  return path.join(dir ? path.resolve(dir) : `${keyFile}.heads`, id);
}

export function witnessBytes(w: Witness): Buffer {
  const json = canonicalJson({ hash: w.hash, key: w.key, seq: w.seq, sig: w.sig, stateDir: w.stateDir });
  return Buffer.from(`${json.padEnd(WITNESS_BYTES - 1, " ")}\n`, "utf8");
}

const HEX64 = /^[0-9a-f]{64}$/;

export function parseWitness(bytes: Buffer, file: string): Witness {
  let w: Partial<Witness> | null = null;
  try {
    w = JSON.parse(bytes.toString("utf8")) as Partial<Witness> | null;
  } catch {
    /* reported below */
  }
  if (
    typeof w !== "object" ||
    w === null ||
    typeof w.seq !== "number" ||
    !Number.isSafeInteger(w.seq) ||
    w.seq < 1 ||
    typeof w.hash !== "string" ||
    !HEX64.test(w.hash) ||
    typeof w.key !== "string" ||
    typeof w.sig !== "string" ||
    typeof w.stateDir !== "string"
  ) {
    throw new SandboxdError("SBX_ERR_AUDIT_CORRUPT", `the witness ${file} does not hold a signed head {seq, hash, key, sig, stateDir}`, {
      hint: "it lives beside the signing key, out of the state dir's reach: damage there means the key's folder was touched too. Check the trail with `sandboxd audit verify --state-dir DIR --key <the key you trust>`",
    });
  }
  return { seq: w.seq, hash: w.hash, key: w.key, sig: w.sig, stateDir: w.stateDir };
}

/** The witness at `file`, or null when there is none (a trail from before witnesses, or a key never used with this state dir). */
export async function readWitness(file: string): Promise<Witness | null> {
  let bytes: Buffer;
  try {
    bytes = await readFile(file);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") return null;
    throw new SandboxdError("SBX_ERR_AUDIT_KEY", `cannot read the witness ${file}: ${(e as NodeJS.ErrnoException).code ?? String(e)}`, {
      hint: "it lives beside the signing key and is read with the key's rights: run as the daemon's user",
      cause: e,
    });
  }
  if (bytes.length === 0) return null; // created, never written (a crash at the first open)
  return parseWitness(bytes, file);
}
