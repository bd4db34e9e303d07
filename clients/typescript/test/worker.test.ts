// One real worker with tiny-llama loaded: load errors, streaming, pipelining,
// cancel, errors, and the schema of every line it sends.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";

import {
  ChannelText,
  RpcError,
  channelOf,
  type GenerateEvent,
  type GenerateParams,
  type LoadEvent,
  type Tool,
  type Worker,
} from "../src";
import { embedModel, startWorker, tinyModel, toolsModel, type TestWorker } from "./helpers";

let tw: TestWorker;
let worker: Worker;

before(async () => {
  tw = await startWorker();
  worker = tw.worker;
  await worker.request("load", { model: tinyModel(), model_id: "tiny" });
});

after(async () => {
  const closed = await worker.close();
  assert.equal(closed.exitCode, 0);
  assert.equal(closed.escalatedTo, null);
});

async function run(params: GenerateParams) {
  const generation = worker.generate({ model_id: "tiny", ...params });
  const events: GenerateEvent[] = [];
  for await (const event of generation) events.push(event);
  return { events, result: await generation.result, id: generation.id };
}

const tokenTexts = (events: GenerateEvent[]) => events.flatMap((e) => (e.type === "token" ? [e.text] : []));
const tokenIds = (events: GenerateEvent[]) => events.flatMap((e) => (e.type === "token" ? e.tokens : []));

describe("load", () => {
  test("a missing folder is a typed -32001 naming params.model", async () => {
    const error = await worker.request("load", { model: "/no/such/model/folder" }).catch((e) => e);
    assert.ok(error instanceof RpcError, String(error));
    assert.equal(error.code, -32001);
    assert.equal(error.field, "params.model");
    assert.match(error.description ?? "", /not found/);
    const status = await worker.request("status");
    assert.deepEqual(
      status.models.map((m) => m.model_id),
      ["tiny"],
    );
  });
});

describe("load_progress", () => {
  test("a load's load_progress notifications reach its onEvent, each one, in order", async () => {
    const events: LoadEvent[] = [];
    const loaded = await worker.request(
      "load",
      { model: tinyModel(), model_id: "tiny-again" },
      { onEvent: (event) => events.push(event) },
    );
    assert.equal(loaded.model_id, "tiny-again");
    const sent = tw.sent.map((line) => JSON.parse(line)).filter((m) => m.params?.model_id === "tiny-again");
    assert.equal(sent.length, 1);
    const id = sent[0].id;
    const onWire = tw.received
      .map((line) => JSON.parse(line))
      .filter((m) => m.method === "load_progress" && m.params.id === id)
      .map((m) => ({ type: "load_progress", ...m.params }));
    assert.ok(onWire.length >= 2, `too few load_progress lines: ${JSON.stringify(onWire)}`);
    assert.deepEqual(events, onWire);
    const weights = events.filter((e) => e.phase === "weights");
    assert.ok(weights.length > 0 && weights.at(-1)!.done === weights.at(-1)!.total && weights.at(-1)!.total > 0);
    await worker.request("unload", { model_id: "tiny-again" });
  });
});

describe("streamed generate", () => {
  test("progress comes before tokens; the token texts add up to the result", async () => {
    const { events, result, id } = await run({ prompt: "Once upon a time", max_tokens: 24, temperature: 0 });
    assert.ok(events.every((e) => e.id === id));
    const firstToken = events.findIndex((e) => e.type === "token");
    assert.ok(firstToken > 0 && events.slice(0, firstToken).every((e) => e.type === "progress"));
    assert.ok(events.slice(firstToken).every((e) => e.type === "token"));
    const last = events[firstToken - 1];
    assert.ok(last.type === "progress" && last.processed === last.total);
    assert.equal(tokenTexts(events).join(""), result.text);
    assert.deepEqual(tokenIds(events), result.tokens);
    assert.equal(result.usage.completion_tokens, result.tokens.length);
  });

  test("multi-byte characters split over several tokens arrive whole", async () => {
    // A regex constraint makes the random model spell CJK, an emoji and é out
    // of byte-level tokens (several tokens per character).
    const wanted = "中文🙂é ";
    const { events, result } = await run({
      prompt: "Hello",
      max_tokens: 60,
      temperature: 0,
      constraint: { type: "regex", pattern: `(${wanted}){3}` },
    });
    assert.equal(result.text, wanted.repeat(3));
    assert.ok(result.tokens.length > [...wanted.repeat(3)].length, "each character should take several tokens");
    const texts = tokenTexts(events);
    assert.equal(texts.join(""), result.text);
    // A lone surrogate (half a character) would not survive a UTF-8 round trip.
    for (const text of texts) assert.equal(Buffer.from(text).toString(), text, "a split character");
    assert.ok(!texts.join("").includes("\ufffd"));
  });

  test("bytes that never form a character are U+FFFD, in the events and the result alike", async () => {
    // Find a token that decodes to a lone invalid byte (pipelined, 50 at a time).
    let lone: number | undefined;
    for (let start = 3; lone === undefined && start < 1024; start += 50) {
      const ids = Array.from({ length: 50 }, (_, i) => start + i).filter((t) => t < 1024);
      const texts = await Promise.all(ids.map((t) => worker.request("detokenize", { model_id: "tiny", tokens: [t, t] })));
      lone = ids.find((_, i) => texts[i].text === "\ufffd\ufffd");
    }
    assert.ok(lone !== undefined, "no single-byte invalid token in the vocabulary");
    const { events, result } = await run({
      prompt: "bytes",
      max_tokens: 6,
      temperature: 0,
      ignore_eos: true,
      logit_bias: { [String(lone)]: 100 },
    });
    assert.deepEqual(result.tokens, Array(6).fill(lone));
    assert.equal(result.text, "\ufffd".repeat(6));
    assert.equal(tokenTexts(events).join(""), result.text);
  });

  test("greedy output is deterministic", async () => {
    const a = await run({ prompt: "The sea", max_tokens: 16, temperature: 0, prompt_cache: false });
    const b = await run({ prompt: "The sea", max_tokens: 16, temperature: 0, prompt_cache: false });
    assert.deepEqual(a.result.tokens, b.result.tokens);
    assert.equal(a.result.text, b.result.text);
  });

  test("a seed up to 2^53 - 1 goes through exactly and reproduces sampling", async () => {
    const seed = Number.MAX_SAFE_INTEGER;
    const a = await run({ prompt: "Seeds", max_tokens: 12, temperature: 1.5, seed });
    const b = await run({ prompt: "Seeds", max_tokens: 12, temperature: 1.5, seed });
    assert.equal(a.result.seed, seed);
    assert.deepEqual(a.result.tokens, b.result.tokens);
  });
});

describe("pipelining", () => {
  test("status is answered while a generate runs", async () => {
    const generation = worker.generate({ model_id: "tiny", prompt: "Long", max_tokens: 5000, ignore_eos: true });
    let finished = false;
    generation.result.finally(() => (finished = true));
    const events = generation[Symbol.asyncIterator]();
    for (let next = await events.next(); !next.done && next.value.type !== "token"; next = await events.next());
    const status = await worker.request("status");
    assert.equal(finished, false);
    assert.equal(status.queue.active, generation.id);
    assert.equal(await generation.cancel(), true);
    const result = await generation.result;
    assert.equal(result.stop_reason, "cancelled");
    assert.ok(result.tokens.length < 5000);
  });

  test("two generates in flight get their own events", async () => {
    const alone = await run({ prompt: "First", max_tokens: 12, temperature: 0, prompt_cache: false });
    const p1 = { prompt: "First", max_tokens: 12, temperature: 0, prompt_cache: false };
    const p2 = { prompt: "Second one", max_tokens: 9, temperature: 0, prompt_cache: false };
    const [g1, g2] = await Promise.all([run(p1), run(p2)]);
    assert.notEqual(g1.id, g2.id);
    for (const g of [g1, g2]) {
      assert.ok(g.events.every((e) => e.id === g.id));
      assert.deepEqual(tokenIds(g.events), g.result.tokens);
      assert.equal(tokenTexts(g.events).join(""), g.result.text);
    }
    assert.deepEqual(g1.result.tokens, alone.result.tokens);
    assert.equal(g2.result.tokens.length, 9);
  });
});

describe("cancel", () => {
  const long = { model_id: "tiny", prompt: "Go on", max_tokens: 5000, ignore_eos: true } as const;

  test("cancel mid-stream ends it with stop_reason cancelled", async () => {
    const generation = worker.generate(long);
    const events: GenerateEvent[] = [];
    let cancelled: boolean | undefined;
    for await (const event of generation) {
      events.push(event);
      if (event.type === "token" && cancelled === undefined) cancelled = await generation.cancel();
    }
    assert.equal(cancelled, true);
    const result = await generation.result;
    assert.equal(result.stop_reason, "cancelled");
    assert.ok(result.tokens.length < 5000);
    assert.equal(tokenTexts(events).join(""), result.text);
  });

  test("an unknown id gives false", async () => {
    assert.equal(await worker.cancel(987654), false);
    assert.equal(await worker.cancel("nope"), false);
  });

  test("aborting the signal sends cancel", async () => {
    const controller = new AbortController();
    const seen: GenerateEvent[] = [];
    const generation = worker.generate(long, {
      signal: controller.signal,
      onEvent: (event) => {
        seen.push(event);
        if (event.type === "token") controller.abort();
      },
    });
    const result = await generation.result;
    assert.equal(result.stop_reason, "cancelled");
    assert.ok(result.tokens.length < 5000);
    assert.equal(tokenTexts(seen).join(""), result.text);
    const cancels = tw.sent.map((l) => JSON.parse(l)).filter((m) => m.method === "cancel" && m.params.id === generation.id);
    assert.equal(cancels.length, 1);
  });

  test("an already aborted signal cancels at once", async () => {
    const generation = worker.generate(long, { signal: AbortSignal.abort() });
    const result = await generation.result;
    assert.equal(result.stop_reason, "cancelled");
    assert.deepEqual(result.tokens, []);
  });
});

describe("host callbacks", () => {
  const greedy = (prompt: string, max_tokens: number): GenerateParams => ({
    model_id: "tiny",
    prompt,
    max_tokens,
    temperature: 0,
    ignore_eos: true,
  });

  test("a generate driven by onEvent alone keeps none of its events", async () => {
    let seen = 0;
    let most = 0;
    const generation = worker.generate(greedy("only onEvent", 40), {
      onEvent: () => {
        seen++;
        most = Math.max(most, generation.buffered);
      },
    });
    const result = await generation.result;
    assert.equal(result.tokens.length, 40);
    assert.ok(seen > 1, `only ${seen} events`);
    assert.equal(most, 0, "events were buffered for a loop that never ran");
    assert.equal(generation.buffered, 0);
  });

  test("without onEvent, a loop started after an await still gets every event", async () => {
    const generation = worker.generate(greedy("late loop", 12));
    await generation.result;
    const events: GenerateEvent[] = [];
    for await (const event of generation) events.push(event);
    assert.deepEqual(tokenIds(events), (await generation.result).tokens);
  });

  test("onEvent and a running loop both get every event", async () => {
    const viaCallback: GenerateEvent[] = [];
    const generation = worker.generate(greedy("both", 12), { onEvent: (e) => viaCallback.push(e) });
    const viaLoop: GenerateEvent[] = [];
    for await (const event of generation) viaLoop.push(event);
    assert.deepEqual(viaLoop, viaCallback);
    assert.deepEqual(tokenIds(viaLoop), (await generation.result).tokens);
  });

  test("a throwing onEvent goes to onError, cancels its generation and gets no more events", async () => {
    const errors: { error: unknown; source: unknown }[] = [];
    let threw = false;
    let callsAfter = 0;
    const generation = worker.generate(greedy("the host throws", 3000), {
      onEvent: (e) => {
        if (threw) callsAfter++;
        if (e.type === "token") {
          threw = true;
          throw new Error("host bug");
        }
      },
      onError: (error, source) => errors.push({ error, source }),
    });
    const result = await generation.result;
    assert.equal(result.stop_reason, "cancelled");
    assert.ok(result.tokens.length < 3000);
    assert.equal(errors.length, 1);
    assert.equal((errors[0].error as Error).message, "host bug");
    assert.deepEqual(errors[0].source, { callback: "onEvent", id: generation.id });
    assert.ok(threw);
    assert.equal(callsAfter, 0, "events after the throw reached onEvent");
  });

  test("by default a throwing onEvent is logged with console.error, never uncaught", async () => {
    const logged: unknown[][] = [];
    const uncaught: unknown[] = [];
    const onUncaught = (error: unknown) => uncaught.push(error);
    const original = console.error;
    console.error = (...args: unknown[]) => void logged.push(args);
    process.on("uncaughtException", onUncaught);
    try {
      const generation = worker.generate(greedy("default onError", 3000), {
        onEvent: () => {
          throw new Error("unhandled host bug");
        },
      });
      assert.equal((await generation.result).stop_reason, "cancelled");
      await new Promise((resolve) => setImmediate(resolve));
    } finally {
      console.error = original;
      process.off("uncaughtException", onUncaught);
    }
    assert.deepEqual(uncaught, []);
    assert.equal(logged.length, 1);
    assert.ok(logged[0].some((a) => a instanceof Error && a.message === "unhandled host bug"));
  });
});

describe("tools and reasoning", () => {
  test("channels, tool_call_index and the result's tool calls are typed and add up", async () => {
    const loaded = await worker.request("load", { model: toolsModel(), model_id: "qwen3" });
    assert.equal(loaded.tool_call_format, "json_tools");
    const weather: Tool = {
      type: "function",
      function: {
        name: "get_weather",
        parameters: {
          type: "object",
          properties: { city: { type: "string", maxLength: 8 } },
          required: ["city"],
          additionalProperties: false,
        },
      },
    };
    const texts = new ChannelText();
    const tokens: Extract<GenerateEvent, { type: "token" }>[] = [];
    const generation = worker.generate(
      {
        model_id: "qwen3",
        messages: [{ role: "user", content: "Weather in Paris?" }],
        tools: [weather],
        tool_choice: { name: "get_weather" },
        max_tokens: 40,
        temperature: 0,
      },
      {
        onEvent: (e) => {
          texts.add(e);
          if (e.type === "token") tokens.push(e);
        },
      },
    );
    const result = await generation.result;
    assert.equal(tokens.map((t) => t.text).join(""), result.text);
    assert.equal(texts.content, result.content);
    assert.equal(texts.reasoning, result.reasoning);
    assert.equal(channelOf(tokens[0]), "marker", "the call starts at once: <tool_call>");
    for (const t of tokens) assert.equal(t.tool_call_index, channelOf(t) === "tool_call" ? 0 : undefined);
    assert.equal(result.tool_calls.length, 1);
    const [call] = result.tool_calls;
    assert.equal(call.name, "get_weather");
    assert.match(call.id, /\S/);
    assert.equal(result.invalid_tool_calls, undefined);
    // The call's streamed text is the call the result reports, parsed.
    assert.equal(texts.toolCalls.length, 1);
    assert.deepEqual(JSON.parse(texts.toolCalls[0]), { name: call.name, arguments: call.arguments });
  });
});

describe("errors", () => {
  const cases: Array<[string, Record<string, unknown>, string]> = [
    ["a wrong type", { prompt: "x", max_tokens: "ten" }, "params.max_tokens"],
    ["an unknown field", { prompt: "x", max_tokenz: 3 }, "max_tokenz"],
    ["an out-of-range value", { prompt: "x", top_logprobs: 1000 }, "params.top_logprobs"],
  ];
  for (const [what, params, field] of cases) {
    test(`${what} is -32602 naming the field, and the worker keeps serving`, async () => {
      const error = await worker.request("generate", params as GenerateParams).catch((e) => e);
      assert.ok(error instanceof RpcError, String(error));
      assert.equal(error.code, -32602);
      assert.ok(`${error.field} ${error.message}`.includes(field), `${error.message} should name ${field}`);
      const { result } = await run({ prompt: "still here", max_tokens: 2, temperature: 0 });
      assert.equal(result.tokens.length, 2);
    });
  }

  test("seeds and other integers above 2^53 are refused before sending", async () => {
    const before = tw.sent.length;
    for (const seed of [2 ** 53, 2 ** 64 - 1, 1.5]) {
      const error = await worker.request("generate", { prompt: "x", seed }).catch((e) => e);
      assert.ok(error instanceof RangeError && /params\.seed/.test(error.message), String(error));
    }
    const generation = worker.generate({ prompt: "x", tokens: [1, 2 ** 60] });
    await assert.rejects(generation.result, /params\.tokens\[1\]/);
    assert.equal(tw.sent.length, before, "nothing may be sent");
  });
});

test("embed: vectors and token counts from an embedding model; generate refused on it", async () => {
  const loaded = await worker.request("load", { model: embedModel(), model_id: "emb" });
  assert.equal(loaded.kind, "embedding");
  const result = await worker.embed({ model_id: "emb", input: ["the model token", "a"], dimensions: 16 });
  assert.equal(result.embeddings.length, 2);
  assert.equal(result.dimensions, 16);
  assert.equal(result.tokens.length, 2);
  assert.equal(result.usage.prompt_tokens, result.tokens[0] + result.tokens[1]);
  for (const v of result.embeddings) {
    assert.equal(v.length, 16);
    assert.ok(Math.abs(Math.hypot(...v) - 1) < 1e-5);
  }
  const error = await worker.request("generate", { model_id: "emb", prompt: "x", max_tokens: 1 }).catch((e) => e);
  assert.ok(error instanceof RpcError && error.code === -32602, String(error));
  await worker.request("unload", { model_id: "emb" });
});

test("every line the worker sent validates against protocol/schema.json", () => {
  assert.ok(tw.checker.checked > 50, `only ${tw.checker.checked} lines checked`);
  assert.deepEqual(tw.checker.problems, []);
  assert.ok(tw.received[0].includes('"ready"'));
});
