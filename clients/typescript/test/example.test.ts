// The README's example is examples/hello.ts, and it runs as written.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { join, resolve } from "node:path";

import { PYTHON, REPO, tinyModel, workerEnv } from "./helpers";

const PACKAGE = resolve(REPO, "clients", "typescript");

test("the README's example is examples/hello.ts", () => {
  const readme = readFileSync(join(PACKAGE, "README.md"), "utf8");
  const block = /## Example[\s\S]*?```ts\n([\s\S]*?)```/.exec(readme);
  assert.ok(block, "no ```ts block under ## Example");
  assert.equal(block[1], readFileSync(join(PACKAGE, "examples", "hello.ts"), "utf8"));
});

test("the example runs against the real worker", () => {
  const run = spawnSync(process.execPath, [join(PACKAGE, "build", "examples", "hello.js"), PYTHON, tinyModel()], {
    cwd: REPO,
    env: workerEnv(),
    encoding: "utf8",
    timeout: 60_000,
  });
  assert.equal(run.status, 0, run.stderr);
  assert.match(run.stdout, /\n\[tiny-llama: (max_tokens|eos), \d+ tokens\]\n$/);
});
