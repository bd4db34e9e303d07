"""A terminal front end: spawns a worker and talks to it like a host would.

    python -m mlx_worker.cli demo                       # a narrated session on the tiny fixture model
    python -m mlx_worker.cli generate MODEL "prompt"    # stream one completion
    python -m mlx_worker.cli chat MODEL                 # a chat REPL (reuses the prompt cache each turn)

Text goes to stdout, statistics and wire traces to stderr. Spec: protocol/README.md § Host clients.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from . import protocol
from .client import RpcError, WorkerClient


def _sampling(args: argparse.Namespace) -> dict:
    params: dict[str, Any] = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.seed is not None:
        params["seed"] = args.seed
    if args.stop:
        params["stop"] = args.stop
    if args.json_schema:
        params["constraint"] = {"type": "json_schema", "schema": json.loads(args.json_schema)}
    return params


def _stream(client: WorkerClient, params: dict) -> protocol.GenerateResult:
    stream = client.generate(**params)
    try:
        for event in stream:
            if isinstance(event, protocol.TokenEvent):
                sys.stdout.write(event.text)
                sys.stdout.flush()
    except KeyboardInterrupt:
        stream.cancel()
        stream.wait()
    result = stream.result
    assert result is not None
    t = result.timings
    print(
        f"\n[{result.stop_reason}] {result.usage.prompt_tokens} prompt tokens "
        f"({result.usage.cached_tokens} cached), {result.usage.completion_tokens} generated; "
        f"ttft {t.ttft_ms:.0f} ms, {t.prompt_tps:.0f} prompt tok/s, {t.generation_tps:.0f} tok/s",
        file=sys.stderr,
    )
    return result


def cmd_generate(args: argparse.Namespace) -> int:
    with WorkerClient(args.worker_args) as client:
        client.load(os.path.abspath(args.model))
        key = "messages" if args.chat else "prompt"
        value: Any = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
        _stream(client, {key: value, **_sampling(args)})
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    with WorkerClient(args.worker_args) as client:
        info = client.load(os.path.abspath(args.model))
        print(f"loaded {info.model_id} ({info.kind}); empty line or Ctrl-D quits", file=sys.stderr)
        history: list[dict] = []
        if args.system:
            history.append({"role": "system", "content": args.system})
        while True:
            try:
                line = input("> ")
            except EOFError:
                break
            if not line.strip():
                break
            history.append({"role": "user", "content": line})
            result = _stream(client, {"messages": history, **_sampling(args)})
            history.append({"role": "assistant", "content": result.text})
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Spawn a worker, show every line on the wire for a short session."""
    model = args.model
    if model is None:
        sys.path.insert(0, os.getcwd())
        try:
            from fixtures.build import ensure_model
        except ImportError:
            print("run the demo from the repository root, or pass --model PATH", file=sys.stderr)
            return 2
        model = str(ensure_model("tiny-llama"))
    started = time.perf_counter()
    client = WorkerClient(args.worker_args, trace=True)
    print(f"# spawned `python -m mlx_worker` in {time.perf_counter() - started:.2f} s", file=sys.stderr)
    shown = 0

    def show_new_lines() -> None:
        nonlocal shown
        while shown < len(client.lines):
            line = client.lines[shown].decode().rstrip("\n")
            print(f"<- {line[:300]}{' …' if len(line) > 300 else ''}")
            shown += 1

    def send(method: str, params: dict) -> Any:
        try:
            return client.call(method, params)
        except RpcError as exc:
            return exc
        finally:
            print(f"-> {client.sent[-1].decode().rstrip()}")
            time.sleep(0.05)
            show_new_lines()

    show_new_lines()
    send("load", {"model": model, "model_id": "tiny"})
    send("tokenize", {"text": "Hello, world"})
    send("generate", {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 12,
                      "temperature": 0})
    send("generate", {"prompt": "The sea is", "max_tokens": 8, "temperature": 0.8, "seed": 1, "top_logprobs": 2})
    send("generate", {"prompt": "bad", "max_tokens": "ten"})
    send("status", {})
    send("unload", {"model_id": "tiny"})
    code = client.shutdown()
    show_new_lines()
    print(f"# worker exited with code {code}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlx_worker.cli", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker-arg", dest="worker_args", action="append", default=[],
                   help="an argument passed to the worker (repeatable), e.g. --worker-arg=--log-level=info")
    sub = p.add_subparsers(dest="command", required=True)

    def sampling_flags(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--max-tokens", type=int, default=200)
        sp.add_argument("--temperature", type=float, default=0.7)
        sp.add_argument("--seed", type=int)
        sp.add_argument("--stop", action="append")
        sp.add_argument("--json-schema", help="constrain output to this JSON schema (a JSON string)")

    g = sub.add_parser("generate", help="stream one completion")
    g.add_argument("model", help="path to a local model folder")
    g.add_argument("prompt")
    g.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    sampling_flags(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="a chat REPL")
    c.add_argument("model")
    c.add_argument("--system")
    sampling_flags(c)
    c.set_defaults(func=cmd_chat)

    d = sub.add_parser("demo", help="a narrated wire session on the tiny fixture model")
    d.add_argument("--model", help="model folder (default: build fixtures/models/tiny-llama)")
    d.set_defaults(func=cmd_demo)

    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
