import { resolve } from "node:path";
import { spawnWorker } from "mlx-worker-client";

const [python = "python3", model = "fixtures/models/tiny-llama"] = process.argv.slice(2);

async function main() {
  const worker = await spawnWorker({ python }); // resolves once the worker sent `ready`
  try {
    const loaded = await worker.request("load", { model: resolve(model) }); // typed params and result
    const generation = worker.generate(
      { messages: [{ role: "user", content: "Hello!" }], max_tokens: 24, temperature: 0 },
      { signal: AbortSignal.timeout(30_000) }, // aborting sends `cancel`
    );
    for await (const event of generation) if (event.type === "token") process.stdout.write(event.text);
    const result = await generation.result;
    console.log(`\n[${loaded.model_id}: ${result.stop_reason}, ${result.tokens.length} tokens]`);
  } finally {
    await worker.close(); // shutdown, then SIGTERM, then SIGKILL
  }
}

main().catch((error) => {
  console.error(error); // RpcError (code, data) or WorkerExitedError (exitCode, signal, stderrTail)
  process.exitCode = 1;
});
