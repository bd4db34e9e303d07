"""Images in the conversation, through the one generation loop (tiny-qwen2-vl)."""

from __future__ import annotations

import time

import pytest

from conftest import logprob_entries, spawn, worker_env
from fixtures.build import ensure_model
from mlx_worker import errors, protocol
from mlx_worker.client import RpcError
from vision_images import b64, data_url, gradient, jpg, noise, png, png_header_only, solid, user

IMAGE_TOKEN = 5  # <|image_pad|> in the fixture tokenizer
# The prompt cache is off here so every request runs the whole prompt (vision
# with the prompt cache: test_vision_cache.py).
GREEDY = dict(max_tokens=30, temperature=0, ignore_eos=True, prompt_cache=False)


@pytest.fixture(scope="session")
def vlm_path() -> str:
    return str(ensure_model("tiny-qwen2-vl"))


@pytest.fixture(scope="module")
def vw(vlm_path, tiny_model):
    """One worker: the VLM as "vlm", again with small limits as "strict", and a text model."""
    w = spawn()
    w.load(vlm_path, model_id="vlm")
    w.load(vlm_path, model_id="strict", max_images=2, max_image_pixels=200 * 200, max_image_bytes=60_000)
    w.load(tiny_model, model_id="text")
    yield w
    w.close()


def gen(w, model_id="vlm", **params):
    return w.generate(model_id=model_id, **{**GREEDY, **params}).wait()


def ask(image_source, text="What is in the picture?"):
    return user(text, ("image", image_source))


def test_load_says_vision(vw, vlm_path):
    again = vw.load(vlm_path, model_id="vlm")
    assert again.kind == "vision" and again.already_loaded
    assert {m.model_id: m.kind for m in vw.status().models} == {"vlm": "vision", "strict": "vision", "text": "text"}


def test_a_different_image_changes_the_tokens(vw):
    a = gen(vw, messages=ask(b64(png(noise(1)))))
    b = gen(vw, messages=ask(b64(png(noise(2)))))
    c = gen(vw, messages=ask(b64(png(gradient()))))
    assert len(a.tokens) == len(b.tokens) == len(c.tokens) == 30
    assert a.tokens != b.tokens and a.tokens != c.tokens and b.tokens != c.tokens
    assert a.tokens == gen(vw, messages=ask(b64(png(noise(1))))).tokens  # deterministic


def test_path_base64_and_data_url_give_the_same_tokens(vw, tmp_path):
    data = png(gradient((120, 80)))
    path = tmp_path / "picture.png"
    path.write_bytes(data)
    by_path = gen(vw, messages=ask(str(path)))
    assert by_path.tokens == gen(vw, messages=ask(b64(data))).tokens
    assert by_path.tokens == gen(vw, messages=ask(data_url(data))).tokens
    assert by_path.tokens == gen(vw, messages=ask(path.as_uri())).tokens  # file:// URL
    # JPEG: its base64 starts with "/", like a path.
    jpeg = jpg(gradient((120, 80)))
    assert b64(jpeg).startswith("/9j/")
    (tmp_path / "picture with spaces.jpg").write_bytes(jpeg)
    by_jpeg_path = gen(vw, messages=ask(str(tmp_path / "picture with spaces.jpg")))
    assert by_jpeg_path.tokens == gen(vw, messages=ask(b64(jpeg))).tokens
    assert by_jpeg_path.tokens == gen(vw, messages=ask(data_url(jpeg, "image/jpeg"))).tokens
    assert by_jpeg_path.tokens == gen(vw, messages=ask((tmp_path / "picture with spaces.jpg").as_uri())).tokens
    # Base64 with line breaks (MIME style) is the same image too.
    wrapped = "\n".join(b64(data)[i : i + 76] for i in range(0, len(b64(data)), 76))
    assert by_path.tokens == gen(vw, messages=ask(wrapped)).tokens


def test_a_file_changed_at_the_same_path_gives_different_tokens(vw, tmp_path):
    path = tmp_path / "same-name.png"
    path.write_bytes(png(noise(11)))
    first = gen(vw, messages=ask(str(path)))
    path.write_bytes(png(noise(12)))  # overwritten in place
    second = gen(vw, messages=ask(str(path)))
    assert first.tokens != second.tokens
    assert second.tokens == gen(vw, messages=ask(b64(png(noise(12))))).tokens


def test_tokenize_with_images(vw):
    msgs = user("one", ("image", b64(png(noise(3)))), "two", ("image", b64(png(solid((200, 30, 30), (300, 100))))))
    result = vw.tokenize(model_id="vlm", messages=msgs)
    # 224x224 -> 16x16 patches -> 64 tokens; 300x100 -> 8x22 patches -> 44 tokens.
    assert result.tokens.count(IMAGE_TOKEN) == 64 + 44
    assert result.count == len(result.tokens)
    assert result.prompt.count("<|image_pad|>") == 2  # the rendered text has one placeholder each
    assert result.prompt.startswith("<|im_start|>user\none<|vision_start|><|image_pad|><|vision_end|>two")
    used = gen(vw, messages=msgs, max_tokens=1)
    assert used.usage.prompt_tokens == result.count
    # Feeding the same ids as plain tokens is a different prompt: image features are missing.
    assert gen(vw, tokens=result.tokens).tokens != gen(vw, messages=msgs).tokens


def test_text_only_prompts_on_the_vision_model(vw):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about the sea."}]
    by_messages = gen(vw, messages=chat)
    ids = vw.tokenize(model_id="vlm", messages=chat).tokens
    assert IMAGE_TOKEN not in ids
    assert gen(vw, tokens=ids).tokens == by_messages.tokens
    assert gen(vw, prompt="Hello there", max_tokens=5).tokens == gen(vw, prompt="Hello there", max_tokens=5).tokens
    # Text parts only, as a list, renders like the string content.
    listed = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": [{"type": "text", "text": "Tell me about the sea."}]}]
    assert gen(vw, messages=listed).tokens == by_messages.tokens


def test_text_after_an_image_prompt_is_not_shifted(vw):
    # M-RoPE positions of an image prompt must not leak into the next request.
    before = gen(vw, prompt="The sea is", max_tokens=10)
    gen(vw, messages=ask(b64(png(noise(4)))))
    assert gen(vw, prompt="The sea is", max_tokens=10).tokens == before.tokens


def test_matches_mlx_vlm_generate_with_chunked_prefill(vw, vlm_path):
    from mlx_vlm import load, stream_generate

    a, b = noise(5), gradient((160, 96))
    msgs = [
        *user("What is this?", ("image", b64(png(a))), "and this", ("image", data_url(png(b)))),
        {"role": "assistant", "content": "Two pictures."},
        {"role": "user", "content": "Tell me more."},
    ]
    rendered = vw.tokenize(model_id="vlm", messages=msgs).prompt
    model, processor = load(vlm_path)
    expected = [r.token for r in stream_generate(model, processor, rendered, image=[a, b], max_tokens=40, temperature=0.0)][:40]
    assert len(expected) == 40
    for step in (7, 64, 2048):  # chunks that split images, and one pass
        got = gen(vw, messages=msgs, max_tokens=40, prefill_step_size=step)
        assert got.tokens == expected, step


def test_whole_prompt_encoder_gives_the_same_tokens(vw, vlm_path):
    """The generic path (mlx-vlm's get_input_embeddings over the whole prompt)
    and the per-image cached path agree."""
    msgs = user("Look:", ("image", b64(png(noise(6)))), "and", ("image", b64(png(gradient()))), "?")
    with spawn(env=worker_env(MLX_WORKER_VISION_ENCODER="generic")) as generic:
        generic.load(vlm_path, model_id="vlm")
        expected = gen(vw, messages=msgs, prefill_step_size=16)
        assert gen(generic, messages=msgs, prefill_step_size=16).tokens == expected.tokens
        assert generic.tokenize(model_id="vlm", messages=msgs).tokens == vw.tokenize(model_id="vlm", messages=msgs).tokens


def test_image_cache_off_gives_the_same_tokens(vw, vlm_path):
    vw.load(vlm_path, model_id="nocache", image_cache_bytes=0)
    try:
        msgs = ask(b64(png(noise(7))))
        assert gen(vw, "nocache", messages=msgs).tokens == gen(vw, messages=msgs).tokens
        assert gen(vw, "nocache", messages=msgs).tokens == gen(vw, messages=msgs).tokens
    finally:
        vw.unload("nocache")


def test_streaming_sampling_and_stops_work_with_an_image(vw):
    msgs = ask(b64(png(noise(8))))
    stream = vw.generate(model_id="vlm", messages=msgs, max_tokens=20, temperature=0.8, seed=42, top_logprobs=2,
                         prompt_cache=False)
    events = list(stream)
    result = stream.result
    token_events = [e for e in events if isinstance(e, protocol.TokenEvent)]
    assert "".join(e.text for e in token_events) == result.text
    assert [t for e in token_events for t in e.tokens] == result.tokens
    assert all(len(lp.top) == 2 for lp in logprob_entries(token_events))
    again = gen(vw, messages=msgs, max_tokens=20, temperature=0.8, seed=42, ignore_eos=False)
    assert again.tokens == result.tokens  # seeded sampling is reproducible
    progress = [e for e in events if isinstance(e, protocol.ProgressEvent)]
    assert progress[-1].processed == progress[-1].total == result.usage.prompt_tokens
    # A stop token taken from the greedy output ends generation there.
    greedy = gen(vw, messages=msgs)
    stop_at = greedy.tokens[5]
    stopped = gen(vw, messages=msgs, stop_token_ids=[stop_at])
    assert stopped.stop_reason == "eos" and stopped.stop_token == stop_at
    assert stopped.tokens == greedy.tokens[: greedy.tokens.index(stop_at)]


def test_cancel_during_the_image_prompt(vw):
    images = [("image", b64(png(noise(100 + i)))) for i in range(6)]
    msgs = user("Compare these:", *images)
    stream = vw.generate(model_id="vlm", messages=msgs, max_tokens=10, prefill_step_size=2, prompt_cache=False)
    cancelled_at = None
    for event in stream:
        if isinstance(event, protocol.ProgressEvent) and event.processed >= 8 and cancelled_at is None:
            cancelled_at = time.perf_counter()
            assert stream.cancel() is True
        assert not isinstance(event, protocol.TokenEvent)
    result = stream.result
    assert result.stop_reason == "cancelled" and result.tokens == []
    assert time.perf_counter() - cancelled_at < 5
    progress = [e for e in stream.events if isinstance(e, protocol.ProgressEvent)]
    assert progress[-1].processed < progress[-1].total
    assert len(gen(vw, messages=ask(b64(png(noise(1)))), max_tokens=3).tokens) == 3


# ------------------------------------------------------------- bad images


def _bad_cases(tmp):
    (tmp / "notes.txt").write_text("hello, not a picture")
    good = png(gradient((64, 64)))
    (tmp / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp / "folder.png").mkdir(exist_ok=True)
    return {
        "missing file": (str(tmp / "nope.png"), "not_found"),
        "missing file, no extension": ("/tmp/no/such/image", "not_found"),
        "folder": (str(tmp / "folder.png"), "unreadable"),
        "relative path": ("images/cat.png", "relative_path"),
        "relative dot path": ("./cat.png", "relative_path"),
        "text file": (str(tmp / "notes.txt"), "not_an_image"),
        "truncated png": (str(tmp / "truncated.png"), "corrupt"),
        "corrupt bytes": (b64(good[:40] + bytes(range(256)) * 4), "corrupt"),
        "not an image (base64)": (b64(b"just some text, definitely not pixels"), "not_an_image"),
        "not base64": ("%%%% not base64 %%%%", "unsupported_source"),
        "url": ("https://example.com/cat.png", "unsupported_source"),
        "data url without base64": ("data:image/png,abc", "not_base64"),
        "empty": ("", "empty"),
        "decompression bomb header": (b64(png_header_only(100_000, 100_000)), "too_many_pixels"),
    }


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bad-images")


BAD_CASES = [
    "missing file", "missing file, no extension", "folder", "relative path", "relative dot path", "text file", "truncated png",
    "corrupt bytes", "not an image (base64)", "not base64", "url", "data url without base64", "empty",
    "decompression bomb header",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_image_is_an_error_and_the_worker_keeps_serving(vw, bad_dir, case):
    source, reason = _bad_cases(bad_dir)[case]
    msgs = [{"role": "system", "content": "hi"}, *user("Look", ("image", b64(png(solid((1, 2, 3))))), ("image", source))]
    with pytest.raises(RpcError) as info:
        gen(vw, messages=msgs)
    err = info.value
    assert err.code == errors.IMAGE_INVALID, err
    assert err.data["field"] == "params.messages[1].content[2].image"
    assert err.data["reason"] == reason, err
    with pytest.raises(RpcError) as info:
        vw.tokenize(model_id="vlm", messages=msgs)
    assert info.value.code == errors.IMAGE_INVALID and info.value.data["reason"] == reason
    assert len(gen(vw, messages=ask(b64(png(noise(1)))), max_tokens=2).tokens) == 2


def test_limits_set_at_load(vw, tmp_path):
    def error_of(messages, model_id="strict"):
        with pytest.raises(RpcError) as info:
            gen(vw, model_id, messages=messages)
        assert info.value.code == errors.IMAGE_INVALID
        return info.value.data

    # More pixels than max_image_pixels (200x200): a real image, and only its header is read.
    big = png(solid((9, 9, 9), (300, 300)))
    assert error_of(ask(b64(big))) == {"field": "params.messages[0].content[1].image", "reason": "too_many_pixels"}
    assert len(gen(vw, messages=ask(b64(big)), max_tokens=2).tokens) == 2  # fine under the default limit
    # More bytes than max_image_bytes (60,000): by path, base64 and data URL.
    heavy = png(noise(9, (190, 190)))
    assert len(heavy) > 60_000
    path = tmp_path / "heavy.png"
    path.write_bytes(heavy)
    for source in (str(path), b64(heavy), data_url(heavy)):
        assert error_of(ask(source))["reason"] == "too_many_bytes"
    # More images than max_images (2): the third one is named.
    three = user(*[("image", b64(png(solid((i, i, i))))) for i in range(3)])
    assert error_of(three) == {"field": "params.messages[0].content[2]", "reason": "too_many_images"}
    two = user(*[("image", b64(png(solid((i, i, i))))) for i in range(2)])
    assert len(gen(vw, "strict", messages=two, max_tokens=2).tokens) == 2
    # Limits must be positive.
    with pytest.raises(RpcError) as info:
        vw.load(str(ensure_model("tiny-qwen2-vl")), model_id="zero", max_images=0)
    assert info.value.code == errors.INVALID_PARAMS and info.value.data["field"] == "params.max_images"


def test_image_sent_to_a_text_model(vw):
    with pytest.raises(RpcError) as info:
        gen(vw, "text", messages=ask(b64(png(noise(1)))))
    assert info.value.code == errors.IMAGE_INVALID
    assert info.value.data == {"field": "params.messages[0].content", "reason": "text_model"}
    assert len(gen(vw, "text", prompt="still here", max_tokens=2).tokens) == 2


def test_image_where_the_model_takes_none(vw):
    msgs = [{"role": "assistant", "content": [{"type": "image", "image": b64(png(noise(1)))}]},
            {"role": "user", "content": "hi"}]
    with pytest.raises(RpcError) as info:
        gen(vw, messages=msgs)
    assert info.value.code == errors.IMAGE_INVALID
    assert info.value.data == {"field": "params.messages[0].content[0]", "reason": "wrong_role"}


def test_image_token_typed_in_the_text(vw):
    msgs = user("sneaky <|image_pad|> text", ("image", b64(png(noise(1)))))
    with pytest.raises(RpcError) as info:
        gen(vw, messages=msgs)
    assert info.value.code == errors.IMAGE_INVALID
    assert info.value.data["reason"] == "placeholder_mismatch"
