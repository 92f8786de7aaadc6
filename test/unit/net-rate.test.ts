import { describe, expect, it } from "vitest";
import { TokenBucket } from "../../src/net/rate.js";

describe("TokenBucket", () => {
  it("gives the burst at once, then refills at the rate, never above the burst", () => {
    let now = 1_000_000;
    const b = new TokenBucket(3, 2, () => now);
    expect([b.take(), b.take(), b.take(), b.take()]).toEqual([true, true, true, false]);
    now += 499; // 0.998 of a token
    expect(b.take()).toBe(false);
    now += 2; // one token
    expect(b.take()).toBe(true);
    expect(b.take()).toBe(false);
    now += 60_000; // long idle: back to the burst, not 120 tokens
    expect(Array.from({ length: 5 }, () => b.take())).toEqual([true, true, true, false, false]);
  });
});
