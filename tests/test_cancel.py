"""cancel during decoding, during prompt processing, and while queued."""

from __future__ import annotations

import time

from conftest import cancel_after
from mlx_worker import protocol


def test_cancel_during_decoding(worker):
    prompt_ids = worker.tokenize(model_id="tiny", text="Go on").tokens
    stream = worker.generate(model_id="tiny", tokens=prompt_ids, max_tokens=100000, temperature=0, ignore_eos=True)
    result = cancel_after(stream, 5)
    assert result.stop_reason == "cancelled"
    assert 5 <= len(result.tokens) < 1000
    # The text of the tokens produced so far, held-back bytes released:
    # decode(prompt + tokens) - decode(prompt), and the events add up to it.
    whole = worker.detokenize(prompt_ids + result.tokens, model_id="tiny")
    expected = whole[len(worker.detokenize(prompt_ids, model_id="tiny")):]
    assert result.text == expected
    assert "".join(e.text for e in stream.events if isinstance(e, protocol.TokenEvent)) == expected
    # the worker serves normally afterwards
    after = worker.generate(model_id="tiny", prompt="Go on", max_tokens=5, temperature=0, ignore_eos=True).wait()
    assert after.stop_reason == "max_tokens" and len(after.tokens) == 5
    assert after.tokens == result.tokens[:5]


def test_cancel_during_prompt_processing(worker):
    long_prompt = [7, 8, 9, 10] * 900  # 3,600 tokens in 8-token chunks: a long prefill
    stream = worker.generate(model_id="tiny", tokens=long_prompt, max_tokens=10, prefill_step_size=8)
    t0 = None
    for event in stream:
        if isinstance(event, protocol.ProgressEvent) and event.processed > 0 and t0 is None:
            t0 = time.perf_counter()
            assert stream.cancel() is True
        if isinstance(event, protocol.TokenEvent):
            raise AssertionError("no token may come after a cancel during prefill")
    result = stream.result
    assert result.stop_reason == "cancelled" and result.tokens == []
    assert time.perf_counter() - t0 < 5
    progress = [e for e in stream.events if isinstance(e, protocol.ProgressEvent)]
    assert progress[-1].processed < len(long_prompt)
    after = worker.generate(model_id="tiny", prompt="again", max_tokens=3, temperature=0, ignore_eos=True).wait()
    assert len(after.tokens) == 3


def test_cancel_queued_and_finished_and_unknown(worker):
    long = worker.generate(model_id="tiny", prompt="busy", max_tokens=100000, ignore_eos=True)
    queued = worker.generate(model_id="tiny", prompt="waiting", max_tokens=5)
    assert worker.cancel(queued.id) is True
    assert worker.cancel(long.id) is True
    assert long.wait().stop_reason == "cancelled"
    q = queued.wait()
    assert q.stop_reason == "cancelled" and q.tokens == []
    assert worker.cancel(queued.id) is False  # finished
    assert worker.cancel("no-such-request") is False
    assert worker.cancel(987654) is False


def test_cancel_of_a_queued_generate_is_answered_at_once(worker):
    running = worker.generate(model_id="tiny", prompt="long", max_tokens=100000, ignore_eos=True)
    next(iter(running))  # it is running
    queued = worker.generate(model_id="tiny", prompt="behind it", max_tokens=5)
    assert worker.cancel(queued.id) is True
    result = queued.wait()  # answered while the first generation still runs
    assert result.stop_reason == "cancelled" and result.tokens == []
    assert worker.status().queue.active == running.id
    assert running.cancel() is True
    assert running.wait().stop_reason == "cancelled"
