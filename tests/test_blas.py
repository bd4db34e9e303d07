"""The optimized BLAS bound under mlx-cpu must not change outputs."""

from __future__ import annotations

import sys

import pytest

from conftest import spawn


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="BLAS binding is Linux-only")
def test_outputs_equal_with_and_without_bound_blas(small_model):
    results = {}
    for mode in ("auto", "off"):
        w = spawn("--blas", mode)
        try:
            results[mode] = (w.ready.capabilities.blas, [])
            w.load(small_model)
            for prompt in ("The quick brown fox", "A much longer prompt " * 15):
                r = w.generate(prompt=prompt, max_tokens=12, temperature=0, ignore_eos=True,
                               top_logprobs=1).wait()
                results[mode][1].append(r.tokens)
        finally:
            w.close()
    assert results["off"][0] is None
    assert results["auto"][1] == results["off"][1]
