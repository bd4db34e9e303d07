#!/bin/sh
# Installs what the host clients' tests need (C++ and TypeScript), once:
#   Debian/Ubuntu: g++ cmake ninja-build nlohmann-json3-dev libgtest-dev, and Node.js >= 20 with npm
#   macOS:         brew install cmake ninja nlohmann-json googletest node   (plus Xcode's command line tools)
# Packages already present are left alone, so a second run costs nothing.
set -eu

node_ok() {
    command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 &&
        [ "$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)" -ge 20 ]
}

if [ "$(uname -s)" = Darwin ]; then
    command -v brew >/dev/null 2>&1 || { echo "install Homebrew, then: brew install cmake ninja nlohmann-json googletest node" >&2; exit 1; }
    for p in cmake ninja nlohmann-json googletest; do brew list "$p" >/dev/null 2>&1 || brew install "$p"; done
    node_ok || brew install node
    exit 0
fi

command -v apt-get >/dev/null 2>&1 || {
    echo "no apt-get: install g++, cmake, ninja, nlohmann-json, googletest and Node.js >= 20 with npm yourself" >&2
    exit 0
}
missing=""
for p in g++ cmake ninja-build nlohmann-json3-dev libgtest-dev; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
node_ok || missing="$missing nodejs npm"
[ -z "$missing" ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update -q
# shellcheck disable=SC2086
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends $missing
node_ok || { echo "Node.js >= 20 is needed for the TypeScript client's tests (this system's is older)" >&2; exit 1; }
