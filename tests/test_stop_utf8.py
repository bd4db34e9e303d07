"""Stop strings next to an incomplete UTF-8 character.

The fixture tokenizer has a token that is a space plus the first byte of a
3-byte character (" \\xe2"): "x —" tokenizes as ``x``, `` \\xe2``, ``\\x80``,
``\\x94``. With the stop string "x ", the stop is complete at the second
token although that token's last byte is still waiting for the rest of its
character. A regex constraint and a logit bias make the random model emit
exactly these tokens, whatever its weights.
"""

from __future__ import annotations

import pytest

from mlx_worker import protocol

STOP = "x "
TEXT = "x \u2014"  # "x —"


@pytest.fixture(scope="module")
def split_char(worker):
    ids = worker.tokenize(model_id="tiny", text=TEXT).tokens
    # The case exists in this tokenizer: the stop ends inside the second token,
    # whose text is not complete until the next tokens arrive.
    assert len(ids) == 4
    assert worker.detokenize(ids[:1], model_id="tiny") == "x"
    assert worker.detokenize(ids[:2], model_id="tiny") == "x \ufffd"
    assert worker.detokenize(ids, model_id="tiny") == TEXT
    return ids


def forced(worker, ids, **params):
    stream = worker.generate(
        model_id="tiny", prompt="Once upon a time", max_tokens=8, temperature=0,
        constraint={"type": "regex", "pattern": TEXT},
        logit_bias={str(t): 100.0 for t in ids}, **params,
    )
    events = list(stream)
    return stream.result, events


def test_forcing_emits_the_split_character(worker, split_char):
    result, _ = forced(worker, split_char)
    assert result.tokens == split_char and result.text == TEXT and result.stop_reason == "eos"


def test_stop_detected_at_the_token_that_completes_it(worker, split_char):
    result, events = forced(worker, split_char, stop=[STOP])
    assert result.stop_reason == "stop_string" and result.stop_string == STOP
    # up to and including the token that completed the stop string, no further
    assert result.tokens == split_char[:2]
    assert result.text == ""
    assert "".join(e.text for e in events if isinstance(e, protocol.TokenEvent)) == ""
    assert [t for e in events if isinstance(e, protocol.TokenEvent) for t in e.tokens] == split_char[:2]


def test_stop_token_right_after_a_completed_stop_string(worker, split_char):
    # The token after the stop-completing one is also a stop token: the stop
    # string came first, so it is the reason, and no stop_token is reported.
    result, _ = forced(worker, split_char, stop=[STOP], stop_token_ids=[split_char[2]])
    assert result.stop_reason == "stop_string" and result.stop_string == STOP
    assert result.stop_token is None
    assert result.tokens == split_char[:2]


def test_stop_token_only(worker, split_char):
    # Without a stop string the same stop token ends it as "eos".
    result, _ = forced(worker, split_char, stop_token_ids=[split_char[2]])
    assert result.stop_reason == "eos" and result.stop_token == split_char[2]
    assert result.stop_string is None
    assert result.tokens == split_char[:2] and result.text == "x \ufffd"


def test_stop_string_found_only_when_held_bytes_are_released(worker, split_char):
    # A stop string that matches the U+FFFD of bytes released at the end is
    # found after the stop token ended the loop: the result still names one
    # reason only.
    result, _ = forced(worker, split_char, stop=[" \ufffd"], stop_token_ids=[split_char[2]])
    assert result.stop_reason == "stop_string" and result.stop_string == " \ufffd"
    assert result.stop_token is None
    assert result.tokens == split_char[:2] and result.text == "x"
