"""What the project's packaging makes of it: the wheel holds the package and nothing else at the top level
(the kernels live inside it), the dependency floors are the versions CI's oldest leg installs, and test
modules of one name in bench/ and tests/ run side by side in one pytest invocation."""

import re
import shutil
import subprocess
import sys
import zipfile

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.helpers import ROOT, run_pytest


def _leftovers(folder: str, names: list[str]) -> set[str]:
    """What builds and runs leave in a working tree, none of it part of the project."""
    top = {".git", "build", "dist", ".venv", "venv", ".benchmarks"} if folder == str(ROOT) else set()
    return {n for n in names if n in top or n == "__pycache__" or n.endswith(".egg-info")}


def test_the_wheel_holds_the_package_with_its_kernels_and_no_other_top_level_name(tmp_path):
    # built from a copy of the tree: a build/ folder left by an older layout would end up in the wheel
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=_leftovers)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "-q", "-w", str(tmp_path / "dist")],
                          cwd=src, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("opbench-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        entry_points = archive.read(info).decode()
    assert not [n for n in names if n.startswith("kernels/")]
    assert "opbench/kernels/matmul.py" in names
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"opbench"}  # no bench/, tests/
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "opbench").rglob("*.py")}
    assert sorted(modules - set(names)) == []  # every module, those of folders without __init__.py too
    assert re.search(r"^opbench = opbench\.cli:main$", entry_points, re.M)


def test_bench_and_tests_modules_of_one_name_run_in_one_invocation():
    proc = run_pytest("bench/test_gemm.py", "tests/test_gemm.py", "-v", "-p", "no:randomly", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"^bench/test_gemm\.py::test_gemm\[\S+-torch\] PASSED", proc.stdout, re.M)
    assert re.search(r"^tests/test_gemm\.py::test_flops_and_bytes_by_hand PASSED", proc.stdout, re.M)


def _requirements() -> dict[str, Requirement]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {Requirement(r).name: Requirement(r) for r in declared}


def _floor(requirement: Requirement) -> Version:
    (spec,) = requirement.specifier  # a floor and nothing else
    assert spec.operator == ">=", requirement
    return Version(spec.version)


def test_the_floors_are_the_versions_ci_tests():
    requirements = _requirements()
    pins = {}
    for line in (ROOT / ".ci" / "oldest.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.strip()] = Version(version.strip())
    assert {"pytest", "pytest-benchmark", "nvidia-ml-py", "numpy"} <= set(pins)
    for name, version in pins.items():
        assert name in requirements, f".ci/oldest.txt pins {name}, which pyproject.toml does not declare"
        assert _floor(requirements[name]) == version, f"{name}: pyproject.toml's floor is not {version}"
    # torch: both legs install the one CPU build .ci/run names, and that is the floor
    (ci_torch,) = set(re.findall(r"^\s*pip install torch==(\S+)", (ROOT / ".ci" / "run").read_text(), re.M))
    assert _floor(requirements["torch"]) == Version(ci_torch)
    untested = set(requirements) - set(pins) - {"torch", "flash-attn"}  # flash-attn needs a GPU to build
    assert untested == set(), f"floors no CI leg installs: {untested}"
