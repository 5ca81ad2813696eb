"""Runs on disk: load a pytest-benchmark JSON written by this suite, check it is one, and read it.

A run is what `pytest bench/ --benchmark-json=FILE` writes, or what `--benchmark-save` /
`--benchmark-autosave` store under `.benchmarks/<machine-id>/NNNN_*.json`: the same schema. A
file that is not such a run is refused with one line that says what it is and what was expected.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from opbench.measure.hardware import stable_facts
from opbench.ops import FAMILIES, get_family
from opbench.record import OpCase, Record, RecordError, UnitCase, from_info

EXPECTED = ("expected a pytest-benchmark JSON of opbench's bench/ suite "
            "(pytest bench/ --benchmark-json=FILE, or a run saved with --benchmark-save)")


class RunError(ValueError):
    """A path that is not a readable opbench run."""


@dataclass(frozen=True)
class Run:
    path: Path
    machine_info: dict
    section: dict  # the top-level "opbench" section
    measurements: tuple[OpCase, ...]  # op cases, peaks and collectives, each as its record
    datetime: str
    units: tuple[UnitCase, ...] = ()  # layers and models timed whole, against which composition is checked

    @property
    def device(self) -> str:
        return self.section.get("device") or ("cuda" if (self.machine_info.get("gpu") or {}).get("available")
                                              else "cpu")

    def of_kind(self, kind: str) -> list[OpCase]:
        return [m for m in self.measurements if m.kind == kind]


def shape_label(m: OpCase) -> str:
    """A case's shape as its test id writes it."""
    return get_family(m.op).id_of(get_family(m.op).shape_type(**m.shape)) if m.op in FAMILIES else \
        "x".join(str(v) for v in m.shape.values())


def label(m: OpCase) -> str:
    """op, shape (as in the test id), dtype, pass and backend."""
    return f"{m.op} {shape_label(m)} {m.dtype} {m.pass_} {m.backend}"


def _records(benchmarks: list) -> list[Record]:
    """The timed records of a run's benchmarks; plain pytest-benchmark tests of the same session are passed over."""
    out = []
    for bench in benchmarks:
        info = (bench.get("extra_info") if isinstance(bench, dict) else None) or {}
        if "kind" not in info and "op" not in info:
            continue  # not an opbench case
        if "kind" not in info:
            raise RecordError(f"benchmark {bench.get('name', '?')!r} was written by an opbench older than 0.2 "
                              "(no record kind); re-run the suite")
        try:
            record = from_info(info)
        except RecordError as error:
            raise RecordError(f"benchmark {bench.get('name', '?')!r}: {error}") from None
        if record.timed:
            out.append(record)
    return out


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
        records = _records(data["benchmarks"])
    except RecordError as error:
        raise RunError(f"{path} is a pytest-benchmark run with records this opbench cannot read ({error}); "
                       f"{EXPECTED}") from None
    if "opbench" not in data and not records:
        raise RunError(f"{path} is a pytest-benchmark run of {len(data['benchmarks'])} benchmarks without opbench "
                       f"data (no 'opbench' section, no opbench record on any benchmark); {EXPECTED}")
    return Run(path, data.get("machine_info") or {}, data.get("opbench") or {},
               tuple(r for r in records if isinstance(r, OpCase)), data.get("datetime", ""),
               tuple(r for r in records if isinstance(r, UnitCase)))


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
