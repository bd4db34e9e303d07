// The line splitter: fed byte by byte and in random chunks, every character
// (multi-byte ones included) comes out whole, on real worker output and on
// text built to split characters at every offset.
import { test } from "node:test";
import assert from "node:assert/strict";

import { LineSplitter } from "../src";
import { SchemaChecker, prng, startWorker, tinyModel } from "./helpers";

function split(bytes: Buffer, chunkSizes: () => number): string[] {
  const lines: string[] = [];
  const splitter = new LineSplitter((line) => lines.push(line));
  for (let at = 0; at < bytes.length; ) {
    const end = Math.min(bytes.length, at + chunkSizes());
    // A fresh copy per chunk, reused by the "caller" afterwards.
    const chunk = Buffer.from(bytes.subarray(at, end));
    splitter.push(chunk);
    chunk.fill(0x41);
    at = end;
  }
  assert.equal(splitter.flush(), undefined);
  return lines;
}

function assertSplitsIntact(lines: string[]): void {
  const bytes = Buffer.from(lines.map((l) => l + "\n").join(""));
  assert.deepEqual(split(bytes, () => 1), lines, "byte by byte");
  for (let seed = 1; seed <= 20; seed++) {
    const random = prng(seed);
    const maxChunk = [2, 3, 7, 64, 4096][seed % 5];
    assert.deepEqual(split(bytes, () => 1 + Math.floor(random() * maxChunk)), lines, `random chunks, seed ${seed}`);
  }
}

test("real worker output, with characters split over tokens, survives any chunking", async () => {
  const { worker, received, checker } = await startWorker();
  try {
    await worker.request("load", { model: tinyModel(), model_id: "tiny" });
    const generation = worker.generate({
      prompt: "Ünïcödé",
      max_tokens: 200,
      temperature: 0,
      constraint: { type: "regex", pattern: "(日本語 🙂 ñ ){3}" },
    });
    for await (const _ of generation);
    assert.equal((await generation.result).text, "日本語 🙂 ñ ".repeat(3));
    await worker.request("generate", { prompt: "Ünïcödé 中文 🙂", max_tokens: 40, temperature: 1.5, seed: 3 });
  } finally {
    await worker.close();
  }
  const multiByte = received.filter((l) => /[^\x00-\x7f]/.test(l));
  assert.ok(multiByte.length >= 5, "the worker's lines should carry raw multi-byte UTF-8");
  assertSplitsIntact(received);
  assert.deepEqual(checker.problems, []);
});

test("2-, 3- and 4-byte characters at every offset survive any chunking", () => {
  const alphabet = ["a", "é", "ñ", "中", "語", "🙂", "𝄞", "\ufffd", "\u2028", '"', "\\"];
  const random = prng(42);
  const lines: string[] = [];
  for (let n = 0; n < 200; n++) {
    let text = "";
    for (let k = Math.floor(random() * 40); k > 0; k--) text += alphabet[Math.floor(random() * alphabet.length)];
    lines.push(JSON.stringify({ method: "token", params: { id: n, text } }));
  }
  lines.push("");
  assertSplitsIntact(lines);
});

test("a stream that ends mid-line is returned by flush; CRLF is tolerated", () => {
  const lines: string[] = [];
  const splitter = new LineSplitter((line) => lines.push(line));
  splitter.push(Buffer.from("one\r\ntwo\nthr"));
  splitter.push(Buffer.from([0xe2, 0x82]));
  assert.deepEqual(lines, ["one", "two"]);
  splitter.push(Buffer.from([0xac]));
  assert.equal(splitter.flush(), "thr€");
  assert.equal(splitter.flush(), undefined);
});

test("the schema check rejects lines that break the schema", () => {
  const checker = new SchemaChecker();
  checker.onLine("send", '{"jsonrpc":"2.0","id":1,"method":"cancel","params":{"id":7}}');
  checker.onLine("recv", '{"jsonrpc":"2.0","id":1,"result":{"cancelled":"yes"}}');
  checker.onLine("recv", '{"jsonrpc":"2.0","method":"token","params":{"id":1,"text":"x"}}');
  checker.onLine("recv", '{"jsonrpc":"2.0","id":99,"result":{}}');
  checker.onLine("recv", '{"jsonrpc":"2.0","method":"progress","params":{"id":1,"processed":1,"total":2,"cached":0}}');
  assert.equal(checker.problems.length, 3, checker.problems.join("\n"));
});
