/**
 * Random hex from the CSPRNG, drawn from a pool refilled a few KiB at a
 * time: each `randomBytes` call costs a trip into OpenSSL (15–20 µs here),
 * and an exec draws two names (its run id and its pytest report's). The
 * pool is the daemon's memory only, so a name is as unguessable as one from
 * `randomBytes` (crypto.randomUUID pools the same way).
 */
import { randomFillSync } from "node:crypto";

const POOL_BYTES = 4096;
const pool = Buffer.alloc(POOL_BYTES);
let used = POOL_BYTES;

/** `bytes` random bytes as 2×bytes hex digits. */
export function randomHex(bytes: number): string {
  if (bytes > POOL_BYTES) throw new RangeError(`randomHex: at most ${POOL_BYTES} bytes, asked for ${bytes}`);
  if (used + bytes > POOL_BYTES) {
    randomFillSync(pool);
    used = 0;
  }
  const hex = pool.toString("hex", used, used + bytes);
  // each byte is handed out once
  pool.fill(0, used, used + bytes);
  used += bytes;
  return hex;
}
