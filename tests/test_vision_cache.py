"""Vision prompts and the prompt cache: image hashes in the cache key."""

from __future__ import annotations

import pytest

from conftest import spawn
from fixtures.build import ensure_model
from mlx_worker import protocol
from vision_images import b64, gradient, noise, png, user

IMAGE_TOKEN = 5
GREEDY = dict(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def cw():
    w = spawn()
    w.load(str(ensure_model("tiny-qwen2-vl")), model_id="vlm")
    yield w
    w.close()


def gen(w, **params):
    return w.generate(model_id="vlm", **{**GREEDY, **params}).wait()


def first_image_index(w, messages) -> int:
    return w.tokenize(model_id="vlm", messages=messages).tokens.index(IMAGE_TOKEN)


def conversation(image: str, answer: str, question: str = "And the colours?") -> list[dict]:
    return [*user("Describe this picture.", ("image", image)),
            {"role": "assistant", "content": answer},
            {"role": "user", "content": question}]


def test_second_turn_about_the_same_image_is_cached(cw):
    image = b64(png(noise(21)))
    first = gen(cw, messages=user("Describe this picture.", ("image", image)), max_tokens=8)
    answer = cw.detokenize(first.tokens, model_id="vlm")
    second = conversation(image, answer)
    cached = gen(cw, messages=second)
    cold = gen(cw, messages=second, prompt_cache=False)
    assert cold.usage.cached_tokens == 0
    # The whole first turn (image included) came from the cache.
    assert cached.usage.cached_tokens > first_image_index(cw, second) + 64
    assert cached.tokens == cold.tokens


def test_a_different_image_at_the_same_place_is_not_reused(cw):
    seen = conversation(b64(png(noise(22))), "A picture.")
    gen(cw, messages=seen)
    other = conversation(b64(png(gradient((224, 224)))), "A picture.")
    result = gen(cw, messages=other)
    assert result.usage.cached_tokens <= first_image_index(cw, other)
    assert result.tokens == gen(cw, messages=other, prompt_cache=False).tokens


def test_a_cancelled_image_prompt_resumes_inside_an_image(cw):
    """A cancel during prefill leaves the processed chunks cached; the retry
    starts from there, in the middle of an image's tokens."""
    inside = 0
    for attempt in range(4):
        msgs = user("Compare", *[("image", b64(png(noise(300 + 10 * attempt + i)))) for i in range(6)], "please")
        stream = cw.generate(model_id="vlm", messages=msgs, max_tokens=10, prefill_step_size=8)
        for event in stream:
            if isinstance(event, protocol.ProgressEvent) and event.processed >= 80:
                stream.cancel()
                break
        assert stream.wait().stop_reason == "cancelled"
        resumed = gen(cw, messages=msgs, prefill_step_size=8)
        tokens = cw.tokenize(model_id="vlm", messages=msgs).tokens
        start = resumed.usage.cached_tokens
        assert 80 <= start < len(tokens)
        assert resumed.tokens == gen(cw, messages=msgs, prompt_cache=False).tokens
        inside += tokens[start] == IMAGE_TOKEN and tokens[start - 1] == IMAGE_TOKEN
        if inside:
            break
    assert inside  # images are ~95% of this prompt: a chunk boundary falls inside one


def test_text_prompt_after_a_cached_image_prompt(cw):
    # Same leading tokens as an image chat, but no image: reuses only the text before it.
    msgs = user("Describe this picture.", ("image", b64(png(noise(23)))))
    gen(cw, messages=msgs)
    text_ids = cw.tokenize(model_id="vlm", messages=msgs).tokens
    as_tokens = gen(cw, tokens=text_ids)
    assert as_tokens.usage.cached_tokens <= text_ids.index(IMAGE_TOKEN)
    assert as_tokens.tokens == gen(cw, tokens=text_ids, prompt_cache=False).tokens


def test_an_image_prompt_cache_saved_to_a_file_and_loaded_elsewhere(cw, tmp_path):
    image = b64(png(noise(24)))
    head = user("Describe this picture.", ("image", image))
    path = str(tmp_path / "image-chat.safetensors")
    saved = cw.call("cache_save", {"model_id": "vlm", "messages": head, "path": path, "add_generation_prompt": False})
    assert saved["tokens"] > 64
    follow_up = head + [{"role": "user", "content": "What colours?"}]
    with spawn() as other:
        other.load(str(ensure_model("tiny-qwen2-vl")), model_id="vlm")
        assert other.call("cache_load", {"path": path})["tokens"] == saved["tokens"]
        warm = gen(other, messages=follow_up)
        assert warm.usage.cached_tokens == saved["tokens"]
        assert warm.tokens == gen(other, messages=follow_up, prompt_cache=False).tokens
        # Another image in the same place does not match the file's entry past the image.
        swapped = user("Describe this picture.", ("image", b64(png(noise(25))))) + follow_up[1:]
        assert gen(other, messages=swapped).usage.cached_tokens <= first_image_index(other, swapped)
