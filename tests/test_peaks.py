"""Cases outside the plan and measured peaks, end to end: a bench module's CASES, the copy case run
before the cases compared with it, opbench.peaks in the JSON and each memory-bound case's share."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_copy_bandwidth_is_recorded_and_shared(tmp_path):
    out = tmp_path / "out.json"
    # the copy module comes last on the command line: the plugin still runs its case first
    args = ["bench/test_add_rmsnorm.py", "bench/test_copy.py", "--model", "tiny", "--workload", "decode:b=4,s=200",
            "--dtype", "fp32", "--backend", "torch", f"--benchmark-json={out}", "-q"]
    result = subprocess.run([sys.executable, "-m", "pytest", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    peak = data["opbench"]["peaks"]["copy_bandwidth_gbps"]
    first, *rest = (b["extra_info"] for b in data["benchmarks"])
    assert first["op"] == "copy" and first["gbps"] == peak and first["roles"] == []
    assert "peak_share" not in first
    # add_rmsnorm comes from CASES too: one case per residual add shape of the plan
    assert [info["op"] for info in rest] == ["add_rmsnorm"]
    assert rest[0]["roles"] == ["tiny/decode/residual.attn", "tiny/decode/residual.mlp"]
    assert rest[0]["peak_share"] == {"copy_bandwidth_gbps": pytest.approx(rest[0]["gbps"] / peak)}
