"""An image tower's work in pieces between decode steps (vision/tower_pieces.py),
through a real worker on small-qwen2-vl (a tower that takes ~1 s on a CPU).

The pieces are seen in the worker's debug log ("image tower: ..."); the image
request's tokens equal its run alone, whichever encoder path builds its
embeddings, and a cancel between pieces leaves everyone else as they were.
"""

from __future__ import annotations

import base64
import io
import json
import tempfile
import time

import mlx.core as mx
import numpy as np
import pytest
from mlx_vlm import load
from PIL import Image

from conftest import spawn, worker_env
from fixtures.build import ensure_model
from mlx_worker import protocol
from mlx_worker.vision import tower_pieces


def image_url(seed: int) -> str:
    pixels = (np.random.RandomState(seed).rand(448, 448, 3) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_request(seed: int) -> dict:
    content = [{"type": "image", "image": image_url(seed)}, {"type": "text", "text": "what is this?"}]
    return {"model_id": "v", "messages": [{"role": "user", "content": content}], "max_tokens": 6,
            "temperature": 0, "logprobs": True, "prompt_cache": False}


TEXT = {"model_id": "v", "prompt": "sea ship wind wave", "max_tokens": 40, "temperature": 0,
        "ignore_eos": True, "prompt_cache": False}


def first_token(stream) -> None:
    for event in stream:
        if isinstance(event, protocol.TokenEvent) and event.tokens:
            return


def towers(log) -> list[str]:
    log.seek(0)
    return [line for line in log.read().decode("utf-8", "replace").splitlines() if "image tower:" in line]


def worker(env: dict | None = None, **load):
    log = tempfile.TemporaryFile()
    w = spawn("--log-level", "debug", stderr=log, env={**worker_env(), **(env or {})})
    w.load(str(ensure_model("small-qwen2-vl")), model_id="v", **load)
    return w, log


@pytest.fixture(scope="module")
def uncached():
    w, log = worker(image_cache_bytes=0)  # every request runs the tower
    yield w, log
    w.close()


@pytest.mark.parametrize("encoder", ["qwen", "generic"])
def test_the_tower_runs_in_pieces_while_a_stream_decodes(encoder, uncached):
    if encoder == "generic":  # mlx-vlm's get_input_embeddings builds the graph
        w, log = worker({"MLX_WORKER_VISION_ENCODER": "generic"}, image_cache_bytes=0)
    else:
        w, log = uncached
    try:
        alone = w.generate(**image_request(1)).wait()
        text_alone = w.generate(**TEXT).wait()
        seen = len(towers(log))
        text = w.generate(**TEXT)
        first_token(text)
        together = w.generate(**image_request(1)).wait()
        assert text.wait().tokens == text_alone.tokens
        assert together.tokens == alone.tokens
        turns = [line for line in towers(log)[seen:] if "decoding: 1" in line]
        assert len(turns) >= 4, towers(log)  # 8 blocks, about one per turn beside the stream
    finally:
        if encoder == "generic":
            w.close()


def test_a_cancel_between_pieces_and_the_shared_features():
    """With the feature cache on: an image request cancelled while its tower
    runs; the same image again (its features were left half computed in the
    cache) takes over the remaining pieces, in turns beside a decoding
    stream, and gives the tokens of a cold run; the streams are untouched."""
    cold, _ = worker(image_cache_bytes=0)
    try:
        expected = cold.generate(**image_request(2)).wait().tokens
    finally:
        cold.close()
    w, log = worker()
    try:
        text_alone = w.generate(**TEXT).wait()
        text = w.generate(**TEXT)
        first_token(text)
        doomed = w.generate(**image_request(2))
        deadline = time.monotonic() + 60
        while not any("decoding: 1" in line for line in towers(log)):  # its first piece ran
            assert time.monotonic() < deadline, "no tower piece in the log"
            time.sleep(0.01)
        assert doomed.cancel() is True
        assert doomed.wait().stop_reason == "cancelled"
        assert text.wait().tokens == text_alone.tokens
        seen = len(towers(log))
        text = w.generate(**TEXT)
        first_token(text)
        assert w.generate(**image_request(2)).wait().tokens == expected
        # the cached, half-computed features' remaining pieces ran in turns beside the stream
        assert len([line for line in towers(log)[seen:] if "decoding: 1" in line]) >= 3, towers(log)
        assert text.wait().tokens == text_alone.tokens
    finally:
        w.close()


def test_tower_blocks_after_the_layer_the_projector_reads_are_not_pieces():
    """tiny-llava reads its tower's second-to-last hidden state
    (vision_feature_layer -2, 2 CLIP blocks): only the first block is a
    piece, so the last, whose output nothing reads, is never computed; the
    embeddings equal those built without pieces. In-process through
    mlx-vlm's own get_input_embeddings: the installed image processor fails
    on llava (the worker answers -32011), so the pixels are made here."""
    path = ensure_model("tiny-llava")
    config = json.loads((path / "config.json").read_text())
    vision = config["vision_config"]
    read = vision["num_hidden_layers"] + config["vision_feature_layer"] + 1
    vlm, _ = load(str(path))
    size = vision["image_size"]
    pixels = mx.array(np.random.RandomState(0).rand(1, 3, size, size).astype("float32"))
    image_token = config["image_token_index"]
    ids = mx.array([[1] + [image_token] * ((size // vision["patch_size"]) ** 2) + [5, 6]])
    plain = vlm.get_input_embeddings(ids, pixels).inputs_embeds
    mx.eval(plain)
    assert tower_pieces.mark(vlm) == read == 1
    with tower_pieces.recording() as pieces:
        embeds = vlm.get_input_embeddings(ids, pixels).inputs_embeds
    assert len(pieces.arrays) == read
    assert pieces.run(float("inf")) == read
    assert mx.array_equal(embeds, plain).item()
