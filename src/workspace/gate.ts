/**
 * Commands and checkpoints of one phase, kept apart: a checkpoint reads and
 * remounts the layer, which must not happen under a running command. Commands
 * share the gate; a checkpoint holds it alone. A waiting checkpoint goes
 * before commands that arrive after it (it would otherwise wait for ever
 * behind a stream of commands), and waits for those already running to end
 * (each is bounded by its timeout).
 */
export class ExecGate {
  private running = 0;
  private writer: Promise<void> | null = null;
  private drained: (() => void) | null = null;

  get runningCommands(): number {
    return this.running;
  }

  /** Enter as a command; call the returned function when the command ended. */
  async enter(): Promise<() => void> {
    while (this.writer) await this.writer;
    this.running++;
    let released = false;
    return () => {
      if (released) return;
      released = true;
      this.running--;
      if (this.running === 0) this.drained?.();
    };
  }

  /**
   * Enter as a command that runs alone (a pip command: what it writes on the
   * package disk is kept, so nothing else of the phase may write there
   * meanwhile): waits for the running ones to end, holds back new ones and
   * checkpoints until the returned function is called.
   */
  async alone(): Promise<() => void> {
    while (this.writer) await this.writer;
    let open!: () => void;
    this.writer = new Promise<void>((r) => (open = r));
    if (this.running > 0) await new Promise<void>((r) => (this.drained = r));
    this.drained = null;
    let released = false;
    return () => {
      if (released) return;
      released = true;
      this.writer = null;
      open();
    };
  }

  /** Run `fn` with no command running and none starting. */
  async exclusive<T>(fn: () => Promise<T>): Promise<T> {
    while (this.writer) await this.writer;
    let open!: () => void;
    this.writer = new Promise<void>((r) => (open = r));
    try {
      if (this.running > 0) await new Promise<void>((r) => (this.drained = r));
      this.drained = null;
      return await fn();
    } finally {
      this.writer = null;
      open();
    }
  }
}
