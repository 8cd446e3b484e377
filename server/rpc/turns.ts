/**
 * Event-loop turns for long requests: a huge Translate (or any request cut
 * into chunks) takes one chunk per turn, and every such request shares the
 * same turns, first come first served. However many heavy calls are in
 * flight, a turn does one chunk of their work, so the event loop comes back
 * to other calls (another tenant's unary RPC) after one chunk, not one chunk
 * per heavy call.
 */
export class Turns {
  private readonly waiting: (() => void)[] = [];
  private scheduled = false;

  /** Resolves in a later event-loop turn, one waiter per turn, in arrival order. */
  next(): Promise<void> {
    return new Promise((resolve) => {
      this.waiting.push(resolve);
      this.schedule();
    });
  }

  private schedule(): void {
    if (this.scheduled || this.waiting.length === 0) return;
    this.scheduled = true;
    // setImmediate from a check-phase callback runs in the next loop
    // iteration: I/O is polled between any two chunks.
    setImmediate(() => {
      this.scheduled = false;
      this.waiting.shift()!();
      this.schedule();
    });
  }
}
