"""Roofline: the ceilings a run is held to, and each case's share of the one that bounds it.

A case doing F FLOPs and moving B bytes cannot take less than max(F / peak_flops, B / peak_bw), so
its attainable rate is min(peak_flops, (F / B) x peak_bw) and its share is that bound's time over
its median. peak_flops is the dense matmul ceiling of the case's dtype, peak_bw the device copy
bandwidth. The ceilings are the run's measured peaks when it measured any (bench/test_peaks.py),
else the datasheet of its GPU, and every share says which.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from opbench.measure.peaks import MeasuredPeaks, datasheet_for, measured_peaks
from opbench.analyze.runs import Run, device_label, used_gpu
from opbench.record import KINDS, Bound, Record, from_info


@dataclass(frozen=True)
class Ceilings:
    matmul_tflops: dict[str, float]  # per dtype
    memory_gbps: float | None
    source: str  # "measured on ..." or "from the datasheet of ..., not measured"
    measured: bool

    def to_dict(self) -> dict:
        return asdict(self)


def ceilings(peaks: MeasuredPeaks | None, machine_info: dict) -> Ceilings | None:
    """Measured ceilings if the run has any, else its GPU's datasheet, else None."""
    if peaks is not None and (peaks.matmul_tflops or peaks.copy_gbps):
        return Ceilings(dict(peaks.matmul_tflops), peaks.copy_gbps, f"measured on {peaks.label}", True)
    sheet = datasheet_for((used_gpu(machine_info) or {}).get("name"))
    if sheet is None:
        return None
    return Ceilings(dict(sheet.matmul_tflops), sheet.memory_gbps, f"from the datasheet of {sheet.name}, not measured",
                    False)


def bound(m: Record, ceil: Ceilings | None) -> Bound | None:
    """A case's share of its roofline; None where it has no roofline (peak cases define the ceilings,
    collectives are bound by the fabric, units mix ops; a dtype whose compute ceiling is unknown, no median)."""
    if ceil is None or m.kind != "op" or not m.median_s:
        return None
    flops, nbytes = m.flops, m.bytes
    peak_tflops = ceil.matmul_tflops.get(m.dtype)
    if (flops and not peak_tflops) or (nbytes and not ceil.memory_gbps) or not (flops or nbytes):
        return None
    compute_s = flops / (peak_tflops * 1e12) if flops else 0.0
    memory_s = nbytes / (ceil.memory_gbps * 1e9) if nbytes else 0.0
    bound_s = max(compute_s, memory_s)
    return Bound(share=bound_s / m.median_s, limit="compute" if compute_s >= memory_s else "memory",
                 attainable_tflops=flops / bound_s / 1e12, source=ceil.source)


def run_ceilings(run: Run) -> Ceilings | None:
    """A loaded run's ceilings, recomputed from its cases as at JSON-writing time."""
    label = device_label(run.machine_info, run.device)
    return ceilings(measured_peaks(run.of_kind("peak"), run.device, label), run.machine_info)


def add_roofline(output_json: dict) -> None:
    """At JSON-writing time, once every case (peaks included) has run: the measured peaks and the
    ceilings into the opbench section, each case's roofline share into its record."""
    section, machine_info = output_json["opbench"], output_json.get("machine_info") or {}
    benches = [b for b in output_json.get("benchmarks", []) if (b.get("extra_info") or {}).get("kind") in KINDS]
    records = [from_info(b["extra_info"]) for b in benches]
    peaks = measured_peaks([r for r in records if r.kind == "peak"], section["device"],
                           device_label(machine_info, section["device"]))
    ceil = ceilings(peaks, machine_info)
    section["peaks"] = peaks.to_dict() if peaks else None
    section["ceilings"] = ceil.to_dict() if ceil else None
    for bench, record in zip(benches, records):
        case_bound = bound(record, ceil)
        if case_bound is not None:
            bench["extra_info"] = replace(record, roofline=case_bound).to_info()
