import { ERROR_CODES } from "./generated/protocol";

/** The worker answered a request with a JSON-RPC error. */
export class RpcError extends Error {
  override readonly name = "RpcError";

  constructor(
    /** JSON-RPC error code (see `ERROR_CODES`), e.g. -32602 invalid params. */
    readonly code: number,
    /** The worker's message. */
    message: string,
    /** `error.data`; for invalid params `{field: "params.max_tokens"}`. */
    readonly data: unknown,
    /** The method of the request that failed. */
    readonly method: string,
  ) {
    super(message);
  }

  override toString(): string {
    return `RpcError ${this.code} (${this.method}): ${this.message}`;
  }

  /** `data.field` when the worker named the offending field. */
  get field(): string | undefined {
    const d = this.data as { field?: unknown } | null | undefined;
    return typeof d?.field === "string" ? d.field : undefined;
  }

  /** What the code means, from the protocol's schema. */
  get description(): string | undefined {
    return ERROR_CODES[this.code];
  }
}

/**
 * The worker process is gone (or never started): every pending and every later
 * call fails with this.
 */
export class WorkerExitedError extends Error {
  override readonly name = "WorkerExitedError";

  constructor(
    /** Exit code, or null when a signal ended it or it never started. */
    readonly exitCode: number | null,
    /** The signal that ended it, e.g. "SIGKILL". */
    readonly signal: NodeJS.Signals | null,
    /** The last bytes the worker wrote to stderr (its logs, a traceback). */
    readonly stderrTail: string,
    reason: string,
    options?: { cause?: unknown },
  ) {
    const how = signal ? `signal ${signal}` : exitCode === null ? "no exit code" : `exit code ${exitCode}`;
    const tail = stderrTail.trim() ? `\n--- worker stderr (tail) ---\n${stderrTail.trimEnd()}` : "";
    super(`mlx-worker ${reason} (${how})${tail}`, options);
  }
}

/** The worker spoke something this client can't use (another protocol major version, a line that isn't JSON). */
export class ProtocolError extends Error {
  override readonly name = "ProtocolError";
}
