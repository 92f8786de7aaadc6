/**
 * A streaming consumer's pause: held at most once, released by close, never
 * taken again after close; one consumer never releases another's — checked
 * against the real ShimChannel gate (its `paused` is what stops reading).
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import pino from "pino";
import { afterEach, describe, expect, it } from "vitest";
import { FlowConsumer } from "../../src/phases/flow.js";
import { ShimChannel } from "../../src/phases/shim-channel.js";

const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

function channel(): ShimChannel {
  const dir = mkdtempSync(path.join(tmpdir(), "sbx-flow-"));
  dirs.push(dir);
  return new ShimChannel(path.join(dir, "control.sock"), "x".repeat(32), "ph_test", pino({ level: "silent" }));
}

describe("FlowConsumer", () => {
  it("holds at most one pause however often it is asked", () => {
    const ch = channel();
    const a = new FlowConsumer(ch);
    a.pause();
    a.pause();
    a.pause();
    expect(ch.paused).toBe(true);
    a.resume();
    expect(ch.paused).toBe(false);
  });

  it("a consumer that closes while paused releases the channel, and a late write cannot pause it again", () => {
    const ch = channel();
    const gone = new FlowConsumer(ch);
    gone.pause();
    gone.close();
    expect(ch.paused).toBe(false);
    gone.pause(); // the write after the client left
    expect(ch.paused).toBe(false);
    expect(gone.isHolding).toBe(false);
  });

  it("one consumer's close or resume never releases another's pause", () => {
    const ch = channel();
    const a = new FlowConsumer(ch);
    const b = new FlowConsumer(ch);
    a.pause();
    b.pause();
    a.close();
    a.resume();
    expect(ch.paused).toBe(true);
    b.resume();
    expect(ch.paused).toBe(false);
  });

  it("resume without a pause, and close twice, are harmless", () => {
    const ch = channel();
    const a = new FlowConsumer(ch);
    a.resume();
    a.close();
    a.close();
    expect(ch.paused).toBe(false);
  });

  it("a closed channel takes no pause; a consumer without a channel does nothing", async () => {
    const ch = channel();
    await ch.listen();
    await ch.close({ shutdownShim: false });
    new FlowConsumer(ch).pause();
    expect(ch.paused).toBe(false);
    const none = new FlowConsumer(null);
    none.pause();
    none.close();
  });

  it("a bound consumer's pause is its exec's: held with the exec id, released with it, re-held when bound while holding", () => {
    const calls: string[] = [];
    const gate = {
      hold: (_c: object, execId?: number) => calls.push(`hold ${execId ?? "-"}`),
      release: () => calls.push("release"),
    };
    const early = new FlowConsumer(gate);
    early.pause(); // a waiting line backed up before the exec was sent
    early.bind(7);
    early.resume();
    const bound = new FlowConsumer(gate);
    bound.bind(8);
    bound.bind(9); // the first binding stands
    bound.pause();
    bound.close();
    bound.bind(10);
    bound.pause();
    expect(calls).toEqual(["hold -", "hold 7", "release", "hold 8", "release"]);
  });
});
