"""Saved runs kept per card: `.benchmarks/<card>/<pytest-benchmark machine id>/NNNN_*.json`.

pytest-benchmark files saved runs (--benchmark-save, --benchmark-autosave) under a machine id made
of the OS, the Python implementation and version and the word size: two GPUs of different models
in one kind of host share a folder, and so would their runs, which then compare as if they were one
machine. The card is what a kernel's speed depends on first, so the suite keys the folder by it:
the GPU's model as NVML names it, or the CPU's brand for a run on the CPU.

The only public way to change where pytest-benchmark saves is its --benchmark-storage option, read
when its session starts (in a trylast pytest_configure). So when the user gave none, the plugin's
own pytest_configure, which runs before it, points the option at `.benchmarks/<card>`; a storage
the user names is used as given. Within the card's folder pytest-benchmark keeps its own layout,
numbering and --benchmark-compare lookup, so saving and comparing work as users know them.
"""

from __future__ import annotations

import os
import platform
import re
import shlex

DEFAULT_STORAGE = "file://./.benchmarks"  # pytest-benchmark's default for --benchmark-storage
_OPTION = "--benchmark-storage"


def card_slug(name: str) -> str:
    """A folder name for a card: lower case, words joined by '-', marks such as (R) and (TM) dropped.
    "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    name = re.sub(r"\((?:r|tm|c)\)|\b(?:cpu|processor)\b|@.*$", " ", name, flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-.") or "unknown"


def card_folder(name: str, device: str) -> str:
    """The storage folder of a card: the GPU's slug, or "cpu-" and the CPU's slug."""
    slug = card_slug(name)
    return slug if device == "cuda" else f"cpu-{slug}"


def card_of_run(machine_info: dict, device: str) -> str:
    """The card a saved run measured on, from its machine_info: the name its folder is made from."""
    if device == "cuda":
        gpu = machine_info.get("gpu") or {}
        devices = gpu.get("devices") or []
        used = next((d for d in devices if gpu.get("used_uuid") and d.get("uuid") == gpu["used_uuid"]),
                    devices[0] if devices else {})
        return used.get("name") or "CUDA GPU"
    return (machine_info.get("cpu") or {}).get("brand_raw") or platform.processor() or platform.machine() or "CPU"


def this_card(device: str) -> str:
    """The card this process measures on, named as its runs' machine_info will name it."""
    if device == "cuda":
        from opbench.measure.hardware import gpu_info, torch_gpu_name  # torch only where a GPU is asked for
        gpu = gpu_info()
        return (card_of_run({"gpu": gpu}, "cuda") if gpu.get("available") else torch_gpu_name()) or "CUDA GPU"
    try:
        import cpuinfo  # what pytest-benchmark writes into machine_info["cpu"]
        brand = cpuinfo.get_cpu_info().get("brand_raw")
    except Exception:  # py-cpuinfo probes the machine many ways; any failure leaves the fallback below
        brand = None
    return brand or platform.processor() or platform.machine() or "CPU"


def storage_given(config) -> bool:
    """Whether the user chose a storage: on the command line, in PYTEST_ADDOPTS or in the ini's addopts,
    or by any route that left the option other than its default."""
    if getattr(config.option, "benchmark_storage", DEFAULT_STORAGE) != DEFAULT_STORAGE:
        return True
    sources = [*config.invocation_params.args, *shlex.split(os.environ.get("PYTEST_ADDOPTS", ""))]
    try:
        sources += list(config.getini("addopts"))
    except ValueError:
        pass
    return any(str(a).startswith(_OPTION) for a in sources)


def use_card_storage(config, device: str) -> str | None:
    """Point pytest-benchmark's default storage at the card's folder when the run saves or compares and
    the user chose no storage; the folder it now uses, or None where nothing was changed. Call it from a
    pytest_configure that runs before pytest-benchmark's (which is trylast)."""
    opt = config.option
    if not hasattr(opt, "benchmark_storage") or storage_given(config):
        return None
    if not (getattr(opt, "benchmark_save", None) or getattr(opt, "benchmark_autosave", None)
            or getattr(opt, "benchmark_compare", None)):
        return None  # nothing reads or writes the storage: no card lookup, no folder
    opt.benchmark_storage = f"{DEFAULT_STORAGE}/{card_folder(this_card(device), device)}"
    return opt.benchmark_storage
