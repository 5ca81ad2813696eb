"""Saved runs kept per card: the plugin points pytest-benchmark's default storage at
`.benchmarks/<card>`; --benchmark-save, --benchmark-autosave and --benchmark-compare work as users
know them inside it; a storage the user names is used as given. And `opbench history` over the
saved smoke runs of this machine."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from opbench.measure import storage
from opbench.measure.storage import DEFAULT_STORAGE, card_folder, card_of_run, card_slug, use_card_storage

ROOT = Path(__file__).resolve().parent.parent


def test_card_slugs():
    assert card_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert card_slug("NVIDIA A100-SXM4-80GB") == "nvidia-a100-sxm4-80gb"
    assert card_slug("Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.00GHz") == "intel-xeon-platinum-8480"
    assert card_folder("AMD EPYC 9654 96-Core Processor", "cpu") == "cpu-amd-epyc-9654-96-core"
    assert card_folder("NVIDIA H200", "cuda") == "nvidia-h200"


def test_card_of_a_saved_run_is_the_gpu_it_used():
    info = {"cpu": {"brand_raw": "AMD EPYC"},
            "gpu": {"devices": [{"name": "NVIDIA A100-SXM4-80GB", "uuid": "GPU-a"},
                                {"name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-b"}], "used_uuid": "GPU-b"}}
    assert card_of_run(info, "cuda") == "NVIDIA H100 80GB HBM3"
    assert card_of_run(info, "cpu") == "AMD EPYC"  # a CPU run on a GPU machine is the CPU's


def _config(args=(), storage=DEFAULT_STORAGE, save=None, autosave=None, compare=(), addopts=()):
    option = SimpleNamespace(benchmark_storage=storage, benchmark_save=save, benchmark_autosave=autosave,
                             benchmark_compare=list(compare))
    return SimpleNamespace(option=option, invocation_params=SimpleNamespace(args=tuple(args)),
                           getini=lambda name: list(addopts))


def test_default_storage_moves_to_the_cards_folder_only_when_the_run_saves(monkeypatch):
    monkeypatch.setattr(storage, "this_card", lambda device: "NVIDIA H100 80GB HBM3")
    monkeypatch.delenv("PYTEST_ADDOPTS", raising=False)
    config = _config(save="baseline")
    assert use_card_storage(config, "cuda") == "file://./.benchmarks/nvidia-h100-80gb-hbm3"
    assert config.option.benchmark_storage == "file://./.benchmarks/nvidia-h100-80gb-hbm3"
    assert use_card_storage(_config(autosave="tag"), "cuda") is not None
    assert use_card_storage(_config(compare=[True]), "cuda") is not None  # compare reads the card's runs
    assert use_card_storage(_config(), "cuda") is None  # neither saved nor compared: left alone
    # a storage the user names, by value or by option (even the default's own value), is used as given
    for config in (_config(save="x", storage="file://runs"),
                   _config(save="x", args=("--benchmark-storage=file://./.benchmarks",)),
                   _config(save="x", addopts=("--benchmark-storage", "file://./.benchmarks"))):
        assert use_card_storage(config, "cuda") is None
    monkeypatch.setenv("PYTEST_ADDOPTS", "--benchmark-storage=file://./.benchmarks")
    assert use_card_storage(_config(save="x"), "cuda") is None


def test_pytest_benchmark_default_storage_is_what_the_plugin_expects():
    """The plugin recognises the default by its value; this fails if pytest-benchmark changes it."""
    from pytest_benchmark.plugin import add_global_options
    seen = {}
    add_global_options(lambda name, *a, **kw: seen.setdefault(name, kw))
    assert seen["--benchmark-storage"]["default"] == DEFAULT_STORAGE


def _pytest(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("TRITON_INTERPRET", None)
    env.pop("PYTEST_ADDOPTS", None)
    return subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "bench"), "-q", "-p", "no:cacheprovider",
                           *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)


def test_saved_smoke_runs_land_under_the_card_and_history_exits_0(tmp_path):
    """Three saved smoke runs from a working folder with no storage option: each under
    .benchmarks/<card>/<machine id>/; --benchmark-save and --benchmark-compare inside the card's folder;
    `opbench history` over them prints per-case verdicts and exits 0 (nothing was changed)."""
    select = ("-k", "gemm and fp32")
    first = _pytest(tmp_path, *select, "--benchmark-autosave")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = _pytest(tmp_path, *select, "--benchmark-save=smoke", "--benchmark-compare")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "Comparing against benchmarks from:" in second.stdout + second.stderr
    third = _pytest(tmp_path, *select, "--benchmark-autosave")
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]

    saved = sorted((tmp_path / ".benchmarks").rglob("*.json"))
    assert [p.name[:5] for p in saved] == ["0001_", "0002_", "0003_"]
    assert saved[1].name == "0002_smoke.json"
    cards = {p.relative_to(tmp_path / ".benchmarks").parts[0] for p in saved}
    info = json.loads(saved[0].read_text())["machine_info"]
    assert cards == {card_folder(card_of_run(info, "cpu"), "cpu")}  # the folder names the run's own CPU
    assert next(iter(cards)).startswith("cpu-")

    history = subprocess.run([sys.executable, "-m", "opbench", "history", str(tmp_path / ".benchmarks")],
                             cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert history.returncode == 0, history.stdout[-4000:] + history.stderr[-2000:]
    out = history.stdout
    assert "3 runs ordered by time" in out and "flagged steps: none" in out
    per_case = out[out.index("per case, the newest run"):].splitlines()[2:]
    verdicts = [line.split()[-1] for line in per_case if line.startswith("  gemm ")]
    assert len(verdicts) >= 20 and set(verdicts) <= {"same", "ambiguous"}


def test_a_storage_the_user_names_is_used_as_given(tmp_path):
    mine = tmp_path / "mine"
    run = _pytest(tmp_path, "-k", "gemm and fp32 and fwd and 2x160x160", f"--benchmark-storage=file://{mine}",
                  "--benchmark-autosave")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    [saved] = list(mine.rglob("*.json"))
    assert saved.parent.parent == mine  # <storage>/<pytest-benchmark machine id>/NNNN_*.json, no card folder
    assert not (tmp_path / ".benchmarks").exists()
