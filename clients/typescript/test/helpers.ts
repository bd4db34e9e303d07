// Shared by the tests: where the repository, the interpreter and the fixture
// model are, and a worker whose every received line is checked against
// protocol/schema.json.
import { execFileSync } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import Ajv2020 from "ajv/dist/2020";
import type { ValidateFunction } from "ajv";

import { spawnWorker, type SpawnOptions, type Worker } from "../src";

function findRepo(): string {
  for (let dir = __dirname; dir !== dirname(dir); dir = dirname(dir)) {
    if (existsSync(join(dir, "protocol", "schema.json")) && existsSync(join(dir, "mlx_worker"))) return dir;
  }
  throw new Error(`no mlx-worker repository above ${__dirname}`);
}

export const REPO = findRepo();
export const PYTHON = process.env.MLX_WORKER_PYTHON ?? join(REPO, ".venv", "bin", "python");

export function workerEnv(): NodeJS.ProcessEnv {
  return { ...process.env, PYTHONPATH: REPO, HF_HUB_OFFLINE: "1", TRANSFORMERS_VERBOSITY: "error" };
}

/** The tiny-llama fixture, built on first use (fixtures/build.py skips an up-to-date build). */
export function tinyModel(): string {
  const dir = process.env.MLX_WORKER_TINY_MODEL ?? join(REPO, "fixtures", "models", "tiny-llama");
  if (!existsSync(join(dir, "config.json"))) {
    execFileSync(PYTHON, ["fixtures/build.py", "tiny-llama"], { cwd: REPO, env: workerEnv(), stdio: "inherit" });
  }
  return resolve(dir);
}

/** tiny-bert-embed: an embedding model (mean pooling), for `embed`. */
export function embedModel(): string {
  const dir = process.env.MLX_WORKER_EMBED_MODEL ?? join(REPO, "fixtures", "models", "tiny-bert-embed");
  if (!existsSync(join(dir, "config.json"))) {
    execFileSync(PYTHON, ["fixtures/build.py", "tiny-bert-embed"], { cwd: REPO, env: workerEnv(), stdio: "inherit" });
  }
  return resolve(dir);
}

/** tiny-qwen3-tools: Qwen3's chat template and markers (`<think>`, `<tool_call>`). */
export function toolsModel(): string {
  const dir = process.env.MLX_WORKER_TOOLS_MODEL ?? join(REPO, "fixtures", "models", "tiny-qwen3-tools");
  if (!existsSync(join(dir, "config.json"))) {
    execFileSync(PYTHON, ["fixtures/build.py", "tiny-qwen3-tools"], { cwd: REPO, env: workerEnv(), stdio: "inherit" });
  }
  return resolve(dir);
}

/**
 * Checks every line a worker sends: notifications against their params'
 * schema, responses against the result schema of the method whose id they
 * answer (or the error object).
 */
export class SchemaChecker {
  readonly problems: string[] = [];
  checked = 0;
  private readonly methodOf = new Map<unknown, string>();
  private static validators: Map<string, ValidateFunction> | undefined;

  private static compile(): Map<string, ValidateFunction> {
    const schema = JSON.parse(readFileSync(join(REPO, "protocol", "schema.json"), "utf8"));
    // strict: false lets the schema's own top-level maps (methods, error_codes)
    // and msgspec's `discriminator` annotations pass as annotations.
    const ajv = new Ajv2020({ strict: false, allErrors: true });
    ajv.addSchema(schema, "protocol");
    const ref = (r: string) => ajv.compile({ $ref: `protocol${r}` });
    const out = new Map<string, ValidateFunction>();
    for (const [m, v] of Object.entries<any>(schema.methods)) out.set(`result:${m}`, ref(v.result.$ref));
    for (const [n, v] of Object.entries<any>(schema.notifications)) out.set(`note:${n}`, ref(v.params.$ref));
    out.set("error", ref(schema.error.$ref));
    return out;
  }

  onLine = (direction: "send" | "recv", line: string): void => {
    const message = JSON.parse(line);
    if (direction === "send") {
      this.methodOf.set(message.id, message.method);
      return;
    }
    this.checked++;
    const validators = (SchemaChecker.validators ??= SchemaChecker.compile());
    const fail = (why: string): void => void this.problems.push(`${why}: ${line.slice(0, 300)}`);
    if (message.jsonrpc !== "2.0") return fail("jsonrpc is not 2.0");
    let validate: ValidateFunction | undefined;
    let value: unknown;
    if (typeof message.method === "string") {
      validate = validators.get(`note:${message.method}`);
      value = message.params;
      if (!validate) return fail(`unknown notification ${message.method}`);
    } else if ("error" in message) {
      if ("result" in message) return fail("both result and error");
      validate = validators.get("error");
      value = message.error;
    } else if ("result" in message) {
      const method = this.methodOf.get(message.id);
      validate = method ? validators.get(`result:${method}`) : undefined;
      value = message.result;
      if (!validate) return fail(`a result for id ${message.id}, which no request had`);
    } else {
      return fail("neither a notification nor a response");
    }
    if (validate && !validate(value)) fail(`invalid (${JSON.stringify(validate.errors)})`);
  };
}

export interface TestWorker {
  worker: Worker;
  checker: SchemaChecker;
  /** Every line received, in order. */
  received: string[];
  sent: string[];
}

/** A real worker (cwd = repo root) whose traffic is recorded and schema-checked. */
export async function startWorker(options: SpawnOptions = {}): Promise<TestWorker> {
  const checker = new SchemaChecker();
  const received: string[] = [];
  const sent: string[] = [];
  const worker = await spawnWorker({
    python: PYTHON,
    cwd: REPO,
    env: workerEnv(),
    ...options,
    onLine: (direction, line) => {
      (direction === "send" ? sent : received).push(line);
      checker.onLine(direction, line);
      options.onLine?.(direction, line);
    },
  });
  return { worker, checker, received, sent };
}

/** A seeded PRNG (mulberry32), so random chunkings are reproducible. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}
