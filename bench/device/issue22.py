"""Issue 22's figures on a lent GPU: a ~1B-parameter random Llama (Llama 3.2
1B's shape over the fixtures' 1,024-token vocabulary) in bf16 and 4-bit,
drawn there (2 GB would not travel), then bench/concurrency.py's and
bench/priority.py's scenarios on each, the worker against mlx_lm.server and
in-process mlx-lm side by side. The figures go to OUT after every step (a
call cut short still returns what it measured).

    python bench/device/issue22.py --out DIR [--budget 420] [--rounds 2] [--size 1b] [--long 8000]

``--size small`` draws small-llama's shape instead: a dry run on a CPU
(bench/README.md § On a lent GPU machine).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/

import concurrency  # noqa: E402
import priority  # noqa: E402
from common import ROOT  # noqa: E402

SHAPES = {
    "1b": {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
           "intermediate_size": 8192},
    "small": {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4,
              "intermediate_size": 1376},
}
CONTEXT = 16384  # room for priority.py's 8,000-token prompt
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
# What a step may cost (seconds; first guesses for an H100 or H200, raised to
# 1.1 x what it took once it ran): a step is skipped when the budget left is
# smaller, so the call ends inside its limit.
COST = {"build": 60, "concurrency": 150, "priority": 60}


def draw(size: str, tokenizer: Path, out: Path) -> int:
    """A random Llama of ``size``'s shape in bf16, saved as mlx-lm saves one;
    the embedding table N(0, 1) as the fixtures draw it, so greedy output
    follows the input. Returns its parameter count."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models.llama import Model, ModelArgs

    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 1024,
           "rms_norm_eps": 1e-6, "rope_theta": 500000.0, "tie_word_embeddings": False,
           "eos_token_id": [2, 0], "bos_token_id": None, "pad_token_id": 0,  # the fixtures' tokenizer's
           "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
           "max_position_embeddings": CONTEXT, "torch_dtype": "bfloat16", **SHAPES[size]}
    cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    mx.random.seed(22)
    model = Model(ModelArgs.from_dict(cfg))
    embed = model.model.embed_tokens
    embed.weight = mx.random.normal(embed.weight.shape)
    model.set_dtype(mx.bfloat16)
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer / name, out / name)
    tc = json.loads((out / "tokenizer_config.json").read_text())
    tc["model_max_length"] = CONTEXT
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    return sum(v.size for v in weights.values())


def quantize(source: Path, out: Path) -> None:
    """4-bit through mlx-lm's own converter, as users make theirs."""
    from mlx_lm.convert import convert

    shutil.rmtree(out, ignore_errors=True)
    with contextlib.redirect_stdout(io.StringIO()):
        convert(str(source), str(out), quantize=True, q_bits=4, q_group_size=64)
    for name in TOKENIZER_FILES:  # convert keeps what its tokenizer saves; the template file too
        if not (out / name).exists():
            shutil.copy(source / name, out / name)


def summary(rows: dict) -> str:
    targets = [("tps_vs_server_8", "8 × 128 aggregate ÷ server", "≥ 1.2"),
               ("gap_during_prompt_over_idle", "gap p99 during a 2k prompt ÷ idle", "≤ 3"),
               ("long_ttft_vs_server", "that prompt's TTFT ÷ server's", "≤ 1.1"),
               ("short_ttft_vs_server", "short request behind it ÷ server's", "≤ 0.25"),
               ("single_vs_inprocess", "one stream ÷ in-process mlx-lm", "≥ 0.98"),
               ("ratio_behind_background", "chat TTFT behind an 8k background prefill ÷ idle", "≤ 1.5")]
    names = list(rows)
    lines = ["| figure | " + " | ".join(names) + " | target |", "|---|" + "---:|" * len(names) + "---|"]
    for key, label, target in targets:
        cells = [f"{rows[n][key]:.3f}" if isinstance(rows[n].get(key), (int, float)) else "–" for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {target} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", type=float, default=420.0, help="seconds; steps that would not fit are skipped")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--size", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--long", type=int, default=8000, help="priority.py's background prompt")
    ap.add_argument("--tokenizer", default=str(ROOT / ".device" / "b" / "tokenizer"))
    ap.add_argument("--models", default="/tmp/mlx-worker-models")
    a = ap.parse_args()
    start, out, models = time.monotonic(), Path(a.out), Path(a.models)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = Path(a.tokenizer)
    if not tokenizer.is_dir():
        tokenizer = ROOT / "fixtures" / "models" / "small-llama"

    def left() -> float:
        return a.budget - (time.monotonic() - start)

    import mlx.core as mx

    rows: dict = {}
    info = {"device": str(mx.default_device()), "mlx": mx.__version__, "size": a.size, "rounds": a.rounds}
    bf16, q4 = models / f"llama-{a.size}-bf16", models / f"llama-{a.size}-q4"
    if not (bf16 / "model.safetensors").exists():
        info["params"] = draw(a.size, tokenizer, bf16)
    if left() > COST["build"] and not (q4 / "model.safetensors").exists():
        quantize(bf16, q4)
    # Most wanted first: a call cut short keeps what it measured, and a
    # step's cost is learnt from its first run on this machine.
    steps = [("bf16", bf16, "concurrency"), ("4-bit", q4, "concurrency"),
             ("bf16", bf16, "priority"), ("4-bit", q4, "priority")]
    for name, path, what in steps:
        row = rows.setdefault(name, {})
        if not path.exists() or left() < COST[what]:
            row.setdefault("skipped", []).append(what)
            continue
        began = time.monotonic()
        try:
            if what == "concurrency":
                r = concurrency.measure(str(path), 128, a.rounds, [1, 8, 16, 32])
                print(f"\n## {name}\n")
                concurrency.print_tables(r, 128, [1, 8, 16, 32])
                row.update(concurrency.headline(r, str(path)))
            else:
                row.update(priority.measure(str(path), a.long, a.rounds))
        except Exception as exc:  # the next step may still work: keep going
            traceback.print_exc()
            row.setdefault("errors", {})[what] = repr(exc)
        COST[what] = max(COST[what], 1.1 * (time.monotonic() - began))
        row["elapsed_s"] = round(time.monotonic() - start, 1)
        write(out, info, rows)
    write(out, info, rows)
    print("\n" + summary(rows))


def write(out: Path, info: dict, rows: dict) -> None:
    (out / "issue22.json").write_text(json.dumps({"info": info, "rows": rows}, indent=2, default=str))
    (out / "issue22.md").write_text(f"{json.dumps(info)}\n\n" + summary(rows))


if __name__ == "__main__":
    main()
