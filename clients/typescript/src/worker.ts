import { spawn, type ChildProcessWithoutNullStreams } from "node:child_process";
import { StringDecoder } from "node:string_decoder";

import { Generation, type EventOf, type GenerateEvent, type RequestEvent } from "./generation";
import { ProtocolError, RpcError, WorkerExitedError } from "./errors";
import {
  PROTOCOL_VERSION,
  type EmbedParams,
  type EmbedResult,
  type GenerateParams,
  type MethodName,
  type Methods,
  type ReadyEvent,
} from "./generated/protocol";
import { LineSplitter } from "./lines";
import { checkIntegerParams } from "./params";

export interface SpawnOptions {
  /** The Python interpreter that has mlx-worker installed. Default `python3`. */
  python?: string;
  /** Extra worker arguments, after `-m mlx_worker` (e.g. `["--log-level", "debug"]`). */
  args?: string[];
  /** The worker's environment. Default `process.env`. */
  env?: NodeJS.ProcessEnv;
  /** The worker's working directory. */
  cwd?: string;
  /** Give up (and kill the process) when `ready` hasn't come by then. Default 60 000 ms. */
  readyTimeoutMs?: number;
  /** How much of stderr `WorkerExitedError.stderrTail` keeps. Default 16 KiB. */
  stderrTailBytes?: number;
  /** The worker's stderr (its logs), decoded, chunk by chunk. stderr is always drained. */
  onStderr?: (text: string) => void;
  /** Messages no request claims: notifications for unknown ids, `id: null` errors. */
  onUnrouted?: (message: unknown) => void;
  /** Every protocol line, both ways, without its `\n` (for logs and tests). */
  onLine?: (direction: "send" | "recv", line: string) => void;
  /** The protocol major this client accepts. Default: the one it was generated for. */
  protocolMajor?: number;
  /**
   * What one of the host's own callbacks (`onEvent`, `onStderr`, `onLine`,
   * `onUnrouted`) threw. Default: `console.error`. Never rethrown: an uncaught
   * exception would end a Node process or an Electron main process. A throwing
   * `onEvent` also cancels its request, and that request's later events are
   * not delivered to it.
   */
  onError?: (error: unknown, source: CallbackSource) => void;
}

/** Which host callback threw, and for which request. */
export interface CallbackSource {
  callback: "onEvent" | "onStderr" | "onLine" | "onUnrouted";
  /** The request whose event it was (`onEvent` only). */
  id?: number;
}

export interface RequestOptions<E extends RequestEvent = RequestEvent> {
  /**
   * Called with each notification for this request (`load_progress` of a
   * load, `progress` / `token` of a generate). If it throws, the request is
   * cancelled and the error goes to `onError`.
   */
  onEvent?: (event: E) => void;
  /** What this request's `onEvent` threw. Default: the worker's `onError`. */
  onError?: (error: unknown, source: CallbackSource) => void;
}

export interface GenerateOptions extends RequestOptions<GenerateEvent> {
  /** Aborting sends `cancel`; the generation then ends with `stop_reason: "cancelled"`. */
  signal?: AbortSignal;
  /**
   * Keep events for a `for await` loop that has not started yet. Default: true
   * without `onEvent`, false with it (then only a running loop gets them, and
   * a long generation driven by `onEvent` keeps nothing in memory).
   */
  buffer?: boolean;
}

export interface CloseOptions {
  /** After `shutdown` and closing stdin, wait this long before SIGTERM. Default 3000 ms. */
  shutdownTimeoutMs?: number;
  /** After SIGTERM, wait this long before SIGKILL. Default 2000 ms. */
  termTimeoutMs?: number;
}

export interface ExitInfo {
  exitCode: number | null;
  signal: NodeJS.Signals | null;
}

export interface CloseResult extends ExitInfo {
  /** The signal `close()` had to send, or null when the worker exited on its own. */
  escalatedTo: "SIGTERM" | "SIGKILL" | null;
}

interface Pending {
  method: string;
  resolve: (result: any) => void;
  reject: (error: unknown) => void;
  onEvent?: (event: RequestEvent) => void;
}

// The notifications routed to their request's onEvent (by the id in their params).
const REQUEST_EVENTS = new Set(["progress", "token", "load_progress"]);

/**
 * Spawns `python -m mlx_worker` and resolves once it has sent `ready` with a
 * compatible protocol version. Rejects with `WorkerExitedError` when the
 * interpreter can't start or the worker exits (or stays silent) before
 * `ready`, and with `ProtocolError` on another protocol major.
 */
export function spawnWorker(options: SpawnOptions = {}): Promise<Worker> {
  return Worker.start(options);
}

/** A running worker. Safe to use from any number of async tasks at once. */
export class Worker {
  /** The worker's `ready` notification: versions, device, capabilities. */
  ready!: ReadyEvent;
  /** Settles (never rejects) once the process has exited and its output is read. */
  readonly exited: Promise<ExitInfo>;

  private readonly child: ChildProcessWithoutNullStreams;
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private exitError: WorkerExitedError | undefined;
  private processExit: ExitInfo | undefined;
  private readonly processExited: Promise<ExitInfo>;
  private resolveExited!: (info: ExitInfo) => void;
  private stderrTail: Buffer[] = [];
  private stderrTailSize = 0;
  private closing: Promise<CloseResult> | undefined;
  private exitReason = "exited";
  private readyWaiter: { resolve: () => void; reject: (e: unknown) => void } | undefined;

  private constructor(private readonly options: SpawnOptions) {
    this.exited = new Promise((resolve) => (this.resolveExited = resolve));
    const python = options.python ?? "python3";
    this.child = spawn(python, ["-m", "mlx_worker", ...(options.args ?? [])], {
      env: options.env ?? process.env,
      cwd: options.cwd,
      stdio: ["pipe", "pipe", "pipe"],
      windowsHide: true,
    });
    this.processExited = new Promise((resolve) => {
      this.child.once("exit", (exitCode, signal) => {
        this.processExit = { exitCode, signal };
        resolve(this.processExit);
        // 'close' follows once stdout is read to its end; don't wait for a
        // grandchild that inherited the pipes.
        setTimeout(() => this.finalize(exitCode, signal), 1000).unref();
      });
    });
    this.child.once("close", (exitCode, signal) => this.finalize(exitCode, signal));
    this.child.once("error", (error) => {
      // Failed to spawn (ENOENT, EACCES): no 'exit' will follow.
      if (this.child.pid === undefined) {
        this.exitReason = `could not be started with ${JSON.stringify(python)}: ${error.message}`;
        this.finalize(null, null, error);
      }
    });
    // A dead child's stdin raises EPIPE asynchronously; its death is reported
    // through 'exit', so write errors need no handling of their own.
    this.child.stdin.on("error", () => {});
    this.child.stdout.on("error", () => {});
    this.child.stderr.on("error", () => {});
    const splitter = new LineSplitter((line) => this.receive(line));
    this.child.stdout.on("data", (chunk: Buffer) => splitter.push(chunk));
    const decoder = new StringDecoder("utf8");
    this.child.stderr.on("data", (chunk: Buffer) => {
      this.keepStderr(chunk);
      if (options.onStderr) this.callHost({ callback: "onStderr" }, undefined, options.onStderr, decoder.write(chunk));
    });
  }

  /** @internal use `spawnWorker`. */
  static async start(options: SpawnOptions): Promise<Worker> {
    const worker = new Worker(options); // throws (→ rejects) on invalid spawn options
    await worker.waitReady(options.readyTimeoutMs ?? 60_000);
    return worker;
  }

  /** The worker's process id (undefined if it never started). */
  get pid(): number | undefined {
    return this.child.pid;
  }

  /** True until the process has exited. */
  get alive(): boolean {
    return !this.exitError && !this.processExit;
  }

  /**
   * Sends one request and resolves with its result. Rejects with `RpcError`
   * for an error response, `WorkerExitedError` when the worker is or goes
   * away first, and `RangeError` (nothing sent) for an integer JSON can't
   * carry exactly.
   */
  request<M extends MethodName>(
    method: M,
    params?: Methods[M]["params"],
    options: RequestOptions<EventOf<M>> = {},
  ): Promise<Methods[M]["result"]> {
    return new Promise((resolve, reject) => {
      let id = 0;
      const onEvent = this.guardEvents(options as RequestOptions, () => id, () => this.cancel(id));
      id = this.send(method, params, { method, resolve, reject, onEvent });
    });
  }

  /**
   * Starts a generate: iterate the returned `Generation` for its events and
   * await its `result`. Aborting `signal` sends `cancel`.
   */
  generate(params: GenerateParams, options: GenerateOptions = {}): Generation {
    const { signal } = options;
    let generation!: Generation;
    let id = 0;
    const onEvent = this.guardEvents(options as RequestOptions, () => id, () => generation.cancel());
    const result = new Promise<Methods["generate"]["result"]>((resolve, reject) => {
      id = this.send("generate", params, {
        method: "generate",
        resolve,
        reject,
        onEvent: (event) => {
          generation.push(event as GenerateEvent);
          onEvent?.(event);
        },
      });
    });
    const buffer = options.buffer ?? !options.onEvent;
    generation = new Generation(id, result, () => (id ? this.cancel(id) : Promise.resolve(false)), buffer);
    if (signal && id) {
      const onAbort = () => generation.cancel().catch(() => {});
      if (signal.aborted) onAbort();
      else {
        signal.addEventListener("abort", onAbort, { once: true });
        const detach = () => signal.removeEventListener("abort", onAbort);
        result.then(detach, detach);
      }
    }
    return generation;
  }

  /**
   * The host's onEvent, made safe: what it throws goes to onError and cancels
   * the request, whose later events it no longer gets.
   */
  private guardEvents(
    options: RequestOptions,
    id: () => number,
    cancel: () => Promise<boolean>,
  ): ((event: RequestEvent) => void) | undefined {
    const { onEvent, onError } = options;
    if (!onEvent) return undefined;
    let failed = false;
    return (event) => {
      if (failed) return;
      if (!this.callHost({ callback: "onEvent", id: id() }, onError, onEvent, event)) {
        failed = true;
        cancel().catch(() => {}); // rejects only when the worker is gone
      }
    };
  }

  /** Calls a host callback; false when it threw (reported, never rethrown). */
  private callHost<A extends unknown[]>(
    source: CallbackSource,
    onError: ((error: unknown, source: CallbackSource) => void) | undefined,
    callback: (...args: A) => void,
    ...args: A
  ): boolean {
    try {
      callback(...args);
      return true;
    } catch (error) {
      const report = onError ?? this.options.onError ?? defaultOnError;
      try {
        report(error, source);
      } catch (again) {
        defaultOnError(again, source);
      }
      return false;
    }
  }

  /**
   * `embed`: vectors for a string, strings or token ids, with a model loaded
   * as an embedding model. Cancel it with `cancel(id)` (it then rejects with
   * `RpcError` -32012).
   */
  embed(params: EmbedParams, options: RequestOptions = {}): Promise<EmbedResult> {
    return this.request("embed", params, options);
  }

  /** `cancel {id}`: true when that generate will end with `stop_reason: "cancelled"`. */
  async cancel(id: number | string): Promise<boolean> {
    return (await this.request("cancel", { id })).cancelled;
  }

  /**
   * Stops the worker: `shutdown` and stdin EOF, then SIGTERM after
   * `shutdownTimeoutMs`, then SIGKILL after `termTimeoutMs`. Pending requests
   * are answered by the worker (cancelled) or rejected with
   * `WorkerExitedError`. Calling it again returns the same promise.
   */
  close(options: CloseOptions = {}): Promise<CloseResult> {
    this.closing ??= this.stop(options.shutdownTimeoutMs ?? 3000, options.termTimeoutMs ?? 2000);
    return this.closing;
  }

  private async stop(shutdownTimeoutMs: number, termTimeoutMs: number): Promise<CloseResult> {
    let escalatedTo: CloseResult["escalatedTo"] = null;
    if (this.alive) {
      this.exitReason = "was closed";
      this.request("shutdown").catch(() => {});
      this.child.stdin.end();
      if (!(await this.waitProcessExit(shutdownTimeoutMs))) {
        escalatedTo = "SIGTERM";
        this.child.kill("SIGTERM");
        if (!(await this.waitProcessExit(termTimeoutMs))) {
          escalatedTo = "SIGKILL";
          this.child.kill("SIGKILL");
        }
      }
    }
    const info = await this.exited;
    return { ...info, escalatedTo };
  }

  private waitProcessExit(ms: number): Promise<boolean> {
    if (this.processExit || this.exitError) return Promise.resolve(true);
    return new Promise((resolve) => {
      const timer = setTimeout(() => resolve(false), ms);
      const done = () => {
        clearTimeout(timer);
        resolve(true);
      };
      this.processExited.then(done);
      this.exited.then(done);
    });
  }

  private send(method: MethodName, params: unknown, pending: Pending): number {
    if (this.exitError) {
      pending.reject(this.exitError);
      return 0;
    }
    try {
      checkIntegerParams(method, params);
    } catch (error) {
      pending.reject(error);
      return 0;
    }
    const id = this.nextId++;
    const message = params === undefined ? { jsonrpc: "2.0", id, method } : { jsonrpc: "2.0", id, method, params };
    let line: string;
    try {
      line = JSON.stringify(message);
    } catch (error) {
      pending.reject(error);
      return 0;
    }
    this.pending.set(id, pending);
    if (this.options.onLine) this.callHost({ callback: "onLine" }, undefined, this.options.onLine, "send", line);
    if (this.child.stdin.writable) this.child.stdin.write(line + "\n");
    // else: the process is exiting; finalize() rejects it with WorkerExitedError.
    return id;
  }

  private receive(line: string): void {
    if (this.options.onLine) this.callHost({ callback: "onLine" }, undefined, this.options.onLine, "recv", line);
    let message: any;
    try {
      message = JSON.parse(line);
    } catch {
      this.unrouted(new ProtocolError(`the worker wrote a line that is not JSON: ${line.slice(0, 200)}`));
      return;
    }
    if (!message || typeof message !== "object") return this.unrouted(message);
    if (typeof message.method === "string") {
      if (message.method === "ready") return this.onReady(message.params);
      const params = message.params;
      const target = typeof params?.id === "number" ? this.pending.get(params.id) : undefined;
      if (target?.onEvent && REQUEST_EVENTS.has(message.method)) {
        target.onEvent({ type: message.method, ...params });
      } else {
        this.unrouted(message);
      }
      return;
    }
    const target = typeof message.id === "number" ? this.pending.get(message.id) : undefined;
    if (!target) return this.unrouted(message);
    this.pending.delete(message.id);
    if (message.error) {
      const { code, message: text, data } = message.error;
      target.reject(new RpcError(code, text, data, target.method));
    } else {
      target.resolve(message.result);
    }
  }

  private unrouted(message: unknown): void {
    if (this.options.onUnrouted) this.callHost({ callback: "onUnrouted" }, undefined, this.options.onUnrouted, message);
  }

  private waitReady(timeoutMs: number): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.exitReason = `sent no ready notification within ${timeoutMs} ms and was killed`;
        this.child.kill("SIGKILL");
      }, timeoutMs);
      const settle = <T>(f: (v: T) => void) => (v: T) => {
        clearTimeout(timer);
        this.readyWaiter = undefined;
        f(v);
      };
      this.readyWaiter = { resolve: settle(resolve), reject: settle(reject) };
      if (this.exitError) this.readyWaiter.reject(this.exitError);
    });
  }

  private onReady(ready: ReadyEvent): void {
    const waiter = this.readyWaiter;
    if (!waiter) return; // a second ready: ignore
    const major = Number.parseInt(String(ready?.protocol_version), 10);
    const expected = this.options.protocolMajor ?? Number.parseInt(PROTOCOL_VERSION, 10);
    if (major !== expected) {
      this.exitReason = "speaks another protocol version and was stopped";
      this.child.stdin.end();
      setTimeout(() => this.child.kill("SIGKILL"), 2000).unref();
      waiter.reject(
        new ProtocolError(
          `the worker speaks protocol ${ready?.protocol_version}; this client needs ${expected}.x ` +
            `(regenerate it from that worker's protocol/schema.json, or use a matching worker)`,
        ),
      );
      return;
    }
    this.ready = ready;
    waiter.resolve();
  }

  private keepStderr(chunk: Buffer): void {
    const limit = this.options.stderrTailBytes ?? 16 * 1024;
    this.stderrTail.push(chunk);
    this.stderrTailSize += chunk.length;
    while (this.stderrTailSize - this.stderrTail[0].length >= limit) {
      this.stderrTailSize -= this.stderrTail.shift()!.length;
    }
  }

  private finalize(exitCode: number | null, signal: NodeJS.Signals | null, cause?: unknown): void {
    if (this.exitError) return;
    const limit = this.options.stderrTailBytes ?? 16 * 1024;
    const tailBytes = Buffer.concat(this.stderrTail);
    const tail = tailBytes.subarray(Math.max(0, tailBytes.length - limit)).toString("utf8");
    const reason = this.readyWaiter && this.exitReason === "exited" ? "exited before sending ready" : this.exitReason;
    this.exitError = new WorkerExitedError(exitCode, signal, tail, reason, cause ? { cause } : undefined);
    const pending = [...this.pending.values()];
    this.pending.clear();
    for (const p of pending) p.reject(this.exitError);
    this.readyWaiter?.reject(this.exitError);
    this.resolveExited({ exitCode, signal });
  }
}

function defaultOnError(error: unknown, source: CallbackSource): void {
  const where = source.id === undefined ? source.callback : `${source.callback} (request ${source.id})`;
  const cancelled = source.callback === "onEvent" ? "; the request was cancelled" : "";
  console.error(`mlx-worker client: the host's ${where} threw${cancelled}:`, error);
}
