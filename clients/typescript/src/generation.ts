import type { GenerateResult, LoadProgressEvent, ProgressEvent, TokenEvent } from "./generated/protocol";

/** A streamed event of one generate: `type` is the notification's method. */
export type GenerateEvent = ({ type: "progress" } & ProgressEvent) | ({ type: "token" } & TokenEvent);
/** A streamed event of one load. */
export type LoadEvent = { type: "load_progress" } & LoadProgressEvent;
/** Any notification that belongs to a request (its params carry the request's id). */
export type RequestEvent = GenerateEvent | LoadEvent;
/** The events a method's request streams: a `load` gets `load_progress`, a `generate` the rest. */
export type EventOf<M extends string> = M extends "load" ? LoadEvent : M extends "generate" ? GenerateEvent : never;

/**
 * One running `generate`: iterate it (`for await`) for its `progress` and
 * `token` events; `result` is the final response. Leaving the loop early
 * (break, throw) cancels the generation.
 *
 * Events wait in a buffer for the loop only when someone may read them: from
 * the start when the generate was given no `onEvent` (so a loop that starts
 * after an `await` misses nothing), and otherwise only while a loop runs (a
 * host that takes its events through `onEvent` keeps nothing, however long
 * the generation). `GenerateOptions.buffer` overrides this.
 */
export class Generation implements AsyncIterable<GenerateEvent> {
  /** Settles with the final response; rejects with `RpcError` or `WorkerExitedError`. */
  readonly result: Promise<GenerateResult>;
  private readonly events: GenerateEvent[] = [];
  private wake: (() => void) | undefined;
  private finished = false;
  private failure: { error: unknown } | undefined;
  private cancelling: Promise<boolean> | undefined;
  private readers = 0;

  constructor(
    /** The request id, as in the events' `id`. */
    readonly id: number,
    result: Promise<GenerateResult>,
    private readonly cancelRequest: () => Promise<boolean>,
    /** Buffer events before any loop has started (see the class comment). */
    private readonly bufferUnread = true,
  ) {
    this.result = result;
    result.then(
      () => this.finish(undefined),
      (error) => this.finish({ error }),
    );
  }

  /** How many events wait to be read by a `for await` loop. */
  get buffered(): number {
    return this.events.length;
  }

  /**
   * Sends `cancel` (once; later calls return the first answer): true when the
   * generation will end with `stop_reason: "cancelled"`.
   */
  cancel(): Promise<boolean> {
    if (this.finished && !this.cancelling) return Promise.resolve(false);
    this.cancelling ??= this.cancelRequest();
    return this.cancelling;
  }

  /** @internal called by the worker for each routed notification. */
  push(event: GenerateEvent): void {
    if (this.readers === 0 && !this.bufferUnread) return;
    this.events.push(event);
    this.wakeReader();
  }

  async *[Symbol.asyncIterator](): AsyncGenerator<GenerateEvent, GenerateResult | undefined> {
    let done = false;
    this.readers++;
    try {
      for (;;) {
        const event = this.events.shift();
        if (event) {
          yield event;
          continue;
        }
        if (this.finished) break;
        await new Promise<void>((resolve) => (this.wake = resolve));
      }
      done = true;
      if (this.failure) throw this.failure.error;
      return await this.result;
    } finally {
      if (--this.readers === 0 && !this.bufferUnread) this.events.length = 0;
      if (!done && !this.finished) this.cancel().catch(() => {});
    }
  }

  private finish(failure: { error: unknown } | undefined): void {
    this.finished = true;
    this.failure = failure;
    this.wakeReader();
  }

  private wakeReader(): void {
    const wake = this.wake;
    this.wake = undefined;
    wake?.();
  }
}
