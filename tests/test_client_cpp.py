"""The C++ client (clients/cpp) built and tested against the real worker.

Configures and builds clients/cpp with CMake into clients/cpp/build/<variant> (gitignored,
reused when present), then runs its GoogleTest suite through ctest: once under
AddressSanitizer+UBSan, once under ThreadSanitizer (the plain build runs the README
example). A missing toolchain or library is a failure that says what to install, never
a skip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, spawn, worker_env
from fixtures.build import ensure_model

CPP = ROOT / "clients" / "cpp"
INSTALL_HINT = (
    "install the C++ toolchain: Debian/Ubuntu `apt-get install g++ cmake ninja-build "
    "nlohmann-json3-dev libgtest-dev`; macOS `brew install cmake ninja nlohmann-json googletest` "
    "(see clients/cpp/README.md)"
)
VARIANTS = {"plain": "", "asan": "address", "tsan": "thread"}
# The GoogleTest suite runs under the sanitizers only: the plain build (also
# Debug) checks nothing they don't, and its ctest run cost ~30 s of the suite.
# It is still built, for the README example.
CTEST_VARIANTS = ["asan", "tsan"]


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def explain(output: str) -> str:
    """What to install, when a build's output shows that something is missing."""
    missing = []
    if "No CMAKE_CXX_COMPILER could be found" in output:
        missing.append("a C++17 compiler (g++ / Xcode command line tools)")
    if "nlohmann_json" in output and "Could not find" in output:
        missing.append("nlohmann/json (nlohmann-json3-dev / brew nlohmann-json)")
    if "GTest" in output and "Could not find" in output:
        missing.append("GoogleTest (libgtest-dev / brew googletest)")
    for lib, deb in (("asan", "libasan8"), ("tsan", "libtsan2"), ("ubsan", "libubsan1")):
        if re.search(rf"cannot find (-l{lib}|lib{lib})", output):
            missing.append(f"the {lib} runtime ({deb}, normally installed with g++)")
    return ("missing: " + "; ".join(missing) + ". " if missing else "") + INSTALL_HINT


@pytest.fixture(scope="session")
def tools_model() -> str:
    return str(ensure_model("tiny-qwen3-tools"))


def build(variant: str, target: str) -> Path:
    if not shutil.which("cmake"):
        pytest.fail("cmake not found: " + INSTALL_HINT)
    build_dir = CPP / "build" / variant
    configure = ["cmake", "-S", str(CPP), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Debug",
                 f"-DMLX_WORKER_SANITIZE={VARIANTS[variant]}", f"-DMLX_WORKER_PYTHON={sys.executable}",
                 f"-DMLX_WORKER_REPO_ROOT={ROOT}",
                 f"-DMLX_WORKER_TOOLS_MODEL={ROOT / 'fixtures' / 'models' / 'tiny-qwen3-tools'}"]
    if not (build_dir / "CMakeCache.txt").exists() and shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    for cmd in (configure, ["cmake", "--build", str(build_dir), "-j", "2", "--target", target]):
        proc = run(cmd)
        if proc.returncode != 0:
            pytest.fail(f"`{' '.join(cmd)}` failed:\n{proc.stdout[-6000:]}\n{explain(proc.stdout)}")
    return build_dir


def test_generated_types_are_current():
    proc = run([sys.executable, str(CPP / "tools" / "gen_types.py"), "--check"])
    assert proc.returncode == 0, proc.stdout


@pytest.mark.timeout(900)
@pytest.mark.parametrize("variant", CTEST_VARIANTS)
def test_cpp_client(variant, tiny_model, tools_model):
    build_dir = build(variant, "mlx_worker_tests")
    env = dict(os.environ, MLX_WORKER_TEST_MODEL=tiny_model, MLX_WORKER_TOOLS_MODEL=tools_model,
               MLX_WORKER_EMBED_MODEL=str(ensure_model("tiny-bert-embed")))
    proc = run(["ctest", "--test-dir", str(build_dir), "--output-on-failure"], env=env)
    assert proc.returncode == 0, proc.stdout[-12000:]


def test_readme_example_runs(tiny_model):
    build_dir = build("plain", "mlx_worker_example")
    exe = build_dir / "mlx_worker_example"
    proc = run([str(exe), sys.executable, tiny_model], cwd=ROOT, env=worker_env(), timeout=120)
    assert proc.returncode == 0, proc.stdout
    assert re.search(r"\n\[(max_tokens|eos|stop_string), \d+ tokens\]\n$", proc.stdout), proc.stdout
    # The README shows this very program.
    readme = (CPP / "README.md").read_text(encoding="utf-8")
    assert (CPP / "examples" / "example.cpp").read_text(encoding="utf-8").strip() in readme


HOST_CMAKE = """cmake_minimum_required(VERSION 3.16)
project(host_app LANGUAGES CXX)
set(CMAKE_CXX_STANDARD 17)
find_package(mlx_worker_client 0.1 REQUIRED)
add_executable(host_app main.cpp)
target_link_libraries(host_app PRIVATE mlx_worker::client)
"""

HOST_MAIN = """#include <iostream>
#include "mlx_worker/client.hpp"

int main(int argc, char** argv) {  // host_app PYTHON MODEL_DIR
  mlx_worker::SpawnOptions options;
  options.python = argv[1];
  auto worker = mlx_worker::Client::spawn(options);
  auto loaded = worker->load(argv[2]);
  mlx_worker::GenerateParams params;
  params.prompt = "installed";
  params.max_tokens = 4;
  params.temperature = 0.0;
  auto result = worker->generate(params);
  std::cout << "vocab " << loaded.vocab_size << " tokens";
  for (auto token : result.tokens) std::cout << " " << token;
  std::cout << "\\n";
  return worker->close().exit_code.value_or(1);
}
"""


@pytest.mark.heavy  # a Release build of the client and of the host (~1.5 min here)
@pytest.mark.timeout(600)
def test_installed_client_builds_a_host_project(tmp_path, tiny_model):
    """`cmake --install` puts the library, headers and package config under a prefix; a CMake
    project outside the repository finds it with find_package and drives a real worker."""
    if not shutil.which("cmake"):
        pytest.fail("cmake not found: " + INSTALL_HINT)
    build_dir, prefix, host = tmp_path / "build", tmp_path / "prefix", tmp_path / "host"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    steps = [
        ["cmake", "-S", str(CPP), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
         "-DMLX_WORKER_BUILD_TESTS=OFF", f"-DCMAKE_INSTALL_PREFIX={prefix}", *generator],
        ["cmake", "--build", str(build_dir), "-j", "2", "--target", "mlx_worker_client"],
        ["cmake", "--install", str(build_dir)],
    ]
    for cmd in steps:
        proc = run(cmd)
        assert proc.returncode == 0, f"`{' '.join(cmd)}` failed:\n{proc.stdout[-6000:]}\n{explain(proc.stdout)}"
    installed = {p.relative_to(prefix).as_posix() for p in prefix.rglob("*") if p.is_file()}
    config_dir = next(p for p in installed if p.endswith("/mlx_worker_clientConfig.cmake")).rsplit("/", 1)[0]
    assert {"include/mlx_worker/client.hpp", "include/mlx_worker/protocol.hpp",
            f"{config_dir}/mlx_worker_clientConfigVersion.cmake", f"{config_dir}/mlx_worker_clientTargets.cmake"} <= installed
    for name in installed:  # nothing installed points back into the source or build tree
        if name.endswith(".cmake"):
            text = (prefix / name).read_text()
            assert str(CPP) not in text and str(build_dir) not in text, name

    host.mkdir()
    (host / "CMakeLists.txt").write_text(HOST_CMAKE)
    (host / "main.cpp").write_text(HOST_MAIN)
    for cmd in (["cmake", "-S", str(host), "-B", str(host / "build"), f"-DCMAKE_PREFIX_PATH={prefix}", *generator],
                ["cmake", "--build", str(host / "build")]):
        proc = run(cmd)
        assert proc.returncode == 0, f"`{' '.join(cmd)}` failed:\n{proc.stdout[-6000:]}"
    cache = (host / "build" / "CMakeCache.txt").read_text()
    assert f"mlx_worker_client_DIR:PATH={prefix}/{config_dir}" in cache

    proc = run([str(host / "build" / "host_app"), sys.executable, tiny_model], cwd=ROOT, env=worker_env(),
               timeout=120)
    assert proc.returncode == 0, proc.stdout
    # The same greedy tokens as the Python client gets from the same worker.
    with spawn() as worker:
        loaded = worker.load(tiny_model)
        expected = worker.generate(prompt="installed", max_tokens=4, temperature=0.0).wait()
    assert proc.stdout.splitlines()[-1] == (
        f"vocab {loaded.vocab_size} tokens " + " ".join(map(str, expected.tokens)))
