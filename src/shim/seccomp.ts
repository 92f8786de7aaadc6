/**
 * A seccomp filter per command: the calls that act on *another* process by
 * pid and that neither Landlock nor the uid stops.
 *
 * Every command runs as the project owner, and the kernel lets a process
 * change the resource limits (`prlimit`), the nice value (`setpriority`), the
 * scheduling policy and CPU affinity (`sched_set*`) and the I/O priority
 * (`ioprio_set`) of any process with the same uid. Landlock's domain (see
 * landlock.ts) stops ptrace and signals between commands but not these: a
 * command could set a concurrent test run's RLIMIT_NOFILE to 5 and make it
 * fail, or its RLIMIT_CPU to one second and have the kernel kill it, and the
 * trail would record that failure as the other command's own. So each
 * command gets a filter that allows these calls only on the caller itself
 * (pid 0, or its own process group for setpriority/ioprio_set; prlimit may
 * still read anyone's limits) and answers EPERM otherwise. A process can
 * still change its own limits and priority, but no longer a child's by pid
 * (`renice -p`, `prlimit --pid`, psutil's `nice()` on a pid).
 *
 * Syscalls of another ABI (x32, i386 through int 0x80) would go round the
 * numbers below; the filter answers ENOSYS to all of them (nothing in the
 * image is built for those ABIs).
 *
 * The program is classic BPF, built here and handed to the Python that
 * installs it (`prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER)`, allowed without
 * privilege under no_new_privs), as bytes per architecture.
 */

/** struct sock_filter: u16 code, u8 jt, u8 jf, u32 k */
export interface BpfInsn {
  code: number;
  jt: number;
  jf: number;
  k: number;
}

const LD_W_ABS = 0x20; // BPF_LD | BPF_W | BPF_ABS
const JEQ_K = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const JGE_K = 0x35; // BPF_JMP | BPF_JGE | BPF_K
const RET_K = 0x06; // BPF_RET | BPF_K

export const SECCOMP_RET_ALLOW = 0x7fff0000;
const SECCOMP_RET_ERRNO = 0x00050000;
const EPERM = 1;
const ENOSYS = 38;

/** offsets in struct seccomp_data */
const NR = 0;
const ARCH = 4;
/** low 32 bits of argument i (little-endian: both supported architectures) */
const argLow = (i: number): number => 16 + 8 * i;
const argHigh = (i: number): number => 20 + 8 * i;

/** the guarded calls, and which of their targets are the caller itself */
type Guard =
  /** allowed when argument `arg` is 0 (the calling process) */
  | { kind: "self"; arg: number }
  /** prlimit64: the caller, or no new limit (a read) */
  | { kind: "prlimit" }
  /** setpriority/ioprio_set(which, who): who 0, with `which` one of `whichSelf` (process or process group) */
  | { kind: "which"; whichSelf: number[] };

interface Arch {
  audit: number;
  /** syscall numbers at or above this are another ABI on the same arch (x32) */
  foreignFrom?: number;
  calls: Array<{ nr: number; guard: Guard }>;
}

const SELF0: Guard = { kind: "self", arg: 0 };
const PRIO_SELF: Guard = { kind: "which", whichSelf: [0, 1] }; // PRIO_PROCESS, PRIO_PGRP
const IOPRIO_SELF: Guard = { kind: "which", whichSelf: [1, 2] }; // IOPRIO_WHO_PROCESS, IOPRIO_WHO_PGRP

export const ARCHES: Record<string, Arch> = {
  x86_64: {
    audit: 0xc000003e,
    foreignFrom: 0x40000000,
    calls: [
      { nr: 302, guard: { kind: "prlimit" } },
      { nr: 141, guard: PRIO_SELF },
      { nr: 251, guard: IOPRIO_SELF },
      { nr: 142, guard: SELF0 }, // sched_setparam
      { nr: 144, guard: SELF0 }, // sched_setscheduler
      { nr: 203, guard: SELF0 }, // sched_setaffinity
      { nr: 314, guard: SELF0 }, // sched_setattr
    ],
  },
  aarch64: {
    audit: 0xc00000b7,
    calls: [
      { nr: 261, guard: { kind: "prlimit" } },
      { nr: 140, guard: PRIO_SELF },
      { nr: 30, guard: IOPRIO_SELF },
      { nr: 118, guard: SELF0 },
      { nr: 119, guard: SELF0 },
      { nr: 122, guard: SELF0 },
      { nr: 274, guard: SELF0 },
    ],
  },
};

/** A tiny assembler: instructions with symbolic jump targets, resolved at the end. */
class Program {
  private readonly insns: Array<{ code: number; k: number; jt?: string; jf?: string }> = [];
  private readonly labels = new Map<string, number>();

  op(code: number, k: number, jt?: string, jf?: string): void {
    this.insns.push({ code, k, jt, jf });
  }
  label(name: string): void {
    this.labels.set(name, this.insns.length);
  }
  build(): BpfInsn[] {
    return this.insns.map((i, at) => {
      const to = (name: string | undefined): number => {
        if (name === undefined) return 0;
        const target = this.labels.get(name);
        if (target === undefined || target <= at || target - at - 1 > 255) throw new Error(`bad BPF jump to ${name}`);
        return target - at - 1;
      };
      return { code: i.code, jt: to(i.jt), jf: to(i.jf), k: i.k >>> 0 };
    });
  }
}

/** The filter for one architecture, as instructions. */
export function commandFilter(arch: Arch): BpfInsn[] {
  const p = new Program();
  p.op(LD_W_ABS, ARCH);
  p.op(JEQ_K, arch.audit, "native", "foreign");
  p.label("native");
  p.op(LD_W_ABS, NR);
  if (arch.foreignFrom !== undefined) p.op(JGE_K, arch.foreignFrom, "foreign", "calls");
  p.label("calls");
  arch.calls.forEach((c, n) => {
    const next = `next${n}`;
    const check = `check${n}`;
    p.op(JEQ_K, c.nr, check, next);
    p.label(check);
    switch (c.guard.kind) {
      case "self":
        p.op(LD_W_ABS, argLow(c.guard.arg));
        p.op(JEQ_K, 0, "allow", "deny");
        break;
      case "prlimit":
        p.op(LD_W_ABS, argLow(0));
        p.op(JEQ_K, 0, "allow", `read${n}`);
        p.label(`read${n}`);
        p.op(LD_W_ABS, argLow(2));
        p.op(JEQ_K, 0, `readHigh${n}`, "deny");
        p.label(`readHigh${n}`);
        p.op(LD_W_ABS, argHigh(2));
        p.op(JEQ_K, 0, "allow", "deny");
        break;
      case "which": {
        p.op(LD_W_ABS, argLow(1));
        p.op(JEQ_K, 0, `which${n}`, "deny");
        p.label(`which${n}`);
        p.op(LD_W_ABS, argLow(0));
        c.guard.whichSelf.forEach((w, m) => {
          const last = m === (c.guard as { whichSelf: number[] }).whichSelf.length - 1;
          p.op(JEQ_K, w, "allow", last ? "deny" : `which${n}_${m + 1}`);
          if (!last) p.label(`which${n}_${m + 1}`);
        });
        break;
      }
    }
    p.label(next);
    // the accumulator still holds the syscall number on this path
  });
  p.label("allow");
  p.op(RET_K, SECCOMP_RET_ALLOW);
  p.label("deny");
  p.op(RET_K, SECCOMP_RET_ERRNO | EPERM);
  p.label("foreign");
  p.op(RET_K, SECCOMP_RET_ERRNO | ENOSYS);
  return p.build();
}

/** The filter as struct sock_filter bytes (little-endian), hex-encoded for the Python side. */
export function filterHex(insns: BpfInsn[]): string {
  const b = Buffer.alloc(insns.length * 8);
  insns.forEach((i, n) => {
    b.writeUInt16LE(i.code, n * 8);
    b.writeUInt8(i.jt, n * 8 + 2);
    b.writeUInt8(i.jf, n * 8 + 3);
    b.writeUInt32LE(i.k, n * 8 + 4);
  });
  return b.toString("hex");
}

/**
 * Runs a filter on one call, as the kernel would (only the instructions
 * above): for the unit tests.
 */
export function runFilter(insns: BpfInsn[], call: { arch: number; nr: number; args?: bigint[] }): number {
  const data = Buffer.alloc(64);
  data.writeInt32LE(call.nr, NR);
  data.writeUInt32LE(call.arch, ARCH);
  (call.args ?? []).forEach((a, i) => data.writeBigUInt64LE(BigInt.asUintN(64, a), 16 + 8 * i));
  let acc = 0;
  for (let pc = 0; pc < insns.length; pc++) {
    const i = insns[pc]!;
    if (i.code === LD_W_ABS) acc = data.readUInt32LE(i.k);
    else if (i.code === JEQ_K) pc += acc === i.k ? i.jt : i.jf;
    else if (i.code === JGE_K) pc += acc >= i.k ? i.jt : i.jf;
    else if (i.code === RET_K) return i.k;
    else throw new Error(`unknown BPF op ${i.code}`);
  }
  throw new Error("BPF program fell off its end");
}

/** Python: `_SECCOMP`, the filter's bytes by `os.uname().machine`. */
export const SECCOMP_PY = `_SECCOMP = {${Object.entries(ARCHES)
  .map(([name, arch]) => `"${name}": bytes.fromhex("${filterHex(commandFilter(arch))}")`)
  .join(", ")}}\n`;
