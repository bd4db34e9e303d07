"""``python -m mlx_worker``: the worker process a host spawns.

Start-up order matters: stdout is protected first (so nothing but protocol
lines can reach it), the BLAS is bound before mlx.core loads, and ``ready``
is written before the heavy imports (mlx-lm, transformers), which then warm
up on the compute thread. Spec: protocol/README.md § Lifecycle, § Worker flags.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive number of bytes")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m mlx_worker",
        description="Newline-delimited JSON-RPC 2.0 on stdin/stdout; logs on stderr.",
    )
    p.add_argument("--log-level", default=os.environ.get("MLX_WORKER_LOG_LEVEL", "warning"),
                   choices=["debug", "info", "warning", "error"])
    p.add_argument("--max-line-bytes", type=int, default=8 * 1024 * 1024,
                   help="longest request line accepted (default 8 MiB)")
    p.add_argument("--max-pending", type=int, default=64, help="queued requests before `busy` errors")
    p.add_argument("--blas", default=None,
                   help="Linux CPU only: 'auto' (default), 'off', or a path to an OpenBLAS library")
    p.add_argument("--role", default="host", choices=["host", "follower"],
                   help="follower: a rank of a distributed model, started by the worker (rank 0) itself")
    p.add_argument("--memory-limit", type=_positive_int, default=None,
                   help="memory limit in bytes: MLX's allocator limit, and loads or requests estimated "
                        "to exceed it get an out-of-memory error (default: MLX's own limit)")
    p.add_argument("--prompt-cache-bytes", type=_positive_int, default=None,
                   help="one byte budget for every model's prompt-cache entries (default: a quarter of RAM)")
    p.add_argument("--cache-dir", default=None,
                   help="the prompt cache's disk tier: entries evicted from RAM, and all of them at unload "
                        "and shutdown, are written here and restored on a later prefix match (default: none)")
    p.add_argument("--cache-dir-bytes", type=_positive_int, default=None,
                   help="the disk tier's byte budget (default: 10 %% of the folder's free space, at most 16 GiB)")
    return p.parse_args(argv)


# PR_SET_PDEATHSIG fires when the *thread* that spawned the worker exits, not
# only its process: a host that spawns from a short-lived thread would kill
# its worker. So the signal gets its own handler, which stops the worker only
# once the parent process is really gone (we were re-parented).
PARENT_DEATH_SIGNAL = signal.SIGUSR1


def _die_with_parent(parent: int, on_death) -> None:
    """Linux: be told when the host dies, so no orphan is left behind."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        signal.signal(PARENT_DEATH_SIGNAL, lambda *_: on_death() if os.getppid() != parent else None)
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, PARENT_DEATH_SIGNAL)
    except Exception:
        pass


def main(argv=None) -> int:
    args = parse_args(argv)
    from .transport import protect_stdout

    proto_fd = protect_stdout()
    _configure_process(args)
    parent = os.getppid()
    stop = [lambda why: os._exit(0)]  # until the worker exists to stop cleanly
    _die_with_parent(parent, lambda: stop[0]("parent process died"))
    from . import blas

    blas_path = blas.bind(args.blas)  # before mlx.core loads
    if args.role == "follower":
        from .distributed.follower import main as follower_main

        os._exit(follower_main(proto_fd))
    from .distributed import ring
    from .server import Config, Worker

    _configure_worker(args, blas_path)
    config = Config(max_line_bytes=args.max_line_bytes, max_pending=args.max_pending,
                    blas=blas_path, memory_limit=args.memory_limit)
    worker = Worker(0, proto_fd, config)
    stop[0] = worker.stop
    signal.signal(signal.SIGTERM, lambda *_: worker.stop("SIGTERM"))
    signal.signal(signal.SIGINT, lambda *_: worker.stop("SIGINT"))
    if os.getppid() != parent:  # the host died before the death signal was armed
        return 0
    worker.notify("ready", _ready_event(args, blas_path))
    worker.start()
    code = worker.wait()
    ring.close()  # shutdown stops every rank
    logging.shutdown()
    # Skip interpreter teardown: MLX and tokenizer threads can make it slow,
    # and the host expects exit within about a second of EOF.
    os._exit(code)


def _configure_process(args: argparse.Namespace) -> None:
    """Logging (stderr only), offline Hugging Face, transformers' import table."""
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, args.log_level.upper()),
        format="mlx_worker %(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from . import import_cache

    import_cache.install()  # transformers' import table from disk (import_cache.py)


def _configure_worker(args: argparse.Namespace, blas_path) -> None:
    """The worker-wide limits the flags set: memory, the cache's disk tier and budget."""
    log = logging.getLogger("mlx_worker")
    log.info("BLAS: %s", blas_path or "the one mlx was built with")
    from . import memory
    from .cache import disk as cache_disk

    memory.set_worker_limit(args.memory_limit)
    cache_disk.configure(args.cache_dir, args.cache_dir_bytes)
    if args.prompt_cache_bytes:
        from .cache import budget as cache_budget

        cache_budget.set_max_bytes(args.prompt_cache_bytes)


def _ready_event(args: argparse.Namespace, blas_path):
    import mlx.core as mx

    from . import __version__, protocol
    from .distributed import ring

    return protocol.ReadyEvent(
        protocol_version=protocol.PROTOCOL_VERSION,
        worker_version=__version__,
        mlx_version=mx.__version__,
        device="gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu",
        capabilities=protocol.Capabilities(
            methods=sorted(protocol.METHODS),
            max_line_bytes=args.max_line_bytes,
            batch=False,
            constraints=["json_schema", "regex", "choice", "grammar"],
            constraint_engines=["llguidance", "outlines"],
            vision=True,
            blas=blas_path,
            distributed=protocol.DistributedCapabilities(backends=list(ring.BACKENDS)),
        ),
        pid=os.getpid(),
    )


if __name__ == "__main__":
    sys.exit(main())
