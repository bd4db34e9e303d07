"""Distributed loads (issue 14): a model run by two ranks over MLX's ring
backend on loopback, the worker as rank 0 and its followers started by it.

Equivalences, not fixed outputs: every distributed generate is compared with
the same request on the same checkpoint loaded in the same worker as one
process. The faults are real: followers are killed and stopped by signal.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest

from harness import exited_within, pid_gone
from mlx_worker import protocol
from mlx_worker.client import RpcError

from conftest import cancel_after, logprob_entries, spawn, worker_env

TP = {"mode": "tensor", "ranks": 2}
PROMPT = "Tell me about the sea and the ships"


def _gone_within(pids, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if all(pid_gone(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def tp(tiny_model):
    """One worker: tiny-llama tensor-parallel over 2 ranks ("tp") and as one process ("one")."""
    w = spawn()
    loaded = w.load(tiny_model, model_id="tp", parallel=TP)
    w.load(tiny_model, model_id="one")
    w.tp_pids = loaded.parallel.pids
    yield w
    w.close()


def _both(w, **params):
    a = w.generate(model_id="tp", **params)
    a.wait()
    b = w.generate(model_id="one", **params).wait()
    return a, b


def test_load_reports_ranks_in_load_status_and_capabilities(tp):
    st = tp.status()
    model = next(m for m in st.models if m.model_id == "tp")
    assert model.parallel.mode == "tensor" and model.parallel.ranks == 2 and model.parallel.backend == "ring"
    assert model.parallel.layers == [4, 4]  # tensor parallel: every rank holds every layer, sharded
    assert model.parallel.pids[0] == tp.proc.pid and not pid_gone(model.parallel.pids[1])
    assert st.distributed.backends == ["ring"] and st.distributed.ranks == 2 and st.distributed.failure is None
    assert next(m for m in st.models if m.model_id == "one").parallel is None
    assert "ring" in tp.ready.capabilities.distributed.backends


def test_followers_never_hold_the_hosts_stdout(tp):
    host_stdout = f"pipe:[{os.fstat(tp.proc.stdout.fileno()).st_ino}]"
    follower = tp.tp_pids[1]
    fds = [os.readlink(f"/proc/{follower}/fd/{fd}") for fd in os.listdir(f"/proc/{follower}/fd")
           if os.path.exists(f"/proc/{follower}/fd/{fd}")]
    assert fds and host_stdout not in fds


def test_greedy_seeded_text_and_logprobs_equal_one_process(tp):
    stream, one = _both(tp, prompt=PROMPT, max_tokens=24, temperature=0, ignore_eos=True, top_logprobs=3)
    two = stream.result
    assert two.tokens == one.tokens and len(two.tokens) == 24
    assert two.text == one.text
    assert "".join(e.text for e in stream.events if isinstance(e, protocol.TokenEvent)) == two.text
    lp2 = logprob_entries(stream.events)
    assert [lp.token for lp in lp2] == two.tokens
    assert all(len(lp.top) == 3 and lp.top[0].token == lp.token for lp in lp2)  # greedy: the top one
    for seed in (1, 7):
        stream, one = _both(tp, prompt=PROMPT, max_tokens=24, temperature=0.9, top_p=0.95, seed=seed, ignore_eos=True)
        assert stream.result.tokens == one.tokens, seed


def test_stop_strings_and_constraints(tp):
    base = _both(tp, prompt=PROMPT, max_tokens=16, temperature=0, ignore_eos=True)[1]
    stop = base.text[5:8]
    stream, one = _both(tp, prompt=PROMPT, max_tokens=16, temperature=0, ignore_eos=True, stop=[stop])
    assert stream.result.stop_reason == one.stop_reason == "stop_string"
    assert stream.result.text == one.text and stream.result.tokens == one.tokens
    for constraint in ({"type": "regex", "pattern": "[a-z]{3,8}( [0-9]+)?"},
                       {"type": "choice", "options": ["north", "south", "east"]}):
        stream, one = _both(tp, prompt=PROMPT, max_tokens=12, temperature=0.8, seed=3, constraint=constraint)
        assert stream.result.tokens == one.tokens and stream.result.text == one.text
        assert stream.result.constraint_complete is True


def test_prompt_cache_reuse_equals_uncached(tp):
    first = tp.generate(model_id="tp", prompt=PROMPT, max_tokens=8, temperature=0, ignore_eos=True).wait()
    # The next turn: the first prompt and its answer, then more.
    follow = [*tp.tokenize(model_id="tp", text=PROMPT).tokens, *first.tokens, 40, 41, 42]
    again = tp.generate(model_id="tp", tokens=follow, max_tokens=10, temperature=0, ignore_eos=True).wait()
    assert again.usage.cached_tokens > 0
    # An edited prompt reuses a copy of the shared prefix.
    edited = tp.generate(model_id="tp", tokens=follow[:6] + [50, 51], max_tokens=10, temperature=0,
                         ignore_eos=True).wait()
    assert edited.usage.cached_tokens > 0
    for tokens, result in ((follow, again), (follow[:6] + [50, 51], edited)):
        ref = tp.generate(model_id="one", tokens=tokens, max_tokens=10, temperature=0, ignore_eos=True,
                          prompt_cache=False).wait()
        assert result.tokens == ref.tokens


def test_concurrent_requests_equal_their_solo_runs(tp):
    params = [dict(prompt=f"{PROMPT} {i}", max_tokens=10 + i, temperature=0.7, seed=i, ignore_eos=True)
              for i in range(3)]
    streams = [tp.generate(model_id="tp", **p) for p in params]
    results = [s.wait() for s in streams]
    for p, r in zip(params, results):
        assert r.tokens == tp.generate(model_id="one", **p).wait().tokens


def test_cancel_in_decode_and_prefill_keeps_ranks_in_step(tp):
    stream = tp.generate(model_id="tp", prompt=PROMPT, max_tokens=100000, temperature=0, ignore_eos=True)
    result = cancel_after(stream, 5)
    assert result.stop_reason == "cancelled" and len(result.tokens) >= 5
    long_prompt = [7, 8, 9, 10] * 300
    stream = tp.generate(model_id="tp", tokens=long_prompt, max_tokens=10, prefill_step_size=8)
    for event in stream:
        if isinstance(event, protocol.ProgressEvent) and event.processed >= 64:
            stream.cancel()
            break
    result = stream.wait()
    assert result.stop_reason == "cancelled" and result.tokens == []
    # Had a rank run one step more or less, this would hang or differ.
    stream, one = _both(tp, prompt=PROMPT + " again", max_tokens=12, temperature=0, ignore_eos=True,
                        prompt_cache=False)
    assert stream.result.tokens == one.tokens


def test_bad_parallel_params_are_refused_by_field(tp, tiny_model):
    for parallel, field in (({"mode": "tensor"}, "params.parallel"),
                            ({"mode": "tensor", "ranks": 2, "hosts": ["127.0.0.1:1", "127.0.0.1:2"]}, "params.parallel"),
                            ({"mode": "diagonal", "ranks": 2}, "params.parallel.mode"),
                            ({"mode": "tensor", "ranks": 1}, "params.parallel.ranks"),
                            ({"mode": "tensor", "ranks": 3}, "params.parallel.ranks"),  # 4 heads
                            ({"mode": "tensor", "ranks": 4}, "params.parallel.ranks"),  # 2 KV heads
                            # This worker's group is 2 local ranks: another group can't be set up.
                            ({"mode": "tensor", "hosts": ["127.0.0.1:1", "127.0.0.1:2"]}, "params.parallel"),
                            ({"mode": "pipeline", "ranks": 2}, "params.parallel.mode")):  # llama: no pipeline
        with pytest.raises(RpcError) as exc:
            tp.load(tiny_model, model_id="bad", parallel=parallel)
        assert exc.value.code == -32602 and exc.value.data["field"] == field, parallel
    with pytest.raises(RpcError) as exc:
        tp.load(tiny_model, model_id="bad", parallel=TP, max_kv_size=64)
    assert exc.value.data["field"] == "params.max_kv_size"
    with pytest.raises(RpcError) as exc:
        tp.call("cache_save", {"model_id": "tp", "path": "/tmp/x.safetensors", "prompt": "hi"})
    assert exc.value.code == -32602
    assert tp.generate(model_id="tp", prompt="hi", max_tokens=2).wait().stop_reason in ("max_tokens", "eos")


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_load_refused_after_its_shards_loaded_leaves_nothing_in_the_followers(tp, tiny_model, tmp_path):
    """A folder whose chat template doesn't parse is refused once every rank
    holds its shard: the followers drop theirs too (else each refused load
    leaks one shard per follower)."""
    import shutil

    folder = tmp_path / "bad-template"
    shutil.copytree(tiny_model, folder)
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")  # never closed
    follower = tp.tp_pids[1]
    tp.load(tiny_model, model_id="warm", parallel=TP)  # the first load's one-off costs, then gone
    tp.call("unload", {"model_id": "warm"})
    shard = sum(f.stat().st_size for f in folder.glob("*.safetensors")) // 2
    before = _rss_bytes(follower)
    for _ in range(8):
        with pytest.raises(RpcError) as exc:
            tp.load(str(folder), model_id="bad", parallel=TP)
        assert exc.value.code == -32002 and "chat template" in exc.value.message
    grown = _rss_bytes(follower) - before
    assert grown < 3 * shard, (grown, shard)
    # draft_model_id with parallel: refused up front, naming the field
    with pytest.raises(RpcError) as exc:
        tp.load(tiny_model, model_id="bad", parallel=TP, draft_model_id="one")
    assert exc.value.code == -32602 and exc.value.data["field"] == "params.draft_model_id"
    assert [m.model_id for m in tp.status().models] == ["tp", "one"]
    assert tp.generate(model_id="tp", prompt="hi", max_tokens=2).wait().stop_reason in ("max_tokens", "eos")


def test_unload_then_load_again_on_the_same_group(tp, tiny_model):
    """Runs last on this worker: the followers outlive an unload (MLX's group
    is set up once per process) and load the next distributed model."""
    tp.call("unload", {"model_id": "tp"})
    assert [m.model_id for m in tp.status().models] == ["one"]
    assert not pid_gone(tp.tp_pids[1])
    again = tp.load(tiny_model, model_id="tp2", parallel=TP)
    assert again.parallel.pids == tp.tp_pids
    a = tp.generate(model_id="tp2", prompt=PROMPT, max_tokens=12, temperature=0, ignore_eos=True).wait()
    b = tp.generate(model_id="one", prompt=PROMPT, max_tokens=12, temperature=0, ignore_eos=True).wait()
    assert a.tokens == b.tokens


@pytest.mark.heavy
def test_pipeline_parallel_equals_one_process():
    from fixtures.build import ensure_model

    path = str(ensure_model("tiny-qwen2"))
    w = spawn()
    try:
        loaded = w.load(path, model_id="pp", parallel={"mode": "pipeline", "ranks": 2})
        assert loaded.parallel.layers == [2, 2]  # each rank holds half the layers
        w.load(path, model_id="one")
        for params in (dict(temperature=0), dict(temperature=0.8, seed=5)):
            a = w.generate(model_id="pp", prompt=PROMPT, max_tokens=16, ignore_eos=True, **params).wait()
            b = w.generate(model_id="one", prompt=PROMPT, max_tokens=16, ignore_eos=True, **params).wait()
            assert a.tokens == b.tokens and a.text == b.text
    finally:
        w.close()


def _generate_until_tokens(w, model_id, n):
    stream = w.generate(model_id=model_id, prompt=PROMPT, max_tokens=100000, temperature=0, ignore_eos=True)
    it = iter(stream)
    seen = 0
    while seen < n:
        if isinstance(next(it), protocol.TokenEvent):
            seen += 1
    return stream, it


@pytest.mark.heavy
@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_a_follower_that_dies_or_hangs_ends_the_request_and_unloads_the_model(tiny_model, fault):
    w = spawn()
    try:
        pids = w.load(tiny_model, model_id="tp", parallel={**TP, "timeout_s": 2.0}).parallel.pids
        w.load(tiny_model, model_id="one")
        stream, it = _generate_until_tokens(w, "tp", 3)
        t0 = time.monotonic()
        os.kill(pids[1], signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        with pytest.raises(RpcError) as exc:
            for _ in it:
                pass
        elapsed = time.monotonic() - t0
        assert exc.value.code == -32011 and "rank 1" in exc.value.message
        assert ("signal 9" if fault == "kill" else "hung") in exc.value.message
        assert elapsed < (2.0 if fault == "kill" else 6.0)
        assert _gone_within(pids[1:], 5)
        st = w.status()
        assert [m.model_id for m in st.models] == ["one"]
        assert "rank 1" in st.distributed.failure
        assert w.generate(model_id="one", prompt="hi", max_tokens=3, temperature=0, ignore_eos=True).wait().tokens
        with pytest.raises(RpcError) as exc:  # MLX sets up one group per process
            w.load(tiny_model, model_id="tp2", parallel=TP)
        assert exc.value.code == -32002 and "restart" in exc.value.message
    finally:
        w.close()


@pytest.mark.heavy
def test_a_forward_left_waiting_in_mlx_ends_its_request_and_the_worker_exits(tiny_model, tmp_path):
    """Fault ``ring``: rank 1 is lost right before a forward, after one
    collective ran over the dead link. MLX's ring backend then leaves a
    collective waiting forever (its socket threads have exited), with the
    compute thread in it: the real hang behind this file's ``[hang]`` case
    once in CI, where the worker froze. Now the ring's watchdog answers that
    request (-32011) and the other model's stream, and the worker exits with
    code 70 (nothing frees the thread; MLX can't be trusted in-process)."""
    log = (tmp_path / "stderr").open("w+b")
    w = spawn(env=worker_env(MLX_WORKER_FAULTS="ring@6"), stderr=log)
    try:
        w.load(tiny_model, model_id="tp", parallel={**TP, "timeout_s": 2.0})
        w.load(tiny_model, model_id="one")
        other: dict = {}

        def drain():
            try:
                other["answer"] = w.generate(model_id="one", prompt="hi", max_tokens=100000, temperature=0,
                                             ignore_eos=True).wait()
            except RpcError as e:
                other["answer"] = e

        beside = threading.Thread(target=drain, daemon=True)
        beside.start()
        t0 = time.monotonic()
        with pytest.raises(RpcError) as exc:
            w.generate(model_id="tp", prompt=PROMPT, max_tokens=50, temperature=0, ignore_eos=True).wait()
        assert exc.value.code == -32011 and "rank 1 was killed by signal 9" in exc.value.message
        assert "code 70" in exc.value.message and time.monotonic() - t0 < 8.0
        assert exited_within(w.proc, 5) is not None and w.proc.returncode == 70
        beside.join(5)
        assert "answer" in other
    finally:
        w.close()
    log.seek(0)
    assert b"never returned from MLX's ring backend" in log.read()


@pytest.mark.heavy
@pytest.mark.parametrize("n", [1, 2])
def test_follow_up_turns_whose_follower_dies_get_their_error_and_the_worker_serves_on(tiny_model, n):
    """A follow-up turn leases a stored entry; when the group dies its
    abort trims that entry (a mirrored op). Every such request still gets
    its final error (n=2: the scheduler's fail-all path), and the worker
    keeps serving its other models."""
    w = spawn()
    try:
        pids = w.load(tiny_model, model_id="tp", parallel={**TP, "timeout_s": 2.0}).parallel.pids
        w.load(tiny_model, model_id="one")
        prompts = [PROMPT, "Another quite different prompt here"][:n]
        its = []
        for p in prompts:
            first = w.generate(model_id="tp", prompt=p, max_tokens=8, temperature=0, ignore_eos=True).wait()
            follow = [*w.tokenize(model_id="tp", text=p).tokens, *first.tokens, 40, 41, 42]
            its.append(iter(w.generate(model_id="tp", tokens=follow, max_tokens=100000, temperature=0,
                                       ignore_eos=True)))
        for it in its:
            seen = 0
            while seen < 3:
                if isinstance(next(it), protocol.TokenEvent):
                    seen += 1
        os.kill(pids[1], signal.SIGKILL)
        out: dict = {}

        def drain(i, it):
            try:
                for _ in it:
                    pass
                out[i] = "result"
            except RpcError as e:
                out[i] = e.code

        threads = [threading.Thread(target=drain, args=(i, it), daemon=True) for i, it in enumerate(its)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(15)
        assert out == {i: -32011 for i in range(n)}
        assert w.status().queue.running == []
        assert w.generate(model_id="one", prompt="hi", max_tokens=3, temperature=0, ignore_eos=True).wait().tokens
    finally:
        w.close()


@pytest.mark.heavy
def test_ranks_that_could_not_be_started_leave_no_ring_behind(tiny_model, tmp_path):
    """A follower whose command can't be run (no ssh on PATH for a remote
    host): the load fails at once, and the next distributed load starts a
    group of its own (not the half-started one, which would wait forever)."""
    w = spawn(env=worker_env(PATH=str(tmp_path)))  # no ssh
    try:
        t0 = time.monotonic()
        with pytest.raises(RpcError):
            w.load(tiny_model, model_id="far", parallel={"mode": "tensor", "hosts": [
                f"127.0.0.1:{_free_port()}", f"192.0.2.1:{_free_port()}"]})
        assert time.monotonic() - t0 < 10
        t0 = time.monotonic()
        pids = w.load(tiny_model, model_id="tp", parallel=TP).parallel.pids
        assert time.monotonic() - t0 < 60
        assert len(pids) == 2 and not pid_gone(pids[1])  # a real group, not the half-started one
        assert w.generate(model_id="tp", prompt="hi", max_tokens=2).wait().stop_reason in ("max_tokens", "eos")
    finally:
        w.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.heavy
def test_a_cancelled_distributed_load_that_then_fails_answers_cancelled(tiny_model, tmp_path):
    """`cancel` answered true guarantees -32012, even when the load (which
    can't stop while the ranks load) then fails on its own."""
    import shutil

    from test_load_progress import load_messages

    folder = tmp_path / "bad-template"
    shutil.copytree(tiny_model, folder)
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")  # never closed
    w = spawn()
    try:
        sent = {}

        def on_event(rid, e):
            if not sent:
                sent["cancelled"] = w.cancel(rid)

        _, messages = load_messages(w, {"model": str(folder), "model_id": "bad", "parallel": TP}, on_event)
        assert sent == {"cancelled": True}
        assert messages[-1]["error"]["code"] == -32012, messages[-1]
        assert w.load(tiny_model, model_id="tp", parallel=TP).parallel.ranks == 2
    finally:
        w.close()


@pytest.mark.heavy
def test_followers_exit_when_rank_0_is_killed(tiny_model):
    w = spawn()
    pids = w.load(tiny_model, model_id="tp", parallel=TP).parallel.pids
    _generate_until_tokens(w, "tp", 2)
    os.kill(pids[0], signal.SIGKILL)
    assert exited_within(w.proc, 5) is not None
    assert _gone_within(pids[1:], 5)
    w.close()


@pytest.mark.heavy
def test_shutdown_stops_every_rank(tiny_model):
    """With a host list (the multi-machine form; loopback here: rank 1 is started locally)."""
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    w = spawn()
    hosts = [f"127.0.0.1:{p}" for p in ports]
    pids = w.load(tiny_model, model_id="tp", parallel={"mode": "tensor", "hosts": hosts}).parallel.pids
    assert w.status().models[0].parallel.ranks == 2
    stream, _ = _generate_until_tokens(w, "tp", 2)
    w.call("shutdown", {})
    assert exited_within(w.proc, 5) is not None
    assert _gone_within(pids[1:], 3)
    w.close()
