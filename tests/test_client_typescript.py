"""The TypeScript client (clients/typescript): its node:test suite against a real worker.

Installs the client's dev dependencies with `npm ci` when node_modules is missing or
older than package-lock.json, then runs `npm test`. Fails, never skips, when Node.js
or npm is missing.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from fixtures.build import ensure_model

CLIENT = ROOT / "clients" / "typescript"
STAMP = CLIENT / "node_modules" / ".installed-from-lock"
INSTALL_HINT = (
    "Node.js >= 20 with npm is needed for the TypeScript client's tests. Debian/Ubuntu: "
    "`sudo apt-get install nodejs npm` where the distribution ships Node >= 20 (Debian 13, "
    "Ubuntu 24.10+), else NodeSource: `curl -fsSL https://deb.nodesource.com/setup_20.x | "
    "sudo -E bash - && sudo apt-get install -y nodejs`; macOS: `brew install node`."
)


def _tools() -> tuple[str, str]:
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.fail(f"{'node' if not node else 'npm'} not found on PATH. {INSTALL_HINT}", pytrace=False)
    version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()
    major = int(re.match(r"v(\d+)", version).group(1)) if re.match(r"v(\d+)", version) else 0
    if major < 20:
        pytest.fail(f"node {version} is too old. {INSTALL_HINT}", pytrace=False)
    return node, npm


def _ensure_installed(npm: str) -> None:
    lock_hash = hashlib.sha256((CLIENT / "package-lock.json").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text().strip() == lock_hash:
        return
    run = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=CLIENT, capture_output=True, text=True,
                         timeout=300)
    if run.returncode != 0:
        pytest.fail(f"`npm ci` in {CLIENT} failed (the npm registry must be reachable once):\n"
                    f"{run.stdout[-4000:]}\n{run.stderr[-4000:]}", pytrace=False)
    STAMP.write_text(lock_hash + "\n")


@pytest.mark.timeout(600)  # a first `npm ci` downloads the dev dependencies
def test_typescript_client(tiny_model):
    _, npm = _tools()
    _ensure_installed(npm)
    env = dict(os.environ, MLX_WORKER_PYTHON=sys.executable, MLX_WORKER_TINY_MODEL=tiny_model,
               MLX_WORKER_TOOLS_MODEL=str(ensure_model("tiny-qwen3-tools")),
               MLX_WORKER_EMBED_MODEL=str(ensure_model("tiny-bert-embed")))
    run = subprocess.run([npm, "test"], cwd=CLIENT, env=env, capture_output=True, text=True, timeout=280)
    output = run.stdout + run.stderr
    counts = {k: int(v) for k, v in re.findall(r"^# (pass|fail) (\d+)$", output, re.M)}
    failed = [line for line in output.splitlines() if re.match(r"\s*not ok ", line)]
    assert run.returncode == 0 and counts.get("fail") == 0, (
        f"`npm test` in {CLIENT} failed (exit {run.returncode}):\n" + "\n".join(failed) + "\n" + output[-8000:]
    )
    assert counts.get("pass", 0) >= 30, f"too few TypeScript tests ran:\n{output[-4000:]}"
