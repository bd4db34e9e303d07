#!/bin/sh
# Resolve locks/*.txt (exact versions + hashes, from PyPI) from pyproject.toml's ranges.
#
#   tools/lock.sh              re-lock, keeping every pinned version that still fits
#                              (after a change to pyproject.toml's dependencies)
#   tools/lock.sh --upgrade    the newest versions within the ranges; then a fresh venv
#                              (.venv-upgrade) installs the new lock and runs the README's
#                              test command, and the versions to record in the README's
#                              compatibility matrix are printed
#   tools/lock.sh --upgrade tests/test_schema.py ...   the same, running only those tests
#
# A newer release outside a range (a new mlx minor) is adopted by widening the range in
# pyproject.toml first. After an upgrade, set the same versions in runtime/venvstacks.toml and
# relock the layers (tools/build-runtime.sh --relock); tests/test_locks.py fails until they
# agree. Needs python3 and PyPI; uv is installed into a throwaway venv.
set -eu
cd "$(dirname "$0")/.."

UV_VERSION=0.13.9          # the resolver's own version changes the lock's layout, not its pins
INDEX=https://pypi.org/simple
upgrade=
case "${1:-}" in
    --upgrade) upgrade=--upgrade; shift ;;
    "") ;;
    *) echo "usage: tools/lock.sh [--upgrade [PYTEST_ARGS...]]" >&2; exit 2 ;;
esac

tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools/venv"
"$tools/venv/bin/pip" install --quiet --isolated --index-url "$INDEX" "uv==$UV_VERSION"
uv="$tools/venv/bin/uv"

# --no-config and an explicit index: the lock must not depend on this machine's pip/uv setup.
compile() {
    out=$1; shift
    "$uv" pip compile --quiet pyproject.toml --universal --generate-hashes --no-config \
        --default-index "$INDEX" --custom-compile-command "tools/lock.sh" $upgrade -o "$out" "$@"
}
# macOS arm64 (Metal: mlx-metal) and Linux CPU (mlx-cpu); the test tools too, so the README's
# two commands and CI install one file.
compile locks/requirements.txt --extra test
# Linux with NVIDIA: mlx-cuda-12 instead of mlx-cpu (both install mlx/lib/libmlx.so, so the
# CPU one is left out; the project itself is installed with --no-deps).
compile locks/requirements-cuda.txt --extra test --extra cuda --no-emit-package mlx-cpu

[ -n "$upgrade" ] || exit 0

python3 -m venv --clear .venv-upgrade
.venv-upgrade/bin/pip install --require-hashes -r locks/requirements.txt
.venv-upgrade/bin/pip install --no-deps -e .
.venv-upgrade/bin/python -m pytest "$@"
echo "Tested (add a row to the README's compatibility matrix):"
.venv-upgrade/bin/python - <<'PY'
import platform
from importlib.metadata import version
names = ["mlx", "mlx-lm", "mlx-vlm", "transformers", "outlines", "llguidance", "msgspec"]
print(f"| {platform.system()} {platform.machine()}, {platform.python_version()} | "
      + " | ".join(version(n) for n in names) + " | (what ran, and its result) |")
PY
