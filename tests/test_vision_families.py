"""The newest vision families through the worker's one loop (issue 19).

One tiny random folder per family (fixtures/vision_families.py, built with
mlx-vlm's own model classes). For each: greedy tokens with an image equal
mlx-vlm's own stream_generate on the same folder, rendered prompt and image;
a second turn about the same image reuses the cache and gives a cold run's
tokens; a text-only chat works; a plain-string message reaches the template
as a string.
"""

from __future__ import annotations

import pytest

import reference
from conftest import spawn
from fixtures.build import ensure_model
from fixtures.vision_families import FAMILIES
from vision_images import b64, noise, png, user

GREEDY = dict(max_tokens=10, temperature=0, ignore_eos=True, prompt_cache=False)
PICTURE = noise(3, size=(48, 40))


@pytest.fixture(scope="module", params=list(FAMILIES))
def fam(request):
    """(name, worker with the fixture loaded as "m", mlx-vlm's tokens for ask(PICTURE))."""
    name = request.param
    path = str(ensure_model(name))
    w = spawn()
    w.load(path, model_id="m")
    rendered = w.tokenize(model_id="m", messages=ask(PICTURE)).prompt
    [expected] = reference.run("vision", path, [
        {"prompt": rendered, "images": [b64(png(PICTURE))], "max_tokens": GREEDY["max_tokens"]}
    ])
    yield name, w, expected
    w.close()


def ask(picture, text="What is in the picture?"):
    return user(text, ("image", b64(png(picture))))


def gen(w, **params):
    return w.generate(model_id="m", **{**GREEDY, **params}).wait()


@pytest.mark.parametrize("step", [5, None])
def test_greedy_tokens_equal_mlx_vlm(fam, step):
    """Also with prefill chunks that split the image (step 5)."""
    _, w, expected = fam
    assert len(expected) == GREEDY["max_tokens"]
    assert gen(w, messages=ask(PICTURE), prefill_step_size=step).tokens == expected


def test_second_turn_reuses_the_cache(fam):
    _, w, _ = fam
    msgs = ask(noise(6, size=(48, 40)))
    first = w.generate(model_id="m", messages=msgs, max_tokens=6, temperature=0).wait()
    turn = msgs + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And then?"}]
    params = dict(messages=turn, max_tokens=8, temperature=0, ignore_eos=True)
    cached = w.generate(model_id="m", **params).wait()
    cold = w.generate(model_id="m", prompt_cache=False, **params).wait()
    assert cached.usage.cached_tokens > 0 and cold.usage.cached_tokens == 0
    assert cached.tokens == cold.tokens


def test_text_only_chat(fam):
    _, w, _ = fam
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The sea is"}]
    a = gen(w, messages=msgs)
    assert len(a.tokens) == GREEDY["max_tokens"]
    assert gen(w, messages=msgs).tokens == a.tokens


def test_string_content_stays_a_string(fam):
    _, w, _ = fam
    rendered = w.tokenize(model_id="m", messages=[
        {"role": "system", "content": "Be brief."}, *ask(PICTURE, "Hi")]).prompt
    assert "Be brief." in rendered and "'type'" not in rendered, rendered
