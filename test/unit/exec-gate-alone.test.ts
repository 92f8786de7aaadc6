/** ExecGate.alone: a pip command runs with no other command of its phase, and no checkpoint, running. */
import { describe, expect, it } from "vitest";
import { ExecGate } from "../../src/workspace/gate.js";

const tick = () => new Promise((r) => setTimeout(r, 5));

describe("ExecGate.alone", () => {
  it("waits for running commands, then holds back new commands and checkpoints until released", async () => {
    const gate = new ExecGate();
    const order: string[] = [];
    const leaveA = await gate.enter();
    const alone = gate.alone().then((release) => {
      order.push("alone");
      return release;
    });
    await tick();
    expect(order).toEqual([]);
    const later = gate.enter().then((leave) => {
      order.push("later");
      return leave;
    });
    const checkpoint = gate.exclusive(async () => void order.push("checkpoint"));
    leaveA();
    const release = await alone;
    await tick();
    expect(order).toEqual(["alone"]);
    release();
    (await later)();
    await checkpoint;
    expect(order.slice(0, 1)).toEqual(["alone"]);
    expect(order).toContain("later");
    expect(order).toContain("checkpoint");
  });
});
