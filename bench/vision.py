#!/usr/bin/env python3
"""Time to first token of a second turn about the same image ÷ the first turn.

    python bench/vision.py [--rounds 15] [--size 224] [--model PATH]

Each round uses a new picture (seeded noise), so the first turn is cold: the
image is decoded, preprocessed and run through the vision tower, and the whole
prompt is prefilled. The second turn is the same conversation plus the
assistant's answer and a new question: the image features come from the
content-hash cache and the shared prefix from the prompt (KV) cache. Three
configurations run side by side, their order rotating every round: both
caches; the image-feature cache only (``prompt_cache: false``); neither (a
second copy of the model loaded with ``image_cache_bytes=0``). Printed: median
TTFTs and the median of the per-round turn 2 / turn 1 ratios.
"""

from __future__ import annotations

import argparse
import base64
import io
import sys

from common import ensure_model, median, spawn, report


def picture(seed: int, size: int) -> str:
    import numpy as np
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def turns(image: str, answer: str) -> tuple[list, list]:
    first = [{"role": "user", "content": [
        {"type": "text", "text": "Describe this picture in detail, please."},
        {"type": "image", "image": image},
    ]}]
    second = first + [
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "What colour stands out the most?"},
    ]
    return first, second


CONFIGS = {  # name: (model_id, prompt_cache)
    "prompt + image cache": ("cached", True),
    "image cache only": ("cached", False),
    "no cache": ("no-image-cache", False),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--size", type=int, default=224, help="image side in pixels")
    ap.add_argument("--model", default=None, help="a VLM folder (default: the tiny-qwen2-vl fixture)")
    args = ap.parse_args()
    model = args.model or str(ensure_model("tiny-qwen2-vl"))
    ttfts: dict[str, list[tuple[float, float]]] = {name: [] for name in CONFIGS}
    with spawn() as w:
        w.load(model, model_id="cached")
        w.load(model, model_id="no-image-cache", image_cache_bytes=0)
        params = dict(max_tokens=8, temperature=0, ignore_eos=True)
        warm_first, warm_second = turns(picture(10_000, args.size), "A picture.")
        for model_id in ("cached", "no-image-cache"):  # imports, first-call compilation
            w.generate(model_id=model_id, messages=warm_first, **params).wait()
            w.generate(model_id=model_id, messages=warm_second, **params).wait()
        seed = 0
        for r in range(args.rounds):
            names = list(CONFIGS)
            names = names[r % len(names):] + names[: r % len(names)]  # rotate the order
            for name in names:
                model_id, prompt_cache = CONFIGS[name]
                seed += 1  # a new picture: turn 1 is always cold
                first, _ = turns(picture(seed, args.size), "")
                one = w.generate(model_id=model_id, messages=first, prompt_cache=prompt_cache, **params).wait()
                answer = w.detokenize(one.tokens, model_id=model_id)
                _, second = turns(first[0]["content"][1]["image"], answer)
                two = w.generate(model_id=model_id, messages=second, prompt_cache=prompt_cache, **params).wait()
                ttfts[name].append((one.timings.ttft_ms, two.timings.ttft_ms))
        prompt = w.tokenize(model_id="cached", messages=turns(picture(0, args.size), "x")[1]).count
    print(f"model {model}, image {args.size}x{args.size}, second-turn prompt ~{prompt} tokens, {args.rounds} rounds")
    for name, pairs in ttfts.items():
        first = median(p[0] for p in pairs)
        second = median(p[1] for p in pairs)
        ratio = median(p[1] / p[0] for p in pairs)
        print(f"{name:>21}: turn 1 TTFT {first:7.1f} ms, turn 2 TTFT {second:7.1f} ms, turn 2 / turn 1 = {ratio:.3f}")
    report("vision", {name: median(p[1] / p[0] for p in pairs) for name, pairs in ttfts.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
