"""What protocol/README.md ("Numerics per dtype") guarantees when the same
prompt is computed two ways (from the prompt cache or not, other prefill
chunks), as one assertion the matrix tests share."""

from __future__ import annotations

from conftest import logprob_entries

# The logprob of a token both runs chose, per dtype class of the activations.
LOGPROB_TOLERANCE = {"fp32": 1e-4, "bf16": 0.05, "quantized": 0.05}


def assert_same_output(dtype, a, b, a_events, b_events):
    """fp32: the same tokens. Every dtype: each token both runs chose has logprobs
    within the tolerance; where the tokens part, it was a near-tie (the other
    run's token within twice the tolerance of the top in both runs)."""
    tol = LOGPROB_TOLERANCE[dtype]
    if dtype == "fp32":
        assert a.tokens == b.tokens
    a_lp, b_lp = logprob_entries(a_events), logprob_entries(b_events)
    assert len(a_lp) == len(a.tokens) and len(b_lp) == len(b.tokens)
    for x, y in zip(a_lp, b_lp):
        if x.token != y.token:
            for mine, other in ((x, y), (y, x)):
                alt = next((t.logprob for t in mine.top if t.token == other.token), None)
                assert alt is not None and mine.logprob - alt <= 2 * tol, (mine, other)
            break
        assert abs(x.logprob - y.logprob) <= tol, (x, y)
