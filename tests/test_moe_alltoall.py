"""The uneven all-to-all of expert parallelism on two gloo ranks under torchrun, at the smoke plan's
dispatch sizes: every rank's received rows checked, busbw as nccl-tests defines it."""

import json

from opbench.dist.collectives import collective_cases
from opbench.measure.selection import select
from opbench.ops.collective import AllToAllVShape, split_rows

from tests.helpers import run_torchrun


def test_two_ranks_time_the_smoke_plans_dispatch(tmp_path):
    out = tmp_path / "a2a.json"
    proc = run_torchrun(2, "collectives/", "-k", "alltoallv", f"--benchmark-json={out}", "-q", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    expected = [c for c in collective_cases(select(profile="smoke", device="cpu"), 2, "gloo") if c.op == "alltoallv"]
    assert expected and {c.dtype for c in expected} == {"fp32", "bf16"}
    data = json.loads(out.read_text())
    assert sorted(b["param"] for b in data["benchmarks"]) == sorted(f"{c.op}-{c.id}" for c in expected)
    for b in data["benchmarks"]:
        info = b["extra_info"]
        shape = AllToAllVShape(**info["shape"])
        rows = split_rows(shape)
        assert rows[0] != rows[1]  # uneven: the ranks send different splits
        assert info["correct"]["rel_err"] == 0  # small integers arrive exactly
        assert info["busbw_gbps"] == info["gbps"] * (2 - 1) / 2
        assert set(info["roles"]) == {"tiny-moe/decode/ep.dispatch", "tiny-moe/decode/ep.combine"}
        assert len(info["rank_median_s"]) == 2
