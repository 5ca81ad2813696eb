"""Collectives: nccl-tests bandwidths, the cases a run builds, the alpha-beta model, and real gloo runs
launched through torchrun, including the ways they fail."""

import json
import math
import socket
import time

import pytest
import torch

from opbench.dist.collectives import collective_cases, plan_messages, sweep_sizes
from opbench.analyze.alphabeta import PROFILES, fit, predict
from opbench.dist.world import GpuPlacement, Launch, shared_gpus
from opbench.spec.models import ZOO
from opbench.ops.collective import (COLLECTIVES, CollectiveShape, algbw_gbps, busbw_factor, busbw_gbps,
                                    message_bytes, pattern, reference, shape_id)
from opbench.measure.selection import select
from opbench.ops import get_family
from opbench.spec.workload import parse_workload
from opbench.spec.plan import plan

from tests.helpers import run_pytest, run_torchrun


# Bandwidths as nccl-tests defines them --------------------------------------------------------------

@pytest.mark.parametrize("op, world, size_bytes, time_s, algbw, busbw", [
    ("allreduce", 8, 2**30, 0.01, 107.3741824, 187.9048192),  # busbw = algbw x 2 x 7 / 8
    ("allreduce", 2, 1000, 1e-6, 1.0, 1.0),  # 2(n-1)/n = 1 at n = 2
    ("allreduce", 1, 4096, 1e-6, 4.096, 0.0),  # nothing crosses a link in a world of one
    ("allgather", 8, 64 * 2**20, 1e-3, 67.108864, 58.720256),  # x 7/8
    ("reducescatter", 4, 4096, 1e-3, 0.004096, 0.003072),  # x 3/4
    ("alltoall", 16, 2**20, 1e-4, 10.48576, 9.8304),  # x 15/16
    ("broadcast", 8, 10**9, 0.5, 2.0, 2.0),  # x 1 at any n
])
def test_algbw_and_busbw_by_hand(op, world, size_bytes, time_s, algbw, busbw):
    assert algbw_gbps(size_bytes, time_s) == pytest.approx(algbw, rel=1e-12)
    assert busbw_gbps(op, size_bytes, world, time_s) == pytest.approx(busbw, rel=1e-12, abs=1e-15)


def test_every_collective_has_a_bus_factor_and_a_registered_family():
    from opbench.ops import get_family

    assert set(COLLECTIVES) == {"allreduce", "allgather", "reducescatter", "alltoall", "broadcast"}
    for op in COLLECTIVES:
        family = get_family(op)
        assert set(family.backends) == {"nccl", "gloo"}
        assert family.bytes(CollectiveShape(12345, 4), None) == 12345  # S, so GB/s is algbw
        assert family.flops(CollectiveShape(12345, 4)) == 0


@pytest.mark.parametrize("op, size, world, element, expected", [
    ("allgather", 1024, 3, 4, 1020),  # a multiple of 3 fp32 elements
    ("reducescatter", 2**20, 8, 2, 2**20),  # already splits evenly
    ("alltoall", 1000, 8, 2, 992),
    ("allreduce", 1023, 3, 2, 1022),  # whole elements only: all-reduce does not split per rank
    ("broadcast", 7, 4, 4, 4),
])
def test_messages_round_down_as_nccl_tests_does(op, size, world, element, expected):
    assert message_bytes(op, size, world, element) == expected


def test_shape_ids_are_short_and_exact():
    assert shape_id(CollectiveShape(1024, 2)) == "1KiB-n2"
    assert shape_id(CollectiveShape(3 * 2**20, 8)) == "3MiB-n8"
    assert shape_id(CollectiveShape(2**30, 16)) == "1GiB-n16"
    assert shape_id(CollectiveShape(1536, 2)) == "1536B-n2"


# Correctness references, against collectives simulated in one process ------------------------------

def _simulate(op: str, world: int, count: int) -> list[torch.Tensor]:
    data = [pattern(r, 0, count, torch.float64, "cpu") for r in range(world)]
    chunk = count // world
    if op == "allreduce":
        return [sum(data)] * world
    if op == "reducescatter":
        return [sum(data)[r * chunk:(r + 1) * chunk] for r in range(world)]
    if op == "allgather":
        return [torch.cat([data[r][r * chunk:(r + 1) * chunk] for r in range(world)])] * world
    if op == "alltoall":
        return [torch.cat([data[j][r * chunk:(r + 1) * chunk] for j in range(world)]) for r in range(world)]
    return [data[0]] * world


@pytest.mark.parametrize("world", [2, 3, 9])  # 9: the rank term wraps around (it has period 7)
@pytest.mark.parametrize("op", COLLECTIVES)
def test_each_ranks_reference_is_the_collectives_result(op, world):
    count = world * 13  # 13 elements a chunk: chunks do not start on the element term's period of 5
    results = _simulate(op, world, count)
    for rank in range(world):
        inp = {"rank": rank, "world": world, "count": count, "send": torch.empty(0)}
        assert torch.equal(reference(op, inp, None, "fwd"), results[rank])
    # the inputs tell ranks apart and are small integers, whose sums are exact in bf16
    assert not torch.equal(pattern(0, 0, 13, torch.float64, "cpu"), pattern(1, 0, 13, torch.float64, "cpu"))
    assert results[0].abs().max() <= 5 * world
    for r in range(world):
        bf16 = pattern(r, 0, count, torch.bfloat16, "cpu")
        assert torch.equal(bf16.double(), pattern(r, 0, count, torch.float64, "cpu"))


# The cases a run builds ------------------------------------------------------------------------------

def test_smoke_cases_are_the_sweep_plus_the_gradient_messages_of_training():
    selection = select(profile="smoke", device="cpu")
    cases = collective_cases(selection, world=2, backend="gloo")
    sweep = [c for c in cases if not c.roles]
    assert {(c.op, c.dtype) for c in sweep} == {(op, d) for op in COLLECTIVES for d in selection.dtypes}
    assert sorted({c.shape.size_bytes for c in sweep}) == sweep_sizes(2**15) == [2**k for k in range(10, 16)]
    by_role = {c.roles[0]: c for c in cases if c.roles and c.dtype == "fp32"}
    tiny = ZOO["tiny"]
    layer_bytes = tiny.params_per_layer * 4
    assert by_role["tiny/train/zero.reducescatter.layer"].shape == CollectiveShape(layer_bytes, 2)
    assert by_role["tiny/train/zero.allgather.layer"].op == "allgather"
    assert tiny.params * 4 < 25 * 2**20  # every gradient fits one DDP bucket
    assert by_role["tiny/train/dp.allreduce.bucket"].shape == CollectiveShape(tiny.params * 4, 2)
    assert all(c.shape.world == 2 and c.backend == "gloo" and c.pass_ == "fwd" for c in cases)
    assert len(cases) == len({(c.op, c.dtype, c.shape) for c in cases})  # each message once
    # a world of one moves no gradients: the sweep alone
    assert collective_cases(selection, world=1, backend="gloo") == [
        c.__class__(c.op, CollectiveShape(c.shape.size_bytes, 1), c.dtype, c.pass_, c.backend, ()) for c in sweep]
    # a backend filter that leaves out the run's process group leaves nothing
    assert collective_cases(select(profile="smoke", device="cpu", backends=["torch"]), 2, "gloo") == []


def test_tensor_parallel_all_reduces_are_measured_at_their_world_size():
    selection = select(profile="default", device="cuda")
    at8 = {(c.op, c.shape.size_bytes): c for c in collective_cases(selection, world=8, backend="nccl")}
    # Llama-3-70B decode, batch 32, hidden 8192, bf16: 32 x 8192 x 2 bytes; also a sweep size
    case = at8[("allreduce", 32 * 8192 * 2)]
    assert {"llama-3-70b/decode/tp.allreduce.attn", "llama-3-70b/decode/tp.allreduce.mlp"} <= set(case.roles)
    assert at8[("allreduce", 2**30)].dtype == "bf16"  # the default sweep reaches 1 GiB
    at2 = collective_cases(selection, world=2, backend="nccl")
    assert not any("tp.allreduce" in r for c in at2 for r in c.roles)
    # Llama-3-8B training (tp 1): a 25 MiB DDP bucket and one layer's ZeRO traffic, at any world
    layer = ZOO["llama-3-8b"].params_per_layer * 2
    assert "llama-3-8b/train/dp.allreduce.bucket" in {r for c in at2 for r in c.roles}
    messages = plan_messages(plan(ZOO["llama-3-8b"], parse_workload("train:b=1,s=4096")), 2)
    assert messages == [("allreduce", 25 * 2**20, "dp.allreduce.bucket"),
                        ("reducescatter", layer, "zero.reducescatter.layer"),
                        ("allgather", layer, "zero.allgather.layer")]


# The alpha-beta model --------------------------------------------------------------------------------

def _timings(op, world, alpha_s, busbw, noise=0.0):
    sizes = sweep_sizes(2**30)
    return [(s, (alpha_s + busbw_factor(op, world) * s / (busbw * 1e9)) * (1 + noise * math.sin(3 * i)))
            for i, s in enumerate(sizes)]


def test_fit_recovers_known_alpha_and_beta():
    exact = fit("allreduce", _timings("allreduce", 8, 25e-6, 150.0), 8, "bf16", "nccl")
    assert exact.alpha_s == pytest.approx(25e-6, rel=1e-6)
    assert exact.busbw_gbps == pytest.approx(150.0, rel=1e-6)
    assert exact.max_rel_residual < 1e-6 and exact.points == 21 and exact.max_bytes == 2**30
    noisy = fit("alltoall", _timings("alltoall", 4, 8e-6, 40.0, noise=0.03), 4, "fp32", "gloo")
    assert noisy.alpha_s == pytest.approx(8e-6, rel=0.05)
    assert noisy.busbw_gbps == pytest.approx(40.0, rel=0.05)
    assert 0.01 < noisy.max_rel_residual < 0.1


def test_fit_keeps_alpha_at_zero_and_drops_a_bandwidth_it_cannot_see():
    # the line through these crosses zero at -1 us; pinned at zero, the slope is sum(w x t) / sum(w x^2)
    # with bus bytes x = S / 2 and weights w = 1 / t^2: (512e6 + 1024 x 3e-6 / 9e-12) / (512^2 x 1e12 +
    # 1024^2 / 9e-12) s/B, that is 0.44373 GB/s
    f = fit("allgather", [(1024, 1e-6), (2048, 3e-6)], 2, "fp32", "gloo")
    assert f.alpha_s == 0.0 and f.busbw_gbps == pytest.approx(0.4437333, rel=1e-6)
    flat = fit("broadcast", [(s, 1e-4) for s in sweep_sizes(2**15)], 2, "fp32", "gloo")
    assert flat.busbw_gbps is None and flat.alpha_s == pytest.approx(1e-4)
    lone = fit("allreduce", [(1024, 2e-5), (2048, 3e-5)], 1, "fp32", "gloo")  # busbw factor 0 at n = 1
    assert lone.busbw_gbps is None and lone.alpha_s == pytest.approx(3e-5 / 1.3)  # the 1/t^2-weighted mean
    with pytest.raises(ValueError, match="no bandwidth was measured"):
        predict("allreduce", 2**20, 8, lone)


def test_predict_from_fabric_profiles_by_hand():
    ring, nvls = PROFILES["h100-nvlink-ring"], PROFILES["h100-nvlink-nvls"]
    # 1 GiB all-reduce on 8 GPUs: 10 us + 1.75 x 2^30 B / 370 GB/s
    assert predict("allreduce", 2**30, 8, ring) == pytest.approx(10e-6 + 1879048192 / 370e9, rel=1e-12)
    assert predict("allreduce", 2**30, 8, nvls) == pytest.approx(12e-6 + 1879048192 / 480e9, rel=1e-12)
    assert predict("allreduce", 2**30, 8, PROFILES["a100-nvlink"]) == pytest.approx(0.008111, rel=1e-3)
    # across 2 nodes x 8 GPUs on 400G InfiniBand, a 256 MiB all-gather: 30 us + 15/16 x 2^28 / 47e9
    assert predict("allgather", 2**28, 16, PROFILES["ib-ndr-400g"]) == pytest.approx(0.00538443, rel=1e-6)
    fitted = fit("allreduce", _timings("allreduce", 2, 30e-6, 10.0), 2, "fp32", "gloo")
    assert predict("allreduce", 2**20, 2, fitted) == pytest.approx(30e-6 + 2**20 / 10e9, rel=1e-6)
    with pytest.raises(ValueError, match="allreduce cannot predict alltoall"):
        predict("alltoall", 2**20, 2, fitted)


# Launch facts and NCCL's one-GPU-per-rank rule --------------------------------------------------------

def test_launch_reads_torchruns_environment_or_is_a_world_of_one():
    env = {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "5", "LOCAL_WORLD_SIZE": "8", "GROUP_RANK": "0",
           "GROUP_WORLD_SIZE": "2", "MASTER_ADDR": "node-a", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x"}
    launch = Launch.from_env(env)
    assert (launch.rank, launch.world_size, launch.local_world_size, launch.nodes) == (5, 16, 8, 2)
    assert launch.endpoint == "node-a:29500" and launch.launcher == "torchrun"
    alone = Launch.from_env({})
    assert alone.world_size == 1 and not alone.distributed and "torchrun --nproc-per-node=N" in alone.describe()


def test_two_ranks_on_one_gpu_are_named():
    same = [GpuPlacement(0, "node-a", 0, "GPU-1"), GpuPlacement(1, "node-a", 0, "GPU-1")]
    reason = shared_gpus(same, visible=1)
    assert "ranks 0 and 1 share GPU 0 (GPU-1) on node-a" in reason and "--nproc-per-node=1" in reason
    apart = [GpuPlacement(0, "node-a", 0, "GPU-1"), GpuPlacement(1, "node-a", 1, "GPU-2")]
    assert shared_gpus(apart, visible=2) is None


# Real runs under torchrun, on gloo ------------------------------------------------------------------

def _check_run(data: dict, world: int) -> None:
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        assert info["kind"] == "collective" and info["correct"]["rel_err"] == 0.0, bench["name"]
        assert info["correct"]["worst_rank"] in range(world) and info["stability"]["rounds"] == bench["stats"]["rounds"]
        assert info["world"] == world and info["shape"]["world"] == world
        median = bench["stats"]["median"]
        assert info["median_s"] == median
        assert info["algbw_gbps"] == pytest.approx(info["bytes"] / median / 1e9)
        assert info["busbw_gbps"] == pytest.approx(info["bytes"] / median / 1e9 * busbw_factor(info["op"], world))
        # each round's time is the slowest rank's, so the median is at least every rank's own
        assert len(info["rank_median_s"]) == world and median >= max(info["rank_median_s"]) * (1 - 1e-12)
        family = get_family(info["op"])
        shape = family.id_of(family.shape_type(**info["shape"]))
        assert bench["param"] == f"{info['op']}-{shape}-{info['dtype']}-fwd-gloo"
    layout = data["machine_info"]["distributed"]
    assert (layout["world_size"], layout["nodes"], layout["ranks_per_node"]) == (world, 1, [world])
    assert layout["backend"] == "gloo" and layout["launcher"] == "torchrun"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("coll") / "coll.json"
    proc = run_torchrun(2, "collectives/", f"--benchmark-json={out}", "-q", timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_two_rank_run_writes_one_json_with_every_case(two_ranks):
    data, stdout = two_ranks
    cases = collective_cases(select(profile="smoke", device="cpu"), world=2, backend="gloo")
    assert sorted(b["param"] for b in data["benchmarks"]) == sorted(f"{c.op}-{c.id}" for c in cases)
    _check_run(data, 2)
    fits = data["opbench"]["collectives"]["fits"]
    # every collective's sweep in every dtype, and the uneven all-to-all of the smoke plan's expert parallelism
    assert {(f["op"], f["dtype"]) for f in fits} == {(c.op, c.dtype) for c in cases}
    assert {(op, d) for op in COLLECTIVES for d in select(profile="smoke", device="cpu").dtypes} <= {
        (f["op"], f["dtype"]) for f in fits} and any(f["op"] == "alltoallv" for f in fits)
    assert all(f["world"] == 2 and f["alpha_s"] >= 0 for f in fits)
    assert data["opbench"]["profile"] == "smoke"  # the plugin's section is kept
    # both ranks ran every case; rank 0 alone printed the tables
    assert stdout.count(f"{len(cases)} passed") == 2
    assert stdout.count("opbench collectives") == 1 and stdout.count(f"benchmark: {len(cases)} tests") == 1


ONE_RANK_DIFFERS = '''
import os
from dataclasses import replace

from opbench.ops import get_family

RANK = int(os.environ["RANK"])


def pytest_configure(config):
    allreduce = get_family("allreduce")
    gloo = allreduce.backends["gloo"]
    if RANK == 2:  # only rank 2 cannot run the 32 KiB all-reduce
        allreduce.backends["gloo"] = replace(gloo, requires=lambda shape, dtype, device: (
            "only rank 2 refuses" if shape.size_bytes == 32768 else gloo.requires(shape, dtype, device)))
    broadcast = get_family("broadcast")
    right = broadcast.backends["gloo"]
    if RANK == 3:  # and rank 3 receives a wrong 1 KiB broadcast
        def prepare(inp, dtype, pass_):
            call = right.prepare(inp, dtype, pass_)
            return lambda: call() + (inp["count"] == 256)
        broadcast.backends["gloo"] = replace(right, prepare=prepare)
'''


def test_four_ranks_skip_and_fail_together(tmp_path):
    (tmp_path / "one_rank_differs.py").write_text(ONE_RANK_DIFFERS)
    out = tmp_path / "coll.json"
    proc = run_torchrun(4, "collectives/", "-p", "one_rank_differs", "--dtype", "fp32", "--workload",
                        "prefill:b=1,s=8", "-k", "1KiB or 32KiB", f"--benchmark-json={out}", "-q", "-rsf",
                        extra_path=tmp_path, timeout=240)
    assert proc.returncode != 0  # the wrong broadcast fails the run...
    # ...on every rank, as the skip does, and every other case runs: no rank waits on another
    # (the ranks' outputs interleave line by line, so they are counted, not read in order)
    assert proc.stdout.count("1 failed, 8 passed, 1 skipped") == 4
    assert proc.stdout.count("wrong result on rank 3: relative error") >= 4
    assert proc.stdout.count("rank 2: only rank 2 refuses") == 4
    data = json.loads(out.read_text())
    assert len(data["benchmarks"]) == 2 * len(COLLECTIVES) - 2
    _check_run(data, 4)
    factors = {b["extra_info"]["op"]: b["extra_info"]["busbw_factor"] for b in data["benchmarks"]}
    assert factors == {"allreduce": 1.5, "allgather": 0.75, "reducescatter": 0.75, "alltoall": 0.75, "broadcast": 1.0}


def test_without_torchrun_a_world_of_one_says_so(tmp_path):
    out = tmp_path / "one.json"
    proc = run_pytest("collectives/", "-k", "allreduce-1KiB-n1-fp32", f"--benchmark-json={out}", timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "a world of one rank (not launched by torchrun" in proc.stdout
    data = json.loads(out.read_text())
    assert data["machine_info"]["distributed"]["launcher"] == "none"
    assert [b["extra_info"]["busbw_gbps"] for b in data["benchmarks"]] == [0.0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rendezvous_that_never_completes_names_its_endpoint():
    port = _free_port()
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # rank 1 is never started
    start = time.monotonic()
    proc = run_pytest("collectives/", "-q", "--dist-timeout", "2", env=env, timeout=120)
    assert proc.returncode == 1
    assert time.monotonic() - start < 60
    assert f"opbench: rendezvous at 127.0.0.1:{port} (MASTER_ADDR:MASTER_PORT) did not complete within 2 s" \
           in proc.stderr
    assert "1/2 clients joined" in proc.stderr and "no tests ran" in proc.stdout


DYING_RANK = '''
import os

def pytest_runtest_call(item):
    if os.environ["RANK"] == "1" and "allgather-4KiB" in item.nodeid:
        os._exit(3)
'''


def test_a_rank_that_dies_stops_the_others_with_a_message(tmp_path):
    (tmp_path / "dying_rank.py").write_text(DYING_RANK)
    start = time.monotonic()
    # torchrun ends the other ranks as soon as one exits; checking every second instead of every 0.1 s
    # leaves the survivor time to print, so that what it prints can be checked
    proc = run_torchrun(2, "collectives/", "-p", "dying_rank", "--dtype", "fp32", "--workload", "prefill:b=1,s=8",
                        "-q", launcher=("--monitor-interval=1",), extra_path=tmp_path, timeout=240)
    assert proc.returncode != 0
    assert time.monotonic() - start < 120
    out = proc.stdout + proc.stderr
    assert "opbench: allgather 4KiB-n2 fp32 failed on rank 0: another rank has stopped" in out
    assert "Root Cause" in out and "exitcode  : 3" in out
