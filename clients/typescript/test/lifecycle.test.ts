// Starting and ending workers: ready, bad interpreters, shutdown and EOF,
// close() escalating to signals, and kill -9 in the middle of a generate.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { chmodSync, mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

import { ProtocolError, PROTOCOL_VERSION, RpcError, WorkerExitedError, spawnWorker, type Worker } from "../src";
import { PYTHON, REPO, isAlive, startWorker, tinyModel, workerEnv } from "./helpers";

function waitUntilZombie(pid: number): void {
  const until = Date.now() + 5000;
  while (Date.now() < until) {
    const stat = spawnSync("ps", ["-o", "stat=", "-p", String(pid)], { encoding: "utf8" }).stdout.trim();
    if (stat.startsWith("Z") || stat === "") return;
  }
  assert.fail(`pid ${pid} did not die`);
}

const stdinOf = (worker: Worker) => (worker as unknown as { child: { stdin: NodeJS.WritableStream } }).child.stdin;

test("ready comes first and carries a compatible protocol version; stderr reaches onStderr", async () => {
  let stderr = "";
  const { worker, received } = await startWorker({ args: ["--log-level", "info"], onStderr: (text) => (stderr += text) });
  try {
    assert.equal(JSON.parse(received[0]).method, "ready");
    assert.equal(worker.ready.protocol_version.split(".")[0], PROTOCOL_VERSION.split(".")[0]);
    assert.equal(worker.ready.pid, worker.pid);
    assert.ok(worker.ready.capabilities.methods.includes("generate"));
    await worker.request("load", { model: tinyModel(), model_id: "tiny" });
  } finally {
    await worker.close();
  }
  assert.match(stderr, /loaded tiny/);
});

test("another protocol major version is refused and the worker stopped", async () => {
  let pid: number | undefined;
  const started = Date.now();
  const error = await spawnWorker({
    python: PYTHON,
    cwd: REPO,
    env: workerEnv(),
    protocolMajor: Number.parseInt(PROTOCOL_VERSION, 10) + 1,
    onLine: (_, line) => (pid ??= JSON.parse(line).params?.pid),
  }).catch((e) => e);
  assert.ok(error instanceof ProtocolError, String(error));
  assert.match(error.message, /protocol 1\.\d+/);
  assert.ok(pid);
  while (isAlive(pid) && Date.now() - started < 5000) await new Promise((r) => setTimeout(r, 20));
  assert.equal(isAlive(pid), false, "the worker should have been stopped");
});

test("a bad interpreter path fails fast", async () => {
  const started = Date.now();
  const error = await spawnWorker({ python: "/no/such/python3" }).catch((e) => e);
  assert.ok(error instanceof WorkerExitedError, String(error));
  assert.match(error.message, /could not be started.*ENOENT/);
  assert.equal(error.exitCode, null);
  assert.ok(Date.now() - started < 2000);
  // Options spawn() refuses synchronously reject too, rather than throw.
  await assert.rejects(spawnWorker({ python: "pyth\0on" }), TypeError);
});

test("a worker that exits before ready rejects with its exit code and stderr", async () => {
  const error = await spawnWorker({ python: PYTHON, cwd: REPO, env: workerEnv(), args: ["--no-such-option"] }).catch(
    (e) => e,
  );
  assert.ok(error instanceof WorkerExitedError, String(error));
  assert.equal(error.exitCode, 2);
  assert.match(error.stderrTail, /unrecognized arguments: --no-such-option/);
  assert.match(error.message, /exited before sending ready/);
});

test("an interpreter that never sends ready is killed after readyTimeoutMs", async () => {
  const dir = mkdtempSync(join(tmpdir(), "mlx-worker-ts-"));
  const silent = join(dir, "silent-python");
  writeFileSync(silent, "#!/bin/sh\nexec sleep 30\n");
  chmodSync(silent, 0o755);
  const started = Date.now();
  const error = await spawnWorker({ python: silent, readyTimeoutMs: 300 }).catch((e) => e);
  assert.ok(error instanceof WorkerExitedError, String(error));
  assert.equal(error.signal, "SIGKILL");
  assert.match(error.message, /no ready notification within 300 ms/);
  assert.ok(Date.now() - started < 3000);
});

test("shutdown → exit 0 within ~2 s; later calls fail with WorkerExitedError", async () => {
  const { worker } = await startWorker();
  const started = Date.now();
  assert.deepEqual(await worker.request("shutdown"), { shutting_down: true });
  const info = await worker.exited;
  assert.deepEqual(info, { exitCode: 0, signal: null });
  assert.ok(Date.now() - started < 3000, `took ${Date.now() - started} ms`);
  await assert.rejects(worker.request("status"), WorkerExitedError);
  assert.equal((await worker.close()).escalatedTo, null);
});

test("stdin EOF → exit 0 within ~2 s", async () => {
  const { worker } = await startWorker();
  const started = Date.now();
  stdinOf(worker).end();
  assert.deepEqual(await worker.exited, { exitCode: 0, signal: null });
  assert.ok(Date.now() - started < 3000, `took ${Date.now() - started} ms`);
});

test("close() on a healthy worker needs no signal", async () => {
  const { worker } = await startWorker();
  const result = await worker.close();
  assert.deepEqual(result, { exitCode: 0, signal: null, escalatedTo: null });
});

test("close() escalates to SIGKILL when the worker neither exits nor dies on SIGTERM", async () => {
  const { worker } = await startWorker();
  const pid = worker.pid!;
  const pending = worker.request("status");
  process.kill(pid, "SIGSTOP"); // a stopped process reads nothing and holds SIGTERM pending
  const started = Date.now();
  const status = worker.request("status");
  const result = await worker.close({ shutdownTimeoutMs: 300, termTimeoutMs: 300 });
  assert.equal(result.escalatedTo, "SIGKILL");
  assert.equal(result.signal, "SIGKILL");
  assert.ok(Date.now() - started < 3000);
  await pending.catch(() => {}); // may have been answered before the stop
  await assert.rejects(status, WorkerExitedError);
  assert.equal(isAlive(pid), false);
});

test("close() sends SIGTERM after the shutdown timeout, and the worker exits on it", async () => {
  const { worker } = await startWorker();
  const pid = worker.pid!;
  process.kill(pid, "SIGSTOP");
  // Resume it just after SIGTERM was sent, well before SIGKILL would be.
  const resume = setTimeout(() => process.kill(pid, "SIGCONT"), 500);
  const result = await worker.close({ shutdownTimeoutMs: 300, termTimeoutMs: 10_000 });
  clearTimeout(resume);
  assert.equal(result.escalatedTo, "SIGTERM");
  assert.notEqual(result.signal, "SIGKILL");
  assert.equal(isAlive(pid), false);
});

test("kill -9 mid-generate: every pending and later call fails with WorkerExitedError, no crash, no orphan", async () => {
  const { worker } = await startWorker();
  const pid = worker.pid!;
  await worker.request("load", { model: tinyModel(), model_id: "tiny" });
  const generation = worker.generate({ prompt: "Go on", max_tokens: 5000, ignore_eos: true });
  const queued = worker.generate({ prompt: "Queued", max_tokens: 10 });
  const iterated: unknown[] = [];
  let killed = false;
  const iterating = (async () => {
    for await (const event of generation) {
      iterated.push(event);
      if (event.type === "token" && !killed) {
        killed = true;
        process.kill(pid, "SIGKILL");
        // Write while the child is dead but not yet noticed (a zombie: the
        // event loop is blocked here, so node can't reap it): the writes hit a
        // pipe without a reader, and the EPIPE must not surface anywhere.
        waitUntilZombie(pid);
        for (let i = 0; i < 20; i++) worker.request("status").catch(() => {});
      }
    }
  })();
  await assert.rejects(iterating, WorkerExitedError);
  const error = await generation.result.catch((e) => e);
  assert.ok(error instanceof WorkerExitedError);
  assert.equal(error.signal, "SIGKILL");
  assert.equal(error.exitCode, null);
  await assert.rejects(queued.result, WorkerExitedError);
  await assert.rejects(worker.request("status"), WorkerExitedError);
  const late = worker.generate({ prompt: "late" });
  await assert.rejects(late.result, WorkerExitedError);
  await assert.rejects(async () => {
    for await (const _ of worker.generate({ prompt: "late" })) assert.fail("no events from a dead worker");
  }, WorkerExitedError);
  assert.deepEqual(await worker.exited, { exitCode: null, signal: "SIGKILL" });
  assert.equal(isAlive(pid), false);
  assert.deepEqual(await worker.close(), { exitCode: null, signal: "SIGKILL", escalatedTo: null });
  assert.ok(!(error instanceof RpcError));
});
