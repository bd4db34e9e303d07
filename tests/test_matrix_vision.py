"""The properties that matter, on every vision checkpoint layout users load.

Fixtures: Qwen2-VL in fp32 and as 4-bit and 8-bit conversions made with
mlx-vlm's own converter (its language model's embed_tokens is quantized too),
and GLM-4V, whose language model keeps the image positions it computes in
``get_input_embeddings`` (``_position_ids``) instead of taking them from the
caller. The reference is mlx-vlm's own stream_generate on the same checkpoint,
rendered prompt and images.
"""

from __future__ import annotations

import json

import jsonschema
import pytest

import reference
from conftest import spawn
from fixtures.build import ensure_model
from mlx_worker import protocol
from numerics import assert_same_output
from vision_images import b64, gradient, noise, png, user

VISION_FIXTURES = {
    "tiny-qwen2-vl": "fp32",
    "tiny-qwen2-vl-q4": "quantized",
    "tiny-qwen2-vl-q8": "quantized",
    "tiny-glm4v": "fp32",
}
GREEDY = dict(max_tokens=24, temperature=0, ignore_eos=True, prompt_cache=False)
REFERENCE_IMAGE = noise(3)


@pytest.fixture(scope="module", params=list(VISION_FIXTURES))
def vx(request):
    """(name, dtype class, worker with the fixture loaded as "m", mlx-vlm's tokens for ask(REFERENCE_IMAGE))."""
    name = request.param
    path = str(ensure_model(name))
    w = spawn()
    w.load(path, model_id="m")
    rendered = w.tokenize(model_id="m", messages=ask(REFERENCE_IMAGE)).prompt
    [expected] = reference.run("vision", path, [
        {"prompt": rendered, "images": [b64(png(REFERENCE_IMAGE))], "max_tokens": GREEDY["max_tokens"]}
    ])
    yield name, VISION_FIXTURES[name], w, expected
    w.close()


def ask(picture, text="What is in the picture?"):
    return user(text, ("image", b64(png(picture))))


def gen(w, **params):
    return w.generate(model_id="m", **{**GREEDY, **params}).wait()


def test_two_images_give_different_tokens(vx):
    _, _, w, _ = vx
    a = gen(w, messages=ask(noise(1)))
    b = gen(w, messages=ask(gradient()))
    assert len(a.tokens) == len(b.tokens) == 24
    assert a.tokens != b.tokens
    assert gen(w, messages=ask(noise(1))).tokens == a.tokens


@pytest.mark.parametrize("step", [7, None])
def test_greedy_tokens_equal_mlx_vlm(vx, step):
    """Also with prefill chunks that split the image (step 7)."""
    _, _, w, expected = vx
    assert len(expected) == GREEDY["max_tokens"]
    got = gen(w, messages=ask(REFERENCE_IMAGE), prefill_step_size=step)
    assert got.tokens == expected


def test_streamed_text_is_the_detokenized_continuation(vx):
    _, _, w, _ = vx
    msgs = ask(noise(4))
    stream = w.generate(model_id="m", messages=msgs, **GREEDY)
    events = [e for e in stream if isinstance(e, protocol.TokenEvent)]
    result = stream.result
    ids = w.tokenize(model_id="m", messages=msgs).tokens
    assert "".join(e.text for e in events) == result.text
    assert w.detokenize(ids + result.tokens, model_id="m") == w.detokenize(ids, model_id="m") + result.text


def test_text_prompt_after_an_image_prompt_is_not_shifted(vx):
    _, _, w, _ = vx
    before = gen(w, prompt="The sea is", max_tokens=10)
    gen(w, messages=ask(noise(5)))
    assert gen(w, prompt="The sea is", max_tokens=10).tokens == before.tokens


def test_cached_equals_uncached(vx):
    _, dtype, w, _ = vx
    msgs = ask(noise(6))
    first = w.generate(model_id="m", messages=msgs, max_tokens=8, temperature=0).wait()
    turn = msgs + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And then?"}]
    params = dict(messages=turn, max_tokens=12, temperature=0, ignore_eos=True, top_logprobs=2)
    cached_stream = w.generate(model_id="m", **params)
    cached_events = [e for e in cached_stream if isinstance(e, protocol.TokenEvent)]
    cold_stream = w.generate(model_id="m", prompt_cache=False, **params)
    cold_events = [e for e in cold_stream if isinstance(e, protocol.TokenEvent)]
    cached, cold = cached_stream.result, cold_stream.result
    assert cached.usage.cached_tokens > 0 and cold.usage.cached_tokens == 0
    assert_same_output(dtype, cached, cold, cached_events, cold_events)


def test_constraint_output_validates(vx):
    _, _, w, _ = vx
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    result = w.generate(model_id="m", messages=ask(noise(7)), max_tokens=40, temperature=0,
                        constraint={"type": "json_schema", "schema": schema}).wait()
    assert result.constraint_complete is True, result.text
    jsonschema.validate(json.loads(result.text), schema)
