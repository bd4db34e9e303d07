"""The newest vision families through the worker's one loop (issue 19).

One tiny random folder per family (fixtures/vision_families.py, built with
mlx-vlm's own model classes). For each: greedy tokens with an image equal
mlx-vlm's own stream_generate on the same folder, rendered prompt and image;
a second turn about the same image reuses the cache and gives a cold run's
tokens; a text-only chat works; a plain-string message reaches the template
as a string.
"""

from __future__ import annotations

import importlib.util

import pytest

import reference
from conftest import spawn
from mlx_worker.client import RpcError
from fixtures.build import ensure_model
from fixtures.vision_families import FAMILIES
from vision_images import b64, gradient, noise, png, user

GREEDY = dict(max_tokens=10, temperature=0, ignore_eos=True, prompt_cache=False)
PICTURE = noise(3, size=(48, 40))
OTHER = gradient(size=(40, 56))
# mlx-vlm 0.7.10's LLaVA processor hands the tokenizer's options (`padding`)
# to the image processor, which transformers 5.25 rejects: no image runs.
REFUSED = {"tiny-llava"}


@pytest.fixture(scope="module")
def worker():
    """One worker for the module: each family is loaded in turn as "m"."""
    w = spawn()
    yield w
    w.close()


@pytest.fixture(scope="module", params=[n for n in FAMILIES if n not in REFUSED])
def fam(request, worker):
    """(name, the worker with the family loaded as "m", mlx-vlm's tokens for
    ask(PICTURE) and for two_pictures())."""
    name = request.param
    path = str(ensure_model(name))
    worker.load(path, model_id="m")
    jobs = [
        {"prompt": worker.tokenize(model_id="m", messages=msgs).prompt,
         "images": [b64(png(p)) for p in pictures], "max_tokens": GREEDY["max_tokens"]}
        for msgs, pictures in ((ask(PICTURE), [PICTURE]), (two_pictures(), [PICTURE, OTHER]))
    ]
    expected = reference.run("vision", path, jobs)
    yield name, worker, expected
    worker.call("unload", {"model_id": "m"})


def ask(picture, text="What is in the picture?"):
    return user(text, ("image", b64(png(picture))))


def two_pictures():
    return user(("image", b64(png(PICTURE))), "and", ("image", b64(png(OTHER))), "compare them")


def gen(w, model_id="m", **params):
    return w.generate(model_id=model_id, **{**GREEDY, **params}).wait()


@pytest.mark.parametrize("step", [5, None])
def test_greedy_tokens_equal_mlx_vlm(fam, step):
    """Also with prefill chunks that split the image (step 5)."""
    _, w, (expected, _) = fam
    assert len(expected) == GREEDY["max_tokens"]
    assert gen(w, messages=ask(PICTURE), prefill_step_size=step).tokens == expected


def test_two_images_equal_mlx_vlm(fam):
    _, w, (_, expected) = fam
    assert len(expected) == GREEDY["max_tokens"]
    assert gen(w, messages=two_pictures(), prefill_step_size=6).tokens == expected


@pytest.mark.parametrize("name", ["tiny-qwen3-5-vl-q4", "tiny-gemma4-vl-q4"])
def test_quantized_conversion_tokens_equal_mlx_vlm(worker, name):
    """4-bit bf16 conversions made by mlx-vlm's converter (embed_tokens quantized too)."""
    path = str(ensure_model(name))
    worker.load(path, model_id="q")
    try:
        rendered = worker.tokenize(model_id="q", messages=ask(PICTURE)).prompt
        [expected] = reference.run("vision", path, [
            {"prompt": rendered, "images": [b64(png(PICTURE))], "max_tokens": GREEDY["max_tokens"]}
        ])
        assert gen(worker, "q", messages=ask(PICTURE)).tokens == expected
    finally:
        worker.call("unload", {"model_id": "q"})


# Recurrent (DeltaNet) state can't be cut back to the shared prefix: the next
# turn reuses it only from a checkpoint at the end of the prompt, which the
# worker keeps once it has prompt-cache checkpoints (mlx_worker/checkpoints.py,
# issue 19's branch i19; with it merged this case passes).
NEEDS_PROMPT_CHECKPOINTS = {"tiny-qwen3-5-vl"}
HAS_CHECKPOINTS = importlib.util.find_spec("mlx_worker.cache.checkpoints") is not None


def test_second_turn_reuses_the_cache(fam, request):
    """Small prefill chunks: a sliding window (Gemma's, 16 tokens) the chat
    outgrows is reused from the last chunk boundary both runs share."""
    name, w, _ = fam
    if name in NEEDS_PROMPT_CHECKPOINTS and not HAS_CHECKPOINTS:
        request.applymarker(pytest.mark.xfail(strict=True, reason="needs prompt-end checkpoints (i19)"))
    msgs = ask(noise(6, size=(48, 40)))
    first = w.generate(model_id="m", messages=msgs, max_tokens=6, temperature=0, prefill_step_size=8).wait()
    turn = msgs + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And then?"}]
    params = dict(messages=turn, max_tokens=8, temperature=0, ignore_eos=True, prefill_step_size=8)
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
    rendered = w.tokenize(model_id="m", messages=msgs).tokens
    assert gen(w, tokens=rendered).tokens == a.tokens  # the plain-token path: the same positions


def test_string_content_stays_a_string(fam):
    _, w, _ = fam
    rendered = w.tokenize(model_id="m", messages=[
        {"role": "system", "content": "Be brief."}, *ask(PICTURE, "Hi")]).prompt
    assert "Be brief." in rendered and "'type'" not in rendered, rendered


def test_llava_images_are_refused_and_text_works(worker):
    path = str(ensure_model("tiny-llava"))
    with pytest.raises(AssertionError, match="ImagesKwargs"):  # mlx-vlm's own generate
        reference.run("vision", path, [{"prompt": "<image>Hi", "images": [b64(png(PICTURE))], "max_tokens": 2}])
    worker.load(path, model_id="llava")
    with pytest.raises(RpcError) as err:
        gen(worker, "llava", messages=ask(PICTURE))
    assert err.value.code == -32011
    assert "'llava'" in err.value.message and "every image" in err.value.message
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The sea is"}]
    assert len(gen(worker, "llava", messages=msgs).tokens) == GREEDY["max_tokens"]
    assert gen(worker, "llava", prompt="The sea is").tokens  # the worker still serves
    worker.call("unload", {"model_id": "llava"})


def test_hybrid_cache_file_reused_by_the_next_turn(worker, tmp_path):
    """Qwen3.5's DeltaNet layers keep mlx-vlm's recurrent cache: written by
    cache_save, read back by cache_load (into a fresh load), continued by the
    next turn."""
    path = str(ensure_model("tiny-qwen3-5-vl"))
    msgs = ask(noise(8, size=(48, 40)))
    file = str(tmp_path / "chat.safetensors")
    worker.load(path, model_id="hybrid")
    saved = worker.call("cache_save", {"model_id": "hybrid", "messages": msgs, "path": file})
    worker.call("unload", {"model_id": "hybrid"})
    worker.load(path, model_id="hybrid")
    assert worker.call("cache_load", {"model_id": "hybrid", "path": file})["tokens"] == saved["tokens"]
    turn = msgs + [{"role": "assistant", "content": "It is noise."}, {"role": "user", "content": "Sure?"}]
    cached = gen(worker, "hybrid", messages=turn, prompt_cache=True)
    cold = gen(worker, "hybrid", messages=turn)
    assert cached.usage.cached_tokens == saved["tokens"]
    assert cached.tokens == cold.tokens
    worker.call("unload", {"model_id": "hybrid"})
