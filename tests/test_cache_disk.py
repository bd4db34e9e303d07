"""The prompt cache's disk tier: entries survive a restart, bad files are
ignored and removed, two workers share a folder."""

from __future__ import annotations

from pathlib import Path

from conftest import spawn

WORDS = "river stone light harbor window garden winter paper silver mountain letter orange".split()


def conversation(n_turns: int) -> list[dict]:
    chat = [{"role": "system", "content": "You are a patient assistant."}]
    for i in range(n_turns):
        words = " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(40))
        chat.append({"role": "user" if i % 2 == 0 else "assistant", "content": f"Note {i}: {words}."})
    return chat


def next_turn(chat: list[dict], answer: str) -> list[dict]:
    return chat + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And then?"}]


def files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("."))


def test_a_long_conversation_survives_a_restart(tiny_model, tmp_path):
    folder = tmp_path / "kv"
    chat = conversation(30)
    w = spawn("--cache-dir", str(folder))
    try:
        w.load(tiny_model, model_id="m")
        first = w.generate(model_id="m", messages=chat, max_tokens=8, temperature=0).wait()
        assert first.usage.prompt_tokens >= 3000
        assert w.status().disk_cache[0].writes == 0  # nothing written per turn
        turn2 = next_turn(chat, first.text)
        cold = w.generate(model_id="m", messages=turn2, max_tokens=12, temperature=0, prompt_cache=False).wait()
    finally:
        w.close()  # shutdown writes every entry
    assert len(files(folder)) == 1

    w = spawn("--cache-dir", str(folder))
    try:
        w.load(tiny_model, model_id="m")
        warm = w.generate(model_id="m", messages=turn2, max_tokens=12, temperature=0).wait()
        assert warm.usage.cached_tokens >= first.usage.prompt_tokens  # restored from disk
        assert warm.tokens == cold.tokens
        disk = w.status().disk_cache[0]
        assert disk.hits == 1 and disk.entries == 1 and disk.bytes > 0 and disk.folder == str(folder.resolve())
    finally:
        w.close()
    # the restored entry is not written again (its name is its content address);
    # the new turn's entry is (turn 1's answer tokens differ from its re-rendered text)
    assert len(files(folder)) == 2


def test_bad_files_are_ignored_and_removed(tiny_model, tmp_path):
    folder = tmp_path / "kv"
    chat = conversation(6)
    w = spawn("--cache-dir", str(folder))
    try:
        w.load(tiny_model, model_id="m")
        first = w.generate(model_id="m", messages=chat, max_tokens=4, temperature=0).wait()
        turn2 = next_turn(chat, first.text)
        cold = w.generate(model_id="m", messages=turn2, max_tokens=8, temperature=0, prompt_cache=False).wait()
    finally:
        w.close()
    [good] = files(folder)
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])  # truncated: its checksum no longer matches
    (folder / f"{good.name[:24]}-junk-0000000000000000.safetensors").write_bytes(b"not a cache")  # foreign
    other = folder / "someone-else.safetensors"  # another worker's namespace: left alone
    other.write_bytes(b"x")
    w = spawn("--cache-dir", str(folder))
    try:
        w.load(tiny_model, model_id="m")
        again = w.generate(model_id="m", messages=turn2, max_tokens=8, temperature=0).wait()
        assert again.usage.cached_tokens == 0 and again.tokens == cold.tokens
        assert w.status().disk_cache[0].removed == 2
    finally:
        w.close()
    assert other.exists() and not good.exists()


def test_two_workers_share_a_folder_and_ram_evictions_spill(tiny_model, tmp_path):
    folder = tmp_path / "kv"
    chats = [conversation(4 + i) for i in range(3)]
    a, b = spawn("--cache-dir", str(folder)), spawn("--cache-dir", str(folder))
    try:
        for w in (a, b):
            w.load(tiny_model, model_id="m", prompt_cache_entries=1)  # RAM holds one: the rest spill
        outs = {}
        for chat in chats:
            for name, w in (("a", a), ("b", b)):
                outs[name, len(chat)] = w.generate(model_id="m", messages=chat, max_tokens=4, temperature=0).wait()
        assert a.status().disk_cache[0].writes >= 1
        # a's first conversation comes back from disk (b may have written the same file: same bytes)
        turn = next_turn(chats[0], outs["a", len(chats[0])].text)
        back = a.generate(model_id="m", messages=turn, max_tokens=6, temperature=0).wait()
        cold = a.generate(model_id="m", messages=turn, max_tokens=6, temperature=0, prompt_cache=False).wait()
        assert back.usage.cached_tokens >= outs["a", len(chats[0])].usage.prompt_tokens
        assert back.tokens == cold.tokens
    finally:
        a.close()
        b.close()
    assert not list(folder.glob(".*tmp*"))  # no temporary file left behind


def test_load_option_and_unload_writes(tiny_model, tmp_path):
    import pytest

    from mlx_worker.client import RpcError

    folder = tmp_path / "per-model"
    w = spawn()
    try:
        not_a_dir = tmp_path / "file"
        not_a_dir.write_text("x")
        with pytest.raises(RpcError) as e:
            w.load(tiny_model, model_id="m", cache_dir=str(not_a_dir))
        assert e.value.code == -32602 and e.value.data["field"] == "params.cache_dir"
        w.load(tiny_model, model_id="m", cache_dir=str(folder), cache_dir_bytes=64 << 20)
        w.generate(model_id="m", messages=conversation(4), max_tokens=4, temperature=0).wait()
        assert files(folder) == [] and w.status().disk_cache[0].max_bytes == 64 << 20
        w.unload("m")  # every entry is written at unload
        assert len(files(folder)) == 1 and w.status().disk_cache[0].writes == 1
    finally:
        w.close()
