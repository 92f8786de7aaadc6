/**
 * Offline anchoring: the audit anchor, signed with an ed25519 key the daemon
 * keeps outside its state dir.
 *
 * The hash chain alone cannot stop someone who can write the state dir from
 * rewriting records *and* the anchor consistently. With the anchor signed by
 * a key that lives elsewhere (by default /etc/sandboxd/audit-signing.key as
 * root), a rewrite needs that key too. docs/AUDIT.md "Signed anchors".
 *
 * What is signed (the message, exactly these bytes):
 *   {"ctx":"sandboxd.audit.anchor.v1","hash":"<64 hex>","seq":N}
 * i.e. the canonical JSON of the chain head, with a context string so the
 * signature can never be taken for one over anything else. `openssl pkeyutl
 * -verify -rawin` checks it (docs/AUDIT.md shows how).
 *
 * A key's fingerprint is the SHA-256 (hex) of its public key's DER
 * SubjectPublicKeyInfo: `openssl pkey -pubin -in key.pub -outform DER |
 * sha256sum` gives the same.
 */
import { createHash, createPrivateKey, createPublicKey, generateKeyPairSync, sign, verify, type KeyObject } from "node:crypto";
import { constants as fsc } from "node:fs";
import { appendFile, link, mkdir, open, readFile, rename, stat, unlink } from "node:fs/promises";
import path from "node:path";
import { SandboxdError } from "../errors.js";
import { canonicalJson } from "./canonical.js";

export const ANCHOR_SIGNATURE_CONTEXT = "sandboxd.audit.anchor.v1";

export interface ChainPoint {
  seq: number;
  hash: string;
}

/** The exact bytes an anchor signature is made over. */
export function anchorMessage(head: ChainPoint): Buffer {
  return Buffer.from(canonicalJson({ ctx: ANCHOR_SIGNATURE_CONTEXT, hash: head.hash, seq: head.seq }), "utf8");
}

/** SHA-256 hex of the public key's DER SubjectPublicKeyInfo. */
export function fingerprintOf(publicKey: KeyObject): string {
  return createHash("sha256").update(publicKey.export({ type: "spki", format: "der" })).digest("hex");
}

/** An ed25519 public key from PEM, or null when the text is not one. */
export function publicKeyFromPem(pem: string): KeyObject | null {
  try {
    const k = createPublicKey(pem);
    return k.asymmetricKeyType === "ed25519" ? k : null;
  } catch {
    return null;
  }
}

/** Does `sig` (base64) sign `head` under `publicKey`? */
export function verifyAnchorSignature(head: ChainPoint, sig: string, publicKey: KeyObject): boolean {
  const raw = Buffer.from(sig, "base64");
  if (raw.length !== 64 || raw.toString("base64") !== sig) return false;
  try {
    return verify(null, anchorMessage(head), publicKey, raw);
  } catch {
    return false;
  }
}

/** The daemon's signing key, loaded; signs anchors. */
export class AnchorSigner {
  readonly fingerprint: string;
  readonly publicKeyPem: string;
  readonly publicKey: KeyObject;

  /**
   * @param keyFile where the private key was read from (recorded, for the operator)
   * @param created the key was created by this start (recorded in the trail)
   */
  /**
   * @param previous keys this one replaced (`<keyFile>.previous`): an anchor
   *   signed by one of them is a rotation the operator made, not a stranger's
   */
  constructor(
    private readonly key: KeyObject,
    readonly keyFile: string,
    readonly created = false,
    readonly previous: ReadonlyMap<string, KeyObject> = new Map(),
  ) {
    if (key.type !== "private" || key.asymmetricKeyType !== "ed25519") throw new TypeError("AnchorSigner needs an ed25519 private key");
    const pub = createPublicKey(key);
    this.publicKey = pub;
    this.fingerprint = fingerprintOf(pub);
    this.publicKeyPem = pub.export({ type: "spki", format: "pem" }).toString();
  }

  signSync(head: ChainPoint): string {
    return sign(null, anchorMessage(head), this.key).toString("base64");
  }

  /**
   * Signs on libuv's thread pool, so the journal can sign a batch's anchor
   * while the batch's write and fdatasync are under way (measured here: one
   * ed25519 signature ≈ 70 µs, one fdatasync ≈ 120 µs).
   */
  sign(head: ChainPoint): Promise<string> {
    const msg = anchorMessage(head);
    return new Promise((resolve, reject) => sign(null, msg, this.key, (err, sig) => (err ? reject(err) : resolve(sig.toString("base64")))));
  }

  /** A signer from a freshly made key held in memory (tests, benches); `previous`: the signers it replaced. */
  static ephemeral(previous: readonly AnchorSigner[] = []): AnchorSigner {
    return new AnchorSigner(generateKeyPairSync("ed25519").privateKey, "(in memory)", false, new Map(previous.map((p) => [p.fingerprint, p.publicKey])));
  }
}

function keyError(message: string, hint: string, cause?: unknown): SandboxdError {
  return new SandboxdError("SBX_ERR_AUDIT_KEY", message, { hint, cause });
}

const KEY_HINT =
  "give the daemon a readable ed25519 key (PEM, PKCS#8), mode 0600, outside the state dir: --audit-key FILE or SANDBOXD_AUDIT_KEY; `sandboxd audit key --new --key-file FILE` makes one (docs/AUDIT.md \"Signed anchors\")";

/** `<keyFile>.previous`: the public keys (PEM, one after another) of the keys this one replaced. */
export function previousKeysFile(keyFile: string): string {
  return `${keyFile}.previous`;
}

async function readPreviousKeys(keyFile: string): Promise<Map<string, KeyObject>> {
  const file = previousKeysFile(keyFile);
  let text: string;
  try {
    text = await readFile(file, "utf8");
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") return new Map();
    throw keyError(`cannot read ${file}: ${(e as NodeJS.ErrnoException).code ?? String(e)}`, KEY_HINT, e);
  }
  const keys = new Map<string, KeyObject>();
  for (const pem of text.match(/-----BEGIN PUBLIC KEY-----[\s\S]*?-----END PUBLIC KEY-----/g) ?? []) {
    const k = publicKeyFromPem(pem);
    if (!k) throw keyError(`${file} holds a public key that is not ed25519`, "keep only the ed25519 public keys of earlier signing keys in it");
    keys.set(fingerprintOf(k), k);
  }
  return keys;
}

/** Reads and checks a private key file: ed25519, PEM, not readable by group or others. */
export async function readSigningKey(file: string): Promise<AnchorSigner> {
  let text: string;
  let mode: number;
  try {
    mode = (await stat(file)).mode;
    text = await readFile(file, "utf8");
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code ?? "EUNKNOWN";
    throw keyError(`cannot read the audit signing key ${file}: ${code}; anchors are never written unsigned, so the daemon does not start`, KEY_HINT, e);
  }
  if ((mode & 0o077) !== 0) {
    throw keyError(
      `the audit signing key ${file} is open to group or others (mode ${(mode & 0o777).toString(8).padStart(4, "0")}); a key others can read signs nothing they could not forge`,
      `chmod 600 ${file} (and keep it owned by the daemon's user), then start again`,
    );
  }
  let key: KeyObject;
  try {
    key = createPrivateKey(text);
  } catch (e) {
    throw keyError(`${file} is not a private key in PEM form`, KEY_HINT, e);
  }
  if (key.asymmetricKeyType !== "ed25519") {
    throw keyError(`${file} holds a ${key.asymmetricKeyType ?? "unknown"} key; audit anchors are signed with ed25519`, KEY_HINT);
  }
  return new AnchorSigner(key, file, false, await readPreviousKeys(file));
}

/**
 * Rotation: a new key replaces the one at `file`, whose public key is
 * appended to `<file>.previous` first, so the daemon's next start accepts
 * the trail's last anchor (signed by the old key) as its own history. The old
 * private key is not kept. The trail records the change on the next start
 * (`audit.signing_key` with `previousKey`).
 */
export async function rotateSigningKey(file: string): Promise<{ signer: AnchorSigner; replaced: string }> {
  const old = await readSigningKey(file);
  const prevFile = previousKeysFile(file);
  const { privateKey } = generateKeyPairSync("ed25519");
  const tmp = `${file}.${process.pid}.${Date.now()}.tmp`;
  try {
    await appendFile(prevFile, old.publicKeyPem, { mode: 0o600 });
    const pfh = await open(prevFile, fsc.O_RDONLY);
    try {
      await pfh.sync();
    } finally {
      await pfh.close();
    }
    const fh = await open(tmp, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_EXCL, 0o600);
    try {
      await fh.writeFile(privateKey.export({ type: "pkcs8", format: "pem" }).toString());
      await fh.sync();
    } finally {
      await fh.close();
    }
    await rename(tmp, file);
    const dfh = await open(path.dirname(file), fsc.O_RDONLY);
    try {
      await dfh.sync();
    } finally {
      await dfh.close();
    }
  } catch (e) {
    // the temp file may not exist yet; the rotation's own error is the one reported
    // eslint-disable-next-line no-restricted-syntax -- see above
    await unlink(tmp).catch(() => undefined);
    throw keyError(`could not rotate the audit signing key ${file}: ${(e as NodeJS.ErrnoException).code ?? String(e)}`, KEY_HINT, e);
  }
  return { signer: await readSigningKey(file), replaced: old.fingerprint };
}

/**
 * Makes a new key at `file` (PEM PKCS#8, mode 0600, its folder 0700 when
 * made here). Never overwrites: the key is written to a temp file and
 * hard-linked into place, so a key that exists — or one another process
 * makes at the same moment — is left alone (EEXIST), and no reader ever
 * sees half a key.
 */
export async function createSigningKey(file: string): Promise<AnchorSigner> {
  const dir = path.dirname(file);
  const { privateKey } = generateKeyPairSync("ed25519");
  const pem = privateKey.export({ type: "pkcs8", format: "pem" }).toString();
  const tmp = `${file}.${process.pid}.${Date.now()}.tmp`;
  try {
    await mkdir(dir, { recursive: true, mode: 0o700 });
    const fh = await open(tmp, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_EXCL, 0o600);
    try {
      await fh.writeFile(pem);
      await fh.sync();
    } finally {
      await fh.close();
    }
    await link(tmp, file);
    const dfh = await open(dir, fsc.O_RDONLY);
    try {
      await dfh.sync();
    } finally {
      await dfh.close();
    }
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code ?? "EUNKNOWN";
    if (code === "EEXIST") throw keyError(`${file} already exists; a key is never overwritten`, "move the old key aside first (keep its public key for auditors: `sandboxd audit key --key-file FILE`)", e);
    throw keyError(`cannot create the audit signing key ${file}: ${code}`, KEY_HINT, e);
  } finally {
    // linked into place (or never made): the temp name goes either way
    // eslint-disable-next-line no-restricted-syntax -- see above
    await unlink(tmp).catch(() => undefined);
  }
  return new AnchorSigner(privateKey, file, true);
}

/**
 * The daemon's key at start: read it; when it is missing, create it — but
 * only if the trail has no signed anchor yet. A trail already signed by a
 * key whose file has gone gets SBX_ERR_AUDIT_KEY instead: a key replaced
 * without anyone deciding so would break the line of signatures silently.
 * Rotation is a deliberate step (docs/AUDIT.md "Key rotation").
 */
export async function loadOrCreateSigningKey(file: string, trailSignedBy: string | null): Promise<AnchorSigner> {
  try {
    return await readSigningKey(file);
  } catch (e) {
    const cause = (e as SandboxdError).cause as NodeJS.ErrnoException | undefined;
    if (cause?.code !== "ENOENT") throw e;
  }
  if (trailSignedBy !== null) {
    throw keyError(
      `the audit signing key ${file} is missing, but the trail's anchor is signed with key ${trailSignedBy}; a new key is not made in its place without an operator's decision`,
      `restore ${file} from its backup; or, if it is lost for good, make a new one (\`sandboxd audit key --new --key-file ${file}\`), append the lost key's public key (the trail's audit.signing_key record holds it) to ${previousKeysFile(file)}, and start again (the trail records the change)`,
    );
  }
  try {
    return await createSigningKey(file);
  } catch (e) {
    // another daemon made it between our read and our link: use theirs
    if ((e as SandboxdError).code === "SBX_ERR_AUDIT_KEY" && ((e as SandboxdError).cause as NodeJS.ErrnoException | undefined)?.code === "EEXIST") {
      return readSigningKey(file);
    }
    throw e;
  }
}
