#!/bin/sh
# Lock, build and publish the worker's layered runtime (runtime/venvstacks.toml) for the
# platform this runs on (a Mac app's layers are built on macOS arm64):
#
#   tools/build-runtime.sh             lock the layers that changed (runtime/requirements/),
#                                      build them (runtime/_build/) and write one archive per
#                                      layer, with its metadata, to runtime/dist/
#   tools/build-runtime.sh --relock    re-resolve every layer first (after an upgrade of locks/)
#
# venvstacks downloads the runtime layer's CPython from python-build-standalone's releases.
# Where that download is not reachable, unpack the matching release (the version in
# runtime/venvstacks.toml, `install_only_stripped` build) and point MLX_WORKER_PBS_PYTHON at
# the folder holding its bin/ and lib/: it is used instead of downloading.
set -eu
cd "$(dirname "$0")/.."

INDEX=https://pypi.org/simple
relock=
case "${1:-}" in
    --relock) relock=1 ;;
    "") ;;
    *) echo "usage: tools/build-runtime.sh [--relock]" >&2; exit 2 ;;
esac

tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools/venv"
# pdm (venvstacks' runtime downloader) fails to import with hishel 2 ("no attribute
# SyncSqliteStorage"); venvstacks' own `locked` extra names 1.4.0 but pip doesn't apply it.
"$tools/venv/bin/pip" install --quiet --isolated --index-url "$INDEX" "venvstacks==0.7.0" "hishel[httpx2]==1.4.0"

if [ -n "${MLX_WORKER_PBS_PYTHON:-}" ]; then
    # venvstacks skips its download when <build dir>/<implementation>@<version> holds bin/python3.
    runtime=$(sed -n 's/^python_implementation = "\(.*\)"/\1/p' runtime/venvstacks.toml)
    [ -x "$MLX_WORKER_PBS_PYTHON/bin/python3" ] || { echo "no bin/python3 in $MLX_WORKER_PBS_PYTHON" >&2; exit 1; }
    mkdir -p runtime/_build
    rm -rf "runtime/_build/$runtime"
    cp -a "$MLX_WORKER_PBS_PYTHON" "runtime/_build/$runtime"
fi

# `python -m venvstacks`, not its script: venvstacks names the runtime's python after the
# suffix of the interpreter it runs under, which is `.11` for a script run by python3.11.
venvstacks() { "$tools/venv/bin/python" -m venvstacks "$@"; }
[ -z "$relock" ] || venvstacks lock runtime/venvstacks.toml --reset-lock '*'
venvstacks build runtime/venvstacks.toml --lock-if-needed --publish --tag-outputs --output-dir dist
