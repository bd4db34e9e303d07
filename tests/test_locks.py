"""locks/*.txt pin every package with hashes, agree with pyproject.toml's ranges on each
platform the project supports, and are what the README's commands and CI install."""

from __future__ import annotations

import re
import tomllib

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import ROOT

PLATFORMS = {
    "macOS arm64": {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64"},
    "Linux x86_64": {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"},
    "Linux aarch64": {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "aarch64"},
}
PYTHONS = ("3.10.16", "3.11.7", "3.12.9", "3.13.2")


def _environment(platform: str, python: str) -> dict:
    env = {"os_name": "posix", "platform_release": "", "platform_version": "", "platform_python_implementation":
           "CPython", "implementation_name": "cpython", "implementation_version": python,
           "python_version": python.rsplit(".", 1)[0], "python_full_version": python, "extra": ""}
    return {**env, **PLATFORMS[platform]}


def _lock(name: str) -> list[tuple[Requirement, list[str]]]:
    """(requirement, hashes) for each entry of a pip requirements file with hashes."""
    text = (ROOT / "locks" / name).read_text(encoding="utf-8")
    entries = []
    for block in re.split(r"\n(?=\S)", text):
        head = block.split("\\", 1)[0].strip()
        if not head or head.startswith("#"):
            continue
        entries.append((Requirement(head), re.findall(r"--hash=sha256:([0-9a-f]{64})", block)))
    return entries


def _installed(lock_name: str, platform: str, python: str) -> dict[str, Version]:
    env = _environment(platform, python)
    chosen = {}
    for req, _ in _lock(lock_name):
        if req.marker is None or req.marker.evaluate(env):
            name = canonicalize_name(req.name)
            assert name not in chosen, f"{lock_name}: two pins of {name} on {platform} / {python}"
            chosen[name] = Version(next(iter(req.specifier)).version)
    return chosen


def _declared(extras: tuple[str, ...]) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return reqs


@pytest.mark.parametrize("lock_name", ["requirements.txt", "requirements-cuda.txt"])
def test_every_package_is_pinned_with_hashes(lock_name):
    entries = _lock(lock_name)
    assert len(entries) > 50
    for req, hashes in entries:
        spec = list(req.specifier)
        assert len(spec) == 1 and spec[0].operator == "==", f"{req} is not pinned"
        assert hashes, f"{req} has no hash"


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("platform", list(PLATFORMS))
@pytest.mark.parametrize("lock_name, extras", [("requirements.txt", ("test",)),
                                                ("requirements-cuda.txt", ("test", "cuda"))])
def test_lock_satisfies_pyproject_on_each_platform(lock_name, extras, platform, python):
    if lock_name == "requirements-cuda.txt" and platform == "macOS arm64":
        pytest.skip("the CUDA lock is for Linux")
    installed = _installed(lock_name, platform, python)
    env = _environment(platform, python)
    for req in _declared(extras):
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        assert name in installed, f"{lock_name} has no {name} for {platform} / Python {python}"
        assert req.specifier.contains(installed[name], prereleases=True), (
            f"{lock_name} pins {name}=={installed[name]}, outside pyproject.toml's {req}")
    backend = {"macOS arm64": "mlx-metal"}.get(platform, "mlx-cuda-12" if "cuda" in lock_name else "mlx-cpu")
    assert backend in installed and installed[backend] == installed["mlx"], (platform, lock_name)
    others = {"mlx-metal", "mlx-cpu", "mlx-cuda-12", "mlx-cuda-13"} - {backend}
    # mlx-cpu and mlx-cuda-* both install mlx/lib/libmlx.so: exactly one backend per platform.
    assert not others & set(installed), f"{lock_name} installs {others & set(installed)} on {platform}"


def _readme_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    return [c for c in re.findall(r"```sh\n(.*?)\n```", readme, re.S) if "python3 -m venv" in c]


def test_readme_and_ci_install_from_the_lock():
    commands = _readme_commands()
    assert len(commands) == 2, commands  # the demo and the tests
    for command in commands:
        assert "pip install --require-hashes -r locks/requirements.txt && .venv/bin/pip install --no-deps -e ." \
            in command, command
    test_command = next(c for c in commands if c.endswith("-m pytest"))
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert test_command in ci.splitlines(), "`.ci/run` must run the README's test command as written"


def test_layered_runtime_pins_what_the_lock_pins():
    """runtime/venvstacks.toml and its venvstacks locks (Linux x86_64 here) hold the versions of
    locks/requirements.txt, so the shipped layers run what the tests ran."""
    locked = _installed("requirements.txt", "Linux x86_64", "3.11.7")
    spec = tomllib.loads((ROOT / "runtime" / "venvstacks.toml").read_text(encoding="utf-8"))
    layers = spec["frameworks"] + spec["applications"]
    for platform in ("macOS arm64", "Linux x86_64"):
        env = _environment(platform, "3.11.7")
        want = _installed("requirements.txt", platform, "3.11.7")
        for layer in layers:
            for line in layer["requirements"]:
                req = Requirement(line)
                if req.marker is None or req.marker.evaluate(env):
                    assert req.specifier.contains(want[canonicalize_name(req.name)]), (layer["name"], line, platform)
    layer_locks = sorted((ROOT / "runtime" / "requirements").glob("*/requirements-*-linux_x86_64.txt"))
    assert len(layer_locks) == 3
    for path in layer_locks:
        for line in path.read_text(encoding="utf-8").splitlines():
            m = re.match(r"([A-Za-z0-9_.\-]+)==(\S+)", line)
            if m:
                name = canonicalize_name(m.group(1))
                assert locked.get(name) == Version(m.group(2)), f"{path.name}: {line} but locks/ has {locked.get(name)}"
