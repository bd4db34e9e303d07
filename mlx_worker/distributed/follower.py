"""A follower rank: ``python -m mlx_worker --role follower`` with MLX_RANK and
MLX_HOSTFILE set, started by rank 0.

It reads one operation per line on stdin (from rank 0, see mirror.py) and
does it; it writes heartbeats and load replies on its stdout (a pipe to rank
0). Any error ends it: a follower that can't do what rank 0 did can't stay
in step, and rank 0 then fails the group. It exits on stdin EOF (rank 0
stopped) and, through its parent-death signal, when rank 0 dies.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
import threading
import time

import msgspec

from .ring import HEARTBEAT_S

log = logging.getLogger("mlx_worker.follower")


class Follower:
    def __init__(self, out_fd: int):
        self.out_fd = out_fd
        self.lock = threading.Lock()
        self.models: dict[str, object] = {}
        self.caches: dict[int, list] = {}
        self.list_model: dict[int, str] = {}

    def write(self, data: bytes) -> None:
        with self.lock:
            os.write(self.out_fd, data)

    def heartbeat(self) -> None:
        while True:
            try:
                self.write(b"h\n")
            except OSError:
                os._exit(0)  # rank 0 is gone
            time.sleep(HEARTBEAT_S)

    def run(self) -> int:
        import mlx.core as mx

        threading.Thread(target=self.heartbeat, name="heartbeat", daemon=True).start()
        self.group = mx.distributed.init(strict=True, backend=os.environ.get("MLX_BACKEND", "ring"))
        log.info("rank %d of %d up", self.group.rank(), self.group.size())
        for line in sys.stdin.buffer:
            op = msgspec.json.decode(line)
            if op["op"] == "exit":
                break
            getattr(self, "op_" + op["op"])(op)
        return 0

    def op_load(self, op: dict) -> None:
        from mlx_lm.utils import sharded_load

        group = self.group
        try:
            model, _ = sharded_load(op["path"], pipeline_group=group if op["mode"] == "pipeline" else None,
                                    tensor_group=group if op["mode"] == "tensor" else None,
                                    tokenizer_config={"trust_remote_code": op["trust_remote_code"]},
                                    trust_remote_code=op["trust_remote_code"])
        except Exception as exc:
            self.write(msgspec.json.encode({"ok": False, "error": f"{type(exc).__name__}: {exc}"}) + b"\n")
            raise
        self.models[op["model"]] = model
        self.write(msgspec.json.encode({"ok": True, "layers": len(model.layers)}) + b"\n")

    def op_unload(self, op: dict) -> None:
        import mlx.core as mx

        self.models.pop(op["model"], None)
        for list_id in [k for k, m in self.list_model.items() if m == op["model"]]:
            self.caches.pop(list_id, None)
            self.list_model.pop(list_id, None)
        mx.clear_cache()

    def op_make(self, op: dict) -> None:
        from mlx_lm.models.cache import make_prompt_cache

        self.caches[op["list"]] = make_prompt_cache(self.models[op["model"]])
        self.list_model[op["list"]] = op["model"]

    def op_copy(self, op: dict) -> None:
        self.caches[op["dst"]] = copy.deepcopy(self.caches[op["src"]])
        self.list_model[op["dst"]] = self.list_model[op["src"]]

    def op_trim(self, op: dict) -> None:
        for c in self.caches[op["list"]]:
            c.trim(op["n"])

    def op_free(self, op: dict) -> None:
        for list_id in op["lists"]:
            self.caches.pop(list_id, None)
            self.list_model.pop(list_id, None)

    def op_forward(self, op: dict) -> None:
        import mlx.core as mx

        cache = self.caches[op["list"]] if op["list"] is not None else None
        out = self.models[op["model"]](mx.array(op["tokens"], dtype=mx.uint32), cache=cache)
        mx.eval(out)


def main(out_fd: int) -> int:
    return Follower(out_fd).run()
