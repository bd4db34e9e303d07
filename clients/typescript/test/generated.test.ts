// src/generated/protocol.ts is current with protocol/schema.json, and the
// check notices when it is not.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";

import { INTEGER_PARAMS, METHOD_NAMES, PROTOCOL_VERSION } from "../src";
import { REPO } from "./helpers";

const PACKAGE = resolve(REPO, "clients", "typescript");
const SCHEMA = join(REPO, "protocol", "schema.json");

function check(schema: string) {
  return spawnSync(process.execPath, ["scripts/gen.mjs", "--check", "--schema", schema], { cwd: PACKAGE, encoding: "utf8" });
}

test("the generated file is current", () => {
  const run = check(SCHEMA);
  assert.equal(run.status, 0, run.stderr);
});

test("the check fails when the schema gains a field", () => {
  const schema = JSON.parse(readFileSync(SCHEMA, "utf8"));
  schema.$defs.GenerateParams.properties.new_option = { type: "integer", default: 0 };
  const path = join(mkdtempSync(join(tmpdir(), "mlx-worker-ts-")), "schema.json");
  writeFileSync(path, JSON.stringify(schema));
  const run = check(path);
  assert.equal(run.status, 1);
  assert.match(run.stderr, /stale.*npm run gen/);
});

test("the method map and integer params follow the schema", () => {
  const schema = JSON.parse(readFileSync(SCHEMA, "utf8"));
  assert.deepEqual([...METHOD_NAMES].sort(), Object.keys(schema.methods).sort());
  assert.equal(PROTOCOL_VERSION, schema.protocol_version);
  assert.ok(INTEGER_PARAMS.generate.includes("seed"));
  assert.ok(INTEGER_PARAMS.generate.includes("tokens[]"));
  assert.ok(!INTEGER_PARAMS.generate.includes("temperature"));
});
