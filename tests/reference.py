"""Reference tokens from mlx-lm / mlx-vlm, in a process set up as the worker is.

The worker binds an optimized BLAS before importing MLX (mlx_worker/blas.py);
fp32 products then round differently from the reference BLAS, and on a bf16
model a logit tie can break the other way. So the reference runs in a child
process that binds the BLAS the same way, and the comparison is exact.

``run(kind, path, jobs)`` -> one result per job:
- text: ``{"prompt": [ids], "max_tokens": n, "eos": bool}``: eos=True is
  ``mlx_lm.stream_generate`` (stops at EOS, which is not returned), False is
  ``generate_step`` (never stops early);
- vision: ``{"prompt": rendered, "images": [base64 PNG], "max_tokens": n}``:
  ``mlx_vlm.stream_generate``.
"""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT, worker_env


def run(kind: str, path: str, jobs: list[dict]) -> list[list[int]]:
    out = subprocess.run(
        [sys.executable, __file__],
        input=json.dumps({"kind": kind, "path": path, "jobs": jobs}),
        capture_output=True, text=True, env=worker_env(), cwd=str(ROOT), timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _text(path: str, jobs: list[dict]) -> list[list[int]]:
    import mlx.core as mx
    from mlx_lm import load, stream_generate
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = load(path)
    results = []
    for job in jobs:
        if job["eos"]:
            out = list(stream_generate(model, tokenizer, job["prompt"], max_tokens=job["max_tokens"],
                                       sampler=make_sampler(temp=0.0)))
            tokens = [r.token for r in out]
            if out and out[-1].finish_reason == "stop":
                tokens.pop()  # the EOS
        else:
            steps = generate_step(mx.array(job["prompt"]), model, sampler=make_sampler(temp=0.0),
                                  max_tokens=job["max_tokens"])
            tokens = [int(t) for t, _ in steps]
        results.append(tokens)
    return results


def _vision(path: str, jobs: list[dict]) -> list[list[int]]:
    import base64
    import io

    from mlx_vlm import load, stream_generate
    from PIL import Image

    model, processor = load(path)
    results = []
    for job in jobs:
        images = [Image.open(io.BytesIO(base64.b64decode(b))) for b in job["images"]]
        out = stream_generate(model, processor, job["prompt"], image=images, max_tokens=job["max_tokens"],
                              temperature=0.0)
        results.append([r.token for r in out][: job["max_tokens"]])
    return results


def _main() -> None:
    request = json.loads(sys.stdin.read())
    sys.path.insert(0, str(ROOT))
    from mlx_worker import blas

    blas.bind(None)  # as `python -m mlx_worker` does, before MLX is imported
    runner = _text if request["kind"] == "text" else _vision
    print(json.dumps(runner(request["path"], request["jobs"])))


if __name__ == "__main__":
    _main()
