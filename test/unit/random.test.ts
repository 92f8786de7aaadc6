import { describe, expect, it } from "vitest";
import { randomHex } from "../../src/util/random.js";

describe("randomHex (pooled CSPRNG bytes)", () => {
  it("gives 2×n hex digits, never the same bytes twice, across many pool refills", () => {
    const seen = new Set<string>();
    // 4096-byte pool: 10 000 × 12 bytes refills it about 30 times
    for (let i = 0; i < 10_000; i++) {
      const h = randomHex(12);
      expect(h).toMatch(/^[0-9a-f]{24}$/);
      seen.add(h);
    }
    expect(seen.size).toBe(10_000);
  });

  it("is not a zeroed pool: the digits are spread over all sixteen", () => {
    const counts = new Map<string, number>();
    for (const c of Array.from({ length: 2_000 }, () => randomHex(8)).join("")) counts.set(c, (counts.get(c) ?? 0) + 1);
    expect(counts.size).toBe(16);
    // 32 000 digits, 2 000 expected each: a stuck or zero-filled source is far outside this
    for (const n of counts.values()) expect(n).toBeGreaterThan(1_600);
  });

  it("refuses more than a pool at once", () => {
    expect(() => randomHex(4097)).toThrow(/at most 4096 bytes/);
  });
});
