"""The CPU smoke run of bench/test_attention.py: what it times, what it skips, and why."""

import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from opbench.ops.attention import ATTENTION

ROOT = Path(__file__).resolve().parents[1]
SDPA_BACKENDS = {"sdpa-math": SDPBackend.MATH, "sdpa-flash": SDPBackend.FLASH_ATTENTION,
                 "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}


def _runs_on_this_cpu(backend: SDPBackend) -> bool:
    q = torch.randn(1, 2, 4, 16)
    try:
        with sdpa_kernel(backend):
            F.scaled_dot_product_attention(q, q, q, is_causal=True)
    except RuntimeError:
        return False
    return True


def test_cpu_smoke_run(tmp_path):
    out = tmp_path / "out.json"
    run = subprocess.run([sys.executable, "-m", "pytest", "bench/test_attention.py", "-q", "-rs", "-p",
                          "no:cacheprovider", "--device=cpu", f"--benchmark-json={out}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["opbench"]["profile"] == "smoke" and report["opbench"]["device"] == "cpu"
    cases = [b["extra_info"] for b in report["benchmarks"]]
    assert cases and all(c["kind"] == "op" and c["correct"]["rel_err"] <= c["correct"]["tol"] for c in cases)

    # prefill, decode (a full cache and a batch of different contexts) and train, fwd and bwd, every dtype
    roles = {role.split("/")[1] for c in cases for role in c["roles"]}
    assert roles == {"prefill", "decode", "train"}
    assert {c["pass"] for c in cases} == {"fwd", "bwd"} and {c["dtype"] for c in cases} == {"fp32", "bf16", "fp16"}
    assert any(c["shape"]["window"] for c in cases)  # tiny-alt's sliding window
    assert any(c["shape"]["kv_len_min"] for c in cases) and any(c["shape"]["q_len"] == 1 for c in cases)

    # every SDPA backend this CPU has runs every case without attention sinks (torch's flash kernel: with v as
    # wide as q and k); eager attention runs those with sinks; every other backend skips, saying why
    on_cpu = {name for name, backend in SDPA_BACKENDS.items() if _runs_on_this_cpu(backend)}
    assert "sdpa-math" in on_cpu

    def served(name, c):
        shape = c["shape"]
        if name == "torch-eager" or shape.get("sinks"):
            return name == "torch-eager" and bool(shape.get("sinks"))
        return name == "sdpa-math" or shape.get("value_dim", 0) in (0, shape["head_dim"])
    for name in on_cpu | {"torch-eager"}:
        timed = {(json.dumps(c["shape"], sort_keys=True), c["dtype"], c["pass"]) for c in cases if c["backend"] == name}
        assert timed == {(json.dumps(c["shape"], sort_keys=True), c["dtype"], c["pass"]) for c in cases
                         if served(name, c)}, name
    assert any(c["backend"] == "torch-eager" for c in cases)  # tiny-sink's attention (torch-eager: in the eager group of --policy)
    for name in set(ATTENTION.backends) - on_cpu - {"torch-eager"}:
        assert not any(c["backend"] == name for c in cases), name
        assert f": {name}: " in run.stdout, f"no skip reason for {name}"
