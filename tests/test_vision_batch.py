"""Vision requests in the decode batch (issue 22, item 3): rows of one vision
model, with or without images, decode in one forward pass per step, each at
its own positions (M-RoPE: offset + the row's rope delta), and each one's
tokens equal its solo run on the same worker.

That they shared a batch is read from the worker's debug log ("joins a decode
batch of N rows: [ids]", engine/batch.py): the line names the rows of one pass.
"""

from __future__ import annotations

import json
import re
import tempfile
import threading
import time

import pytest

from conftest import spawn
from fixtures.build import ensure_model
from mlx_worker import protocol
from vision_images import b64, gradient, noise, png, user

# One M-RoPE family and one plain-RoPE family run by default; the others are heavy.
FAMILIES = [
    "tiny-qwen2-vl",
    "tiny-idefics3",
    pytest.param("tiny-glm4v", marks=pytest.mark.heavy),
    pytest.param("tiny-qwen2-5-vl", marks=pytest.mark.heavy),
    pytest.param("tiny-qwen3-vl", marks=pytest.mark.heavy),
    pytest.param("tiny-smolvlm", marks=pytest.mark.heavy),
    pytest.param("tiny-mistral3-vl", marks=pytest.mark.heavy),
]
JOIN = re.compile(r"request (.+) joins a decode batch of (\d+) rows: (\[.*\])")


class LoggedWorker:
    """A worker at debug log level whose stderr the test reads."""

    def __init__(self, *args: str):
        self.err = tempfile.TemporaryFile()
        self.w = spawn("--log-level=debug", *args, stderr=self.err)

    def joins(self) -> list[tuple]:
        """(the request that joined, the batch's rows then), as logged."""
        self.err.seek(0)
        text = self.err.read().decode("utf-8", "replace")
        return [(json.loads(m.group(1)), json.loads(m.group(3))) for m in JOIN.finditer(text)]

    def batches(self) -> list[list]:
        """The rows of each decode batch a request joined."""
        return [rows for _, rows in self.joins()]

    def close(self):
        self.w.close()
        self.err.close()


@pytest.fixture(scope="module")
def lw():
    w = LoggedWorker()
    yield w
    w.close()


def chats(model_id: str, sampling: dict, max_tokens: int = 16) -> list[dict]:
    """Three image chats (different pictures and texts, so different lengths
    and rope deltas), a chat without an image and a plain prompt."""
    base = {"model_id": model_id, "max_tokens": max_tokens, "ignore_eos": True, "prompt_cache": False, **sampling}
    return [
        {**base, "messages": user("What is in the picture?", ("image", b64(png(noise(3, (48, 40))))))},
        {**base, "messages": user("Describe this one in a few more words, please.",
                                  ("image", b64(png(gradient((40, 56))))))},
        {**base, "messages": user("And here?", ("image", b64(png(noise(7, (64, 32))))))},
        {**base, "messages": user("no image in this chat")},
        {**base, "prompt": "plain text on a vision model"},
    ]


def together(w, params: list[dict]) -> list:
    streams = [w.generate(**p) for p in params]
    for s in streams:
        s.wait()
    return streams


def shared(lw: LoggedWorker, ids: list) -> int:
    """The most of ``ids`` seen in one decode batch."""
    return max((len(set(ids) & set(rows)) for rows in lw.batches()), default=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.9, "top_k": 40, "seed": 5}],
                         ids=["greedy", "seeded"])
def test_vision_rows_decode_in_one_batch_and_equal_solo(lw, family, sampling):
    lw.w.load(str(ensure_model(family)), model_id=family)
    try:
        params = chats(family, sampling)
        alone = [lw.w.generate(**p).wait() for p in params]
        streams = together(lw.w, params)
        for i, (a, s) in enumerate(zip(alone, streams)):
            assert s.result.tokens == a.tokens, (family, i)
            assert s.result.stop_reason == a.stop_reason == "max_tokens"
        image_ids = [s.id for s in streams[:3]]
        # Every image chat decoded in one pass with another image chat, and
        # at least three of the five rows were in one batch together.
        assert shared(lw, image_ids) >= 2, lw.batches()
        assert shared(lw, [s.id for s in streams]) >= 3, lw.batches()
    finally:
        lw.w.unload(family)


def test_cancel_of_a_vision_row_leaves_the_others_unchanged(lw):
    family = "tiny-qwen2-vl"
    lw.w.load(str(ensure_model(family)), model_id=family)
    try:
        params = chats(family, {"temperature": 0}, max_tokens=60)[:4]
        alone = [lw.w.generate(**p).wait() for p in params]
        streams = [lw.w.generate(**p) for p in params]
        victim = streams[1]
        waiters = [threading.Thread(target=s.wait) for s in streams]
        for t in waiters:
            t.start()
        deadline = time.monotonic() + 60
        while sum(isinstance(e, protocol.TokenEvent) for e in victim.events) < 4:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        assert lw.w.cancel(victim.id) is True
        for t in waiters:
            t.join()
        assert victim.result.stop_reason == "cancelled"
        assert victim.result.tokens == alone[1].tokens[: len(victim.result.tokens)]
        assert len(victim.result.tokens) < len(alone[1].tokens)
        for i in (0, 2, 3):
            assert streams[i].result.tokens == alone[i].tokens, i
        assert shared(lw, [victim.id, streams[0].id, streams[2].id]) >= 2, lw.batches()
    finally:
        lw.w.unload(family)


def test_a_paused_vision_row_resumes_into_the_batch(tmp_path):
    """Preemption: a lowered memory limit pauses the youngest image chat of
    the batch (KV to the disk tier's folder); once it fits again it resumes
    into the batch, and every chat's tokens equal its solo run."""
    family = "tiny-qwen2-vl"
    lw = LoggedWorker("--cache-dir", str(tmp_path / "kv"))
    w = lw.w
    try:
        w.load(str(ensure_model(family)), model_id=family, prompt_cache_entries=0)
        params = chats(family, {"temperature": 0}, max_tokens=300)[:3]
        alone = [w.generate(**p).wait().tokens for p in params]
        streams = [w.generate(**p) for p in params]
        seen = 0
        for event in streams[2]:  # all three decode: lower the limit under their KV
            if isinstance(event, protocol.TokenEvent):
                seen += 1
                if seen == 5:
                    w.set_limits(memory_limit=w.status().memory.active)
                    break
        paused, deadline = [], time.monotonic() + 10
        while time.monotonic() < deadline and not paused:
            paused = list((tmp_path / "kv").glob(".paused-*"))
            time.sleep(0.02)
        assert paused, "no image chat was paused"
        w.set_limits(memory_limit=1 << 40)  # room again: it resumes while the others still decode
        assert [s.wait().tokens for s in streams] == alone
        # a paused chat joined the batch twice: as it started and as it resumed
        joined = [rid for rid, rows in lw.joins() if len(rows) > 1]
        assert any(joined.count(s.id) == 2 for s in streams), lw.joins()
    finally:
        lw.close()


def test_a_family_that_cannot_batch_decodes_beside_the_batch(lw):
    """Gemma 3's sliding-window layers (RotatingKVCache) don't merge into a
    BatchKVCache: its image chats decode in groups of their own, beside a
    batch of another model's, and still equal their solo runs."""
    lw.w.load(str(ensure_model("tiny-qwen2-vl")), model_id="q")
    lw.w.load(str(ensure_model("tiny-gemma3-vl")), model_id="g")
    try:
        params = chats("q", {"temperature": 0}, max_tokens=24)[:2] + chats("g", {"temperature": 0}, max_tokens=24)[:2]
        alone = [lw.w.generate(**p).wait().tokens for p in params]
        streams = together(lw.w, params)
        assert [s.result.tokens for s in streams] == alone
        assert shared(lw, [s.id for s in streams[:2]]) == 2, lw.batches()
        assert shared(lw, [s.id for s in streams[2:]]) == 0, lw.batches()
    finally:
        lw.w.unload("q")
        lw.w.unload("g")


@pytest.mark.heavy
def test_llava_text_chats_decode_in_one_batch(lw):
    """LLaVA's processor refuses images with the installed libraries
    (test_vision_families.py): its text chats still share a batch."""
    lw.w.load(str(ensure_model("tiny-llava")), model_id="l")
    try:
        base = {"model_id": "l", "max_tokens": 16, "ignore_eos": True, "temperature": 0}
        params = [{**base, "messages": user(t)} for t in ("one", "a longer second chat", "three")]
        alone = [lw.w.generate(**p).wait().tokens for p in params]
        streams = together(lw.w, params)
        assert [s.result.tokens for s in streams] == alone
        assert shared(lw, [s.id for s in streams]) >= 2, lw.batches()
    finally:
        lw.w.unload("l")
