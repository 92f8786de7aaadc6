/**
 * The per-command seccomp filter (src/shim/seccomp.ts), run through a small
 * BPF interpreter: calls on the caller itself pass, calls on another process
 * by pid are EPERM, other ABIs ENOSYS, everything else untouched. The real
 * filter is exercised from inside a sandbox in
 * test/integration/process-boundary.test.ts.
 */
import { describe, expect, it } from "vitest";
import { ARCHES, SECCOMP_PY, SECCOMP_RET_ALLOW, commandFilter, filterHex, runFilter } from "../../src/shim/seccomp.js";

const X86 = ARCHES.x86_64!;
const filter = commandFilter(X86);
const EPERM = 0x00050001;
const ENOSYS = 0x00050026;
const call = (nr: number, ...args: bigint[]): number => runFilter(filter, { arch: X86.audit, nr, args });

describe("per-command seccomp filter", () => {
  it("lets a process change its own limits and priorities", () => {
    expect(call(302, 0n, 7n, 0x7ffd0000n, 0n)).toBe(SECCOMP_RET_ALLOW); // setrlimit → prlimit64(0, …)
    expect(call(141, 0n, 0n, 5n)).toBe(SECCOMP_RET_ALLOW); // nice(): setpriority(PRIO_PROCESS, 0)
    expect(call(141, 1n, 0n, 5n)).toBe(SECCOMP_RET_ALLOW); // its own process group
    expect(call(251, 1n, 0n, 0n)).toBe(SECCOMP_RET_ALLOW); // ioprio_set(IOPRIO_WHO_PROCESS, 0)
    for (const nr of [142, 144, 203, 314]) expect(call(nr, 0n)).toBe(SECCOMP_RET_ALLOW);
  });

  it("refuses them on another process by pid, group or user", () => {
    expect(call(302, 4242n, 7n, 0x7ffd0000n, 0n)).toBe(EPERM);
    expect(call(302, 4242n, 7n, 0x7ffd000000000000n, 0n)).toBe(EPERM); // a pointer with only high bits
    expect(call(141, 0n, 4242n, 19n)).toBe(EPERM);
    expect(call(141, 1n, 4242n, 19n)).toBe(EPERM);
    expect(call(141, 2n, 0n, 19n)).toBe(EPERM); // PRIO_USER: every process of the uid
    expect(call(141, 2n, 1000n, 19n)).toBe(EPERM);
    expect(call(251, 3n, 0n, 0n)).toBe(EPERM); // IOPRIO_WHO_USER
    expect(call(251, 1n, 4242n, 0n)).toBe(EPERM);
    for (const nr of [142, 144, 203, 314]) expect(call(nr, 4242n)).toBe(EPERM);
  });

  it("only the low 32 bits of a pid count, as in the kernel", () => {
    expect(call(144, 0x1_0000_0000n)).toBe(SECCOMP_RET_ALLOW); // the kernel reads pid 0
    expect(call(144, 0x1_0000_1092n)).toBe(EPERM);
  });

  it("may still read another process's limits (prlimit with no new limit)", () => {
    expect(call(302, 4242n, 7n, 0n, 0x7ffd0000n)).toBe(SECCOMP_RET_ALLOW);
  });

  it("leaves every other call alone and answers ENOSYS to other ABIs", () => {
    for (const nr of [0, 1, 59, 62, 200, 435]) expect(call(nr, 4242n)).toBe(SECCOMP_RET_ALLOW);
    expect(call(0x40000000 + 302, 4242n)).toBe(ENOSYS); // x32
    expect(runFilter(filter, { arch: 0x40000003, nr: 340, args: [4242n] })).toBe(ENOSYS); // i386 prlimit64
  });

  it("is the same program for aarch64's numbers, and both reach the Python side", () => {
    const arm = commandFilter(ARCHES.aarch64!);
    expect(runFilter(arm, { arch: ARCHES.aarch64!.audit, nr: 261, args: [4242n, 7n, 1n] })).toBe(EPERM);
    expect(runFilter(arm, { arch: ARCHES.aarch64!.audit, nr: 261, args: [0n, 7n, 1n] })).toBe(SECCOMP_RET_ALLOW);
    expect(SECCOMP_PY).toContain(filterHex(filter));
    expect(SECCOMP_PY).toContain(filterHex(arm));
  });
});
