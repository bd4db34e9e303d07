"""`embed` through a real worker on tiny embedding models (fixtures/build.py):
a decoder pooled at the last token (Qwen3-Embedding-like) and an encoder
pooled by mean (BERT-like), both detected from their sentence-transformers
files. Vectors are compared with the reference libraries run on the same
folder in this process: mlx-embeddings' own model call (both fixtures) and,
for the decoder, mlx-lm's Qwen3 class (its hidden states, last token)."""

from __future__ import annotations

import math
import threading

import pytest

from conftest import spawn
from fixtures.build import ensure_model
from mlx_worker.client import RpcError

TEXTS = ["the model token server", "a", "cache prompt user assistant system message schema object array"]


@pytest.fixture(scope="module")
def ew():
    w = spawn()
    for name in ("tiny-qwen3-embed", "tiny-bert-embed"):
        w.load(str(ensure_model(name)), model_id=name)
    w.load(str(ensure_model("tiny-llama")), model_id="tiny")
    yield w
    w.close()


@pytest.fixture(scope="module")
def reference():
    """name -> (token ids of a text, mlx-embeddings' normalized vector, its unpooled hidden states)."""
    import mlx.core as mx
    from mlx_embeddings import load

    out = {}
    for name in ("tiny-qwen3-embed", "tiny-bert-embed"):
        model, tok = load(str(ensure_model(name)))

        def run(ids, model=model):
            res = model(mx.array([ids]))
            return res.text_embeds[0].tolist(), res.last_hidden_state[0].astype(mx.float32)

        out[name] = (tok, run)
    return out


def close(a, b, tol=1e-4) -> bool:
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) < tol


def norm(v) -> float:
    return math.sqrt(sum(x * x for x in v))


def ids_of(w, name, text) -> list[int]:
    return w.tokenize(model_id=name, text=text).tokens


def test_load_detects_embedding_models(ew):
    models = {m.model_id: m for m in ew.status().models}
    assert models["tiny-qwen3-embed"].kind == "embedding" and models["tiny-bert-embed"].kind == "embedding"
    assert models["tiny"].kind == "text"
    again = ew.load(str(ensure_model("tiny-qwen3-embed")), model_id="tiny-qwen3-embed")
    assert (again.kind, again.pooling, again.embedding_dimensions) == ("embedding", "last_token", 128)
    bert = ew.load(str(ensure_model("tiny-bert-embed")), model_id="tiny-bert-embed")
    assert (bert.pooling, bert.embedding_dimensions) == ("mean", 128)


@pytest.mark.parametrize("name", ["tiny-qwen3-embed", "tiny-bert-embed"])
def test_vectors_equal_mlx_embeddings(ew, reference, name):
    res = ew.embed(TEXTS, model_id=name)
    assert res.dimensions == 128 and len(res.embeddings) == len(TEXTS)
    tok, run = reference[name]
    for text, vec, count in zip(TEXTS, res.embeddings, res.tokens):
        ids = tok.encode(text)
        assert count == len(ids) == len(ids_of(ew, name, text))
        assert close(vec, run(ids)[0]), text
        assert abs(norm(vec) - 1) < 1e-5
    assert res.usage.prompt_tokens == sum(res.tokens)


def test_decoder_vectors_equal_mlx_lm_hidden_states_at_the_last_token(ew):
    import mlx.core as mx
    from mlx_lm import load

    model, tok = load(str(ensure_model("tiny-qwen3-embed")))
    raw = ew.embed(TEXTS, model_id="tiny-qwen3-embed", normalize=False)
    unit = ew.embed(TEXTS, model_id="tiny-qwen3-embed")
    for text, vec, vec_unit in zip(TEXTS, raw.embeddings, unit.embeddings):
        hidden = model.model(mx.array([tok.encode(text)]))[0, -1].astype(mx.float32).tolist()
        assert close(vec, hidden, 1e-3), text
        n = norm(hidden)
        assert close(vec_unit, [x / n for x in hidden])


def test_options_normalize_dimensions_token_ids(ew, reference):
    name = "tiny-bert-embed"
    tok, run = reference[name]
    ids = tok.encode(TEXTS[0])
    _, hidden = run(ids)
    mean = hidden.mean(axis=0).tolist()  # every position is real: the mean over all
    raw = ew.embed(TEXTS[0], model_id=name, normalize=False).embeddings[0]
    assert close(raw, mean) and abs(norm(raw) - 1) > 1e-3
    short = ew.embed(TEXTS[0], model_id=name, dimensions=16)
    head = mean[:16]
    assert short.dimensions == 16 and close(short.embeddings[0], [x / norm(head) for x in head])
    assert ew.embed(ids, model_id=name).embeddings == ew.embed(TEXTS[0], model_id=name).embeddings
    both = ew.embed([ids, TEXTS[1]], model_id=name)
    assert both.embeddings[0] == ew.embed(TEXTS[0], model_id=name).embeddings[0]


@pytest.mark.parametrize("name", ["tiny-qwen3-embed", "tiny-bert-embed"])
def test_batched_equals_each_alone(ew, name):
    texts = [" ".join(["model token"] * k) for k in (1, 7, 3, 20, 2)] * 3
    together = ew.embed(texts, model_id=name)
    for text, vec in zip(texts, together.embeddings):
        assert close(vec, ew.embed(text, model_id=name).embeddings[0])


def test_truncate(ew):
    name = "tiny-bert-embed"  # 512 positions
    long = list(range(10, 610))
    with pytest.raises(RpcError) as info:
        ew.embed(long, model_id=name)
    assert info.value.code == -32004
    cut = ew.embed(long, model_id=name, truncate=True)
    assert cut.tokens == [512] and cut.embeddings == ew.embed(long[:512], model_id=name).embeddings


def test_generate_and_embed_refuse_the_other_kind(ew):
    with pytest.raises(RpcError) as info:
        ew.generate(model_id="tiny-bert-embed", prompt="x", max_tokens=1).wait()
    assert info.value.code == -32602 and "embed" in info.value.message and info.value.data["field"] == "params.model_id"
    with pytest.raises(RpcError) as info:
        ew.embed("x", model_id="tiny")
    assert info.value.code == -32602 and "generation" in info.value.message
    bad = [({"input": []}, "params.input"), ({"input": "x", "dimensions": 129}, "params.dimensions"),
           ({"input": [1, "x"]}, "params.input[0]"), ({"input": [[5000]]}, "params.input[0]"),
           ({"input": "x", "dimensions": 0}, "params.dimensions")]
    for params, field in bad:
        with pytest.raises(RpcError) as info:
            ew.call("embed", {"model_id": "tiny-bert-embed", **params})
        assert info.value.code == -32602 and field in str(info.value.message) + str(info.value.data), (params, info.value)
    with pytest.raises(RpcError) as info:
        ew.load(str(ensure_model("tiny-bert-embed")), model_id="b2", embedding=False)
    assert info.value.data["field"] == "params.embedding"
    with pytest.raises(RpcError) as info:
        ew.load(str(ensure_model("tiny-qwen3-embed")), model_id="q2", kv_bits=8)
    assert info.value.data["field"] == "params.kv_bits"
    # The decoder folder loads for generation when asked, and tiny-llama as an embedding model.
    gen = ew.load(str(ensure_model("tiny-qwen3-embed")), model_id="q-gen", embedding=False)
    assert gen.kind == "text"
    assert ew.generate(model_id="q-gen", prompt="x", max_tokens=2, temperature=0, ignore_eos=True).wait().tokens
    emb = ew.load(str(ensure_model("tiny-llama")), model_id="llama-emb", embedding=True)
    assert (emb.kind, emb.pooling) == ("embedding", "last_token")
    assert ew.embed("x", model_id="llama-emb").dimensions == 128
    for mid in ("q-gen", "llama-emb"):
        ew.unload(mid)


def test_cancel_and_memory_admission(ew, tmp_path):
    texts = [" ".join(["model token server"] * 60)] * 400
    rid, inbox = ew.start("embed", {"model_id": "tiny-qwen3-embed", "input": texts})
    threading.Event().wait(0.3)
    assert ew.cancel(rid) is True
    msg = inbox.get(timeout=60)
    while "method" in msg:
        msg = inbox.get(timeout=60)
    assert msg["error"]["code"] == -32012
    assert ew.embed("still serving", model_id="tiny-qwen3-embed").dimensions == 128
    w = spawn()
    try:
        path = str(ensure_model("tiny-qwen3-embed"))
        size = sum(p.stat().st_size for p in (ensure_model("tiny-qwen3-embed")).glob("*.safetensors"))
        w.load(path, model_id="e", memory_limit=size + 4 * 1024 * 1024)
        assert w.embed(TEXTS, model_id="e").dimensions == 128  # small batches fit
        with pytest.raises(RpcError) as info:
            w.embed([[10 + i % 900 for i in range(4000)]] * 2, model_id="e")
        assert info.value.code == -32005
        assert w.embed("x", model_id="e").dimensions == 128
    finally:
        w.close()
