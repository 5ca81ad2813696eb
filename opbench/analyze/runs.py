"""Runs on disk: load a pytest-benchmark JSON written by this suite, check it is one, and read it.

A run is what `pytest bench/ --benchmark-json=FILE` writes, or what `--benchmark-save` /
`--benchmark-autosave` store under `.benchmarks/<machine-id>/NNNN_*.json`: the same schema. A
file that is not such a run is refused with one line that says what it is and what was expected.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from opbench.measure.hardware import stable_facts

EXPECTED = ("expected a pytest-benchmark JSON of opbench's bench/ suite "
            "(pytest bench/ --benchmark-json=FILE, or a run saved with --benchmark-save)")


UNITS = ("layer", "model")


class RunError(ValueError):
    """A path that is not a readable opbench run."""


@dataclass(frozen=True)
class Measurement:
    """One timed case of a run: its identity, the statistics of its rounds, and its extra_info."""
    name: str  # pytest's test name
    op: str
    backend: str
    dtype: str
    pass_: str
    shape: dict[str, int]
    shape_id: str  # the shape part of the test id
    median_s: float
    q1_s: float
    q3_s: float
    min_s: float
    max_s: float
    rounds: int
    info: dict = field(repr=False)  # the whole extra_info

    @property
    def key(self) -> tuple:
        """Identity across runs: op, shape, dtype, backend, pass."""
        return (self.op, tuple(sorted(self.shape.items())), self.dtype, self.backend, self.pass_)

    @property
    def label(self) -> str:
        return f"{self.op} {self.shape_id} {self.dtype} {self.pass_} {self.backend}"

    @property
    def throttled(self) -> list[str]:
        return list(self.info.get("throttled") or ())


@dataclass(frozen=True)
class Run:
    path: Path
    machine_info: dict
    section: dict  # the top-level "opbench" section
    measurements: tuple[Measurement, ...]
    datetime: str

    @property
    def device(self) -> str:
        return self.section.get("device") or ("cuda" if (self.machine_info.get("gpu") or {}).get("available")
                                              else "cpu")


def _shape_id(bench: dict, info: dict) -> str:
    """The test id is built from the identity, so the id minus its dtype-pass-backend tail is the shape."""
    tail = f"-{info['dtype']}-{info['pass']}-{info['backend']}"
    param = bench.get("param") or ""
    if param.endswith(tail):
        return param[:-len(tail)]
    return "x".join(str(v) for v in info["shape"].values())


_IDENTITY = ("op", "backend", "dtype", "pass", "shape")
_STATS = ("median", "q1", "q3", "min", "max", "rounds")


def _measurement(bench: dict) -> Measurement | None:
    info, stats = bench.get("extra_info") or {}, bench.get("stats") or {}
    if "op" not in info:
        return None  # not an opbench case (a plain pytest-benchmark test in the same session)
    if info["op"] in UNITS:
        return None  # a layer or model timed whole: a check of composition (opbench.measure.units), not a case
    missing = [k for k in _IDENTITY if k not in info] + [f"stats.{k}" for k in _STATS if k not in stats]
    if missing:
        raise ValueError(f"its benchmark {bench.get('name', '?')!r} lacks {', '.join(missing)}")
    return Measurement(
        name=bench.get("name", ""), op=info["op"], backend=info["backend"], dtype=info["dtype"],
        pass_=info["pass"], shape=dict(info["shape"]), shape_id=_shape_id(bench, info),
        median_s=stats["median"], q1_s=stats["q1"], q3_s=stats["q3"], min_s=stats["min"], max_s=stats["max"],
        rounds=stats["rounds"], info=info)


def load_run(path: str | Path) -> Run:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise RunError(f"{path}: cannot read it ({error.strerror or error}); {EXPECTED}") from None
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        where = f" at line {error.lineno}" if isinstance(error, json.JSONDecodeError) else ""
        raise RunError(f"{path} is not JSON ({type(error).__name__}{where}); {EXPECTED}") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        what = (f"an object with keys {', '.join(sorted(data)[:6])}" if isinstance(data, dict)
                else f"a JSON {type(data).__name__}")
        raise RunError(f"{path} is JSON but not a pytest-benchmark run ({what}, no 'benchmarks' list); {EXPECTED}")
    try:
        measurements = tuple(m for m in map(_measurement, data["benchmarks"]) if m is not None)
    except ValueError as error:
        raise RunError(f"{path} is a pytest-benchmark run with incomplete opbench data ({error}); {EXPECTED}") from None
    if "opbench" not in data and not measurements:
        raise RunError(f"{path} is a pytest-benchmark run of {len(data['benchmarks'])} benchmarks without opbench "
                       f"data (no 'opbench' section, no extra_info.op on any benchmark); {EXPECTED}")
    return Run(path, data.get("machine_info") or {}, data.get("opbench") or {}, measurements,
               data.get("datetime", ""))


def resolve_run(spec: str, storage: str | None = None) -> Path:
    """A run file: `spec` itself when it is a file, else the run `spec` names (a run id such as 0001,
    a saved name, or MACHINE-ID/0001) in a pytest-benchmark storage folder."""
    path = Path(spec)
    if path.is_file() or storage is None:
        return path
    root = Path(storage.removeprefix("file://"))
    matches = sorted({*root.glob(f"*/{spec}*.json"), *root.glob(f"{spec}*.json")})
    if len(matches) == 1:
        return matches[0]
    saved = sorted(str(p.relative_to(root)) for p in root.glob("*/*.json"))
    if not matches:
        raise RunError(f"no run {spec!r} in storage {root} (saved runs: {', '.join(saved) or 'none'})")
    raise RunError(f"run {spec!r} is ambiguous in storage {root}: "
                   f"{', '.join(str(p.relative_to(root)) for p in matches)}; name MACHINE-ID/RUN")


def used_gpu(machine_info: dict) -> dict | None:
    """The NVML record of the GPU the run used (the first GPU where that is unknown), or None."""
    devices = (machine_info.get("gpu") or {}).get("devices") or []
    used = (machine_info.get("gpu") or {}).get("used_uuid")
    return next((d for d in devices if used and d.get("uuid") == used), devices[0] if devices else None)


def device_label(machine_info: dict, device: str) -> str:
    """What a run measured on: the GPU's name, or the CPU's."""
    if device == "cuda":
        return (used_gpu(machine_info) or {}).get("name") or "CUDA GPU"
    return f"CPU ({(machine_info.get('cpu') or {}).get('brand_raw') or 'unknown'})"


def _pair(a, b) -> str | None:
    return None if a is None and b is None else f"{a if a is not None else '-'} / {b if b is not None else '-'}"


def environment(machine_info: dict) -> dict[str, str | None]:
    """What a kernel's speed depends on, as "label: value", from machine_info.gpu and .software."""
    facts = stable_facts(machine_info)
    software = facts["software"] or {}
    gpu = used_gpu(machine_info) or {}
    names = [d["name"] for d in facts["gpus"] if d.get("name")]
    host = facts["host"]
    return {
        "GPU": f"{len(names)} x {gpu.get('name')}" if len(names) > 1 else gpu.get("name"),
        "GPU UUID": gpu.get("uuid"),
        "VBIOS": gpu.get("vbios"),
        "driver": facts["driver"],
        "CUDA (driver)": facts["cuda_driver"],
        "CUDA (runtime)": software.get("cuda_runtime"),
        "torch": software.get("torch"),
        "Triton": software.get("triton"),
        "NCCL": software.get("nccl"),
        "cuDNN": None if software.get("cudnn") is None else str(software["cudnn"]),
        "flash-attn": software.get("flash_attn"),
        "SM clock max / application (MHz)": _pair(gpu.get("max_sm_clock_mhz"), gpu.get("app_sm_clock_mhz")),
        "memory clock max / application (MHz)": _pair(gpu.get("max_mem_clock_mhz"), gpu.get("app_mem_clock_mhz")),
        "power limit (W)": None if gpu.get("power_limit_w") is None else f"{gpu['power_limit_w']:g}",
        "ECC / MIG": _pair(gpu.get("ecc_enabled"), gpu.get("mig_enabled")),
        "CPU": facts["cpu"],
        "Python": host.get("python_version"),
        "OS": " ".join(filter(None, (host.get("system"), host.get("release")))) or None,
    }


def environment_diff(base: dict, new: dict) -> list[tuple[str, str | None, str | None]]:
    """(label, base value, new value) for every environment fact that differs between two runs."""
    a, b = environment(base), environment(new)
    return [(label, a[label], b[label]) for label in a if a[label] != b[label]]
