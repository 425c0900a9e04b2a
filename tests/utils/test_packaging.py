"""The install extras and requirements name only packages the code uses, and none of the three
that do not install as plain dependencies: ``apex`` (on the package index an unrelated
project; NVIDIA's apex builds from source), ``flash-attn`` 2.x (an hour-long CUDA source
build; the code uses flash-attn-4) and TransformerEngine (a torch extension built against the
local torch). README.md gives those two accelerators' own instructions."""

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
REFUSED = {"apex", "flash-attn", "transformer-engine"}
# Each optional GPU package and the module through which the code finds it.
GPU_MODULES = {"flash-attn-4": "flash_attn.cute", "liger-kernel": "liger_kernel"}


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def requirement_names(lines) -> set:
    return {canonicalize_name(Requirement(line).name) for line in lines}


def requirements_txt() -> list:
    lines = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    return [line for line in lines if line]


def is_refused(name: str) -> bool:
    # transformer-engine-cu12 and transformer-engine-torch are TE too; flash-attn-4 is not 2.x.
    return name in REFUSED or name.startswith("transformer-engine-")


def test_no_extra_or_requirement_names_apex_flash_attn_2_or_transformer_engine():
    project = pyproject()["project"]
    groups = {"dependencies": project["dependencies"], "requirements.txt": requirements_txt(),
              **{f"extra {k}": v for k, v in project["optional-dependencies"].items()}}
    for group, lines in groups.items():
        refused = sorted(n for n in requirement_names(lines) if is_refused(n))
        assert not refused, f"{group} lists {refused}"
    assert is_refused("transformer-engine-cu12") and not is_refused("flash-attn-4")


def test_gpu_extra_lists_only_packages_the_code_uses():
    gpu = requirement_names(pyproject()["project"]["optional-dependencies"]["gpu"])
    assert "flash-attn-4" in gpu
    sources = "\n".join(p.read_text() for p in (REPO / "megatron_longgen").rglob("*.py"))
    for name in gpu:
        assert name in GPU_MODULES, f"{name}: add the module the code uses it through"
        module = GPU_MODULES[name]
        assert re.search(rf"\b(import|from) {re.escape(module)}\b|[\"']{re.escape(module)}[\"']",
                         sources), f"the gpu extra lists {name}, but no code uses {module}"


def test_readme_points_to_te_and_apex_instructions():
    readme = (REPO / "README.md").read_text()
    assert '"transformer_engine[pytorch]"' in readme
    assert "github.com/NVIDIA/apex" in readme
