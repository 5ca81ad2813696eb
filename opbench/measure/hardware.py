"""Machine facts for the JSON: the GPUs as NVML reports them, the software versions; the card's clocks,
power, temperature and slowdowns sampled while a GPU case runs; the host's load around a CPU case."""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from opbench.record import GpuState, HostLoad


def _try(read: Callable[[], Any]) -> Any:
    """One NVML query; a field the driver or GPU does not support reads as None."""
    try:
        value = read()
    except Exception:
        return None
    return value.decode() if isinstance(value, bytes) else value


def _device_info(nvml, handle) -> dict:
    clock = nvml.NVML_CLOCK_SM, nvml.NVML_CLOCK_MEM
    memory = _try(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
    power_mw = _try(lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle))
    return {
        "name": _try(lambda: nvml.nvmlDeviceGetName(handle)),
        "uuid": _try(lambda: nvml.nvmlDeviceGetUUID(handle)),
        "vbios": _try(lambda: nvml.nvmlDeviceGetVbiosVersion(handle)),
        "memory_total_bytes": memory.total if memory else None,
        "max_sm_clock_mhz": _try(lambda: nvml.nvmlDeviceGetMaxClockInfo(handle, clock[0])),
        "max_mem_clock_mhz": _try(lambda: nvml.nvmlDeviceGetMaxClockInfo(handle, clock[1])),
        "app_sm_clock_mhz": _try(lambda: nvml.nvmlDeviceGetApplicationsClock(handle, clock[0])),
        "app_mem_clock_mhz": _try(lambda: nvml.nvmlDeviceGetApplicationsClock(handle, clock[1])),
        "power_limit_w": power_mw / 1000 if power_mw is not None else None,
        "ecc_enabled": _try(lambda: bool(nvml.nvmlDeviceGetEccMode(handle)[0])),
        "mig_enabled": _try(lambda: bool(nvml.nvmlDeviceGetMigMode(handle)[0])),
        "persistence_mode": _try(lambda: bool(nvml.nvmlDeviceGetPersistenceMode(handle))),
        "pcie_gen": _try(lambda: nvml.nvmlDeviceGetCurrPcieLinkGeneration(handle)),
        "pcie_gen_max": _try(lambda: nvml.nvmlDeviceGetMaxPcieLinkGeneration(handle)),
        "pcie_width": _try(lambda: nvml.nvmlDeviceGetCurrPcieLinkWidth(handle)),
        "pcie_width_max": _try(lambda: nvml.nvmlDeviceGetMaxPcieLinkWidth(handle)),
    }


def gpu_info() -> dict:
    """NVML's view of the machine's GPUs; {"available": False, "reason": ...} where there is none."""
    try:
        import pynvml as nvml  # provided by nvidia-ml-py
    except ImportError:
        return {"available": False, "reason": "nvidia-ml-py is not installed"}
    try:
        nvml.nvmlInit()
    except Exception as error:
        return {"available": False, "reason": f"NVML could not start: {error}"}
    try:
        cuda = _try(nvml.nvmlSystemGetCudaDriverVersion)
        devices = [_device_info(nvml, nvml.nvmlDeviceGetHandleByIndex(i)) for i in range(nvml.nvmlDeviceGetCount())]
        used = _torch_gpu_uuid()
        return {
            "available": True,
            "driver": _try(nvml.nvmlSystemGetDriverVersion),
            "cuda_driver": f"{cuda // 1000}.{cuda % 1000 // 10}" if cuda else None,
            "devices": devices,
            "used_uuid": used,
        }
    finally:
        _try(nvml.nvmlShutdown)


@functools.cache
def _energy_source() -> tuple[Callable[[], float] | None, str | None]:
    """A reader of the GPU in use's total energy counter in joules, or why there is none."""
    if not torch.cuda.is_available():
        return None, "no CUDA GPU"
    try:
        import pynvml as nvml

        nvml.nvmlInit()
        handle = nvml.nvmlDeviceGetHandleByUUID(_torch_gpu_uuid())
        nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    except Exception as error:
        return None, f"NVML's energy counter cannot be read: {error}"
    return (lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0), None  # mJ -> J


def energy_meter() -> Callable[[], float] | None:
    return _energy_source()[0]


def energy_unavailable() -> str | None:
    """Why energy cannot be measured on this machine, or None where it can."""
    return _energy_source()[1]


def last_level_cache_bytes(cpu_caches: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """Size of the CPU's last-level cache as Linux reports it (one instance); 0 where it does not."""
    sizes = {}
    for index in cpu_caches.glob("index*"):
        try:
            level = int((index / "level").read_text())
            size = (index / "size").read_text().strip()  # "32768K"
            value = int(size.rstrip("KMG")) * {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1:], 1)
        except (OSError, ValueError):
            continue
        sizes[level] = max(sizes.get(level, 0), value)
    return sizes[max(sizes)] if sizes else 0


def _torch_gpu_uuid() -> str | None:
    """NVML's UUID ("GPU-...") of the GPU torch runs on, or None without one."""
    if not torch.cuda.is_available():
        return None
    uuid = _try(lambda: str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid))
    return f"GPU-{uuid}" if uuid and not uuid.startswith("GPU-") else uuid


def torch_gpu_name() -> str | None:
    """The name of the GPU torch runs on, as the datasheet table knows it, or None without one."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def software_versions() -> dict:
    nccl = _try(lambda: ".".join(map(str, torch.cuda.nccl.version()))) if torch.version.cuda else None
    return {
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cudnn": _try(torch.backends.cudnn.version) if torch.version.cuda else None,
        "nccl": nccl,
        "triton": _version("triton"),
        "flash_attn": _version("flash-attn") or _version("flash_attn"),
        "pytest_benchmark": _version("pytest-benchmark"),
        "numpy": _version("numpy"),
    }


# Facts that stay put between runs on the same machine and software; clocks, temperatures, free
# memory and the like drift, so comparing them would flag every pair of runs as different machines.
_STABLE_HOST = ("machine", "system", "release", "python_implementation", "python_version")
_STABLE_GPU = ("name", "uuid", "vbios", "memory_total_bytes", "ecc_enabled", "mig_enabled")


def stable_facts(machine_info: dict) -> dict:
    gpu = machine_info.get("gpu") or {}
    return {
        "host": {k: machine_info.get(k) for k in _STABLE_HOST},
        "cpu": (machine_info.get("cpu") or {}).get("brand_raw"),
        "driver": gpu.get("driver"),
        "cuda_driver": gpu.get("cuda_driver"),
        "gpus": [{k: d.get(k) for k in _STABLE_GPU} for d in gpu.get("devices", [])],
        "software": machine_info.get("software"),
    }


# Clock-event reasons (nvml.h: nvmlClocksEventReason*, formerly nvmlClocksThrottleReason*, same bits)
# that mean the GPU slowed itself down for heat or power while a kernel ran, so the case's time says
# more about the card's state than about the kernel. Idle, application-clock settings, sync boost and
# display clocks are not such slowdowns.
THROTTLE_REASONS = {
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x20: "sw_thermal",
    0x40: "hw_thermal",
    0x80: "hw_power_brake",
}


@dataclass(frozen=True)
class ClockSample:
    """One NVML reading of the GPU a case runs on; None where the GPU or driver does not report it."""
    sm_clock_mhz: int | None
    mem_clock_mhz: int | None
    temperature_c: int | None
    power_w: float | None
    event_reasons: int | None  # bitmask of clock-event reasons


def _event_reasons(nvml, handle) -> int | None:
    # EventReasons is the current name of the call; older drivers only have ThrottleReasons.
    for name in ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"):
        read = getattr(nvml, name, None)
        value = _try(lambda: read(handle)) if read else None
        if value is not None:
            return value
    return None


def sample_clocks(nvml, handle) -> ClockSample:
    power_mw = _try(lambda: nvml.nvmlDeviceGetPowerUsage(handle))
    return ClockSample(
        sm_clock_mhz=_try(lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM)),
        mem_clock_mhz=_try(lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM)),
        temperature_c=_try(lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
        power_w=power_mw / 1000 if power_mw is not None else None,
        event_reasons=_event_reasons(nvml, handle),
    )


def throttle_reasons(mask: int | None) -> list[str]:
    """The thermal and power slowdowns in a clock-event bitmask."""
    return [name for bit, name in THROTTLE_REASONS.items() if mask and mask & bit]


@functools.cache
def _nvml_device() -> tuple[Any, Any] | None:
    """(pynvml, handle) of the GPU torch runs on, NVML left initialised for the process; None without."""
    try:
        import pynvml as nvml

        nvml.nvmlInit()
        uuid = _torch_gpu_uuid()
        return nvml, (nvml.nvmlDeviceGetHandleByUUID(uuid) if uuid else nvml.nvmlDeviceGetHandleByIndex(0))
    except Exception:
        return None


def violation_s(nvml, handle) -> tuple[float | None, float | None]:
    """NVML's cumulative time (s) the card was held back by its power limit and by heat."""
    def read(policy) -> float | None:
        status = _try(lambda: nvml.nvmlDeviceGetViolationStatus(handle, policy))
        return status.violationTime / 1e9 if status is not None else None
    return read(nvml.NVML_PERF_POLICY_POWER), read(nvml.NVML_PERF_POLICY_THERMAL)


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def gpu_state(samples: list[ClockSample], before: tuple, after: tuple) -> GpuState:
    """The card during the rounds: clock and power averaged over the samples, the hottest reading,
    the violation time the counters moved by, and every slowdown reason seen."""
    seen = set()
    for s in samples:
        seen.update(throttle_reasons(s.event_reasons))
    power_s, thermal_s = (a - b if a is not None and b is not None else None for a, b in zip(after, before))
    temps = [s.temperature_c for s in samples if s.temperature_c is not None]
    return GpuState(_mean([s.sm_clock_mhz for s in samples]), _mean([s.power_w for s in samples]),
                    max(temps) if temps else None, len(samples), power_s, thermal_s,
                    tuple(n for n in THROTTLE_REASONS.values() if n in seen))


class _Watch:
    state: GpuState | None = None


SAMPLE_PERIOD_S = 0.005


@contextlib.contextmanager
def gpu_watch(nvml_device: tuple | None | bool = True) -> Iterator[_Watch]:
    """Around a case's rounds: NVML's violation counters read before and after, and clocks, power and
    temperature sampled from a thread while the rounds run. `watch.state` holds the GpuState once the
    block is done; it stays None where NVML cannot read the GPU (a CPU run included)."""
    watch = _Watch()
    if nvml_device is True:
        nvml_device = _nvml_device()
    if not nvml_device:
        yield watch
        return
    nvml, handle = nvml_device
    samples: list[ClockSample] = [sample_clocks(nvml, handle)]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(SAMPLE_PERIOD_S):
            samples.append(sample_clocks(nvml, handle))
    before = violation_s(nvml, handle)
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield watch
    finally:
        stop.set()
        thread.join()
        samples.append(sample_clocks(nvml, handle))
        watch.state = gpu_state(samples, before, violation_s(nvml, handle))


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _cpu_times(stat: Path = Path("/proc/stat")) -> tuple[int, int] | None:
    """(total, steal) jiffies of all CPUs, or None where /proc/stat is not there."""
    try:
        fields = stat.read_text().split("\n", 1)[0].split()[1:]
        values = [int(v) for v in fields]
    except (OSError, ValueError):
        return None
    return sum(values), values[7] if len(values) > 7 else 0


BUSY_LOAD_PER_CORE = 1.0  # more runnable threads than cores: the case shared them
BUSY_STEAL = 0.05  # the hypervisor took more than 5% of the CPU


class HostWatch:
    """Around a CPU case's rounds: the load average and the share of time stolen by the hypervisor."""

    def __init__(self, times: Callable[[], tuple[int, int] | None] = _cpu_times,
                 loadavg: Callable[[], float] = lambda: os.getloadavg()[0]):
        self.times, self.loadavg = times, loadavg
        self.load: HostLoad | None = None

    def __enter__(self) -> HostWatch:
        self.start = self.times()
        return self

    def __exit__(self, *exc) -> None:
        end = self.times()
        steal = 0.0
        if self.start and end and end[0] > self.start[0]:
            steal = (end[1] - self.start[1]) / (end[0] - self.start[0])
        per_core = _try(self.loadavg)
        per_core = per_core / cpu_count() if per_core is not None else 0.0
        self.load = HostLoad(per_core, steal, per_core > BUSY_LOAD_PER_CORE or steal > BUSY_STEAL)
