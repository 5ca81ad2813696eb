"""Collectives over torch.distributed: all-reduce, all-gather, reduce-scatter, all-to-all, broadcast, and
the uneven all-to-all of expert parallelism (alltoallv: all_to_all_single with split sizes).

Sizes and bandwidths follow nccl-tests (NVIDIA/nccl-tests, doc/PERFORMANCE.md), so that a run can be
set beside an nccl-tests run on the same machine:
  S      the full buffer: all-reduce and broadcast: the buffer; all-gather: the output (n chunks);
         reduce-scatter: the input (n chunks); all-to-all: each rank's send (= receive) buffer;
         uneven all-to-all: the largest send or receive buffer of any rank (the one the others wait for)
  algbw  S / t
  busbw  algbw x factor: all-reduce 2(n-1)/n; all-gather, reduce-scatter, all-to-all (n-1)/n; broadcast 1.
         In the ring algorithms this is what each rank's link carries per second, so it does not
         depend on n and compares directly with the fabric's bandwidth.

Inputs are small integers (|x| <= 5) made of an element term and a rank term, so that every rank knows
every other rank's data, sums are exact in every dtype up to 51 ranks in bf16 (409 in fp16), and a
chunk that lands in the wrong place or comes from the wrong rank changes the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from opbench.ops import routing
from opbench.ops.dtypes import DType
from opbench.ops.base import OpFamily, needs_cuda


@dataclass(frozen=True)
class CollectiveShape:
    size_bytes: int  # the full buffer S of nccl-tests (the all-gather output, the reduce-scatter input)
    world: int  # ranks taking part


# op -> bus bandwidth factor as a function of the world size n (nccl-tests' *GetBw functions)
_BUS_FACTORS = {
    "allreduce": lambda n: 2 * (n - 1) / n,
    "allgather": lambda n: (n - 1) / n,
    "reducescatter": lambda n: (n - 1) / n,
    "alltoall": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0,
}
COLLECTIVES = tuple(_BUS_FACTORS)  # the ops a collectives run sweeps over sizes
# The dispatch and combine of expert parallelism: each rank sends each other rank the token copies routed
# to its experts, as many as the routing draw gives (opbench.ops.routing.ep_splits). Measured at the
# plans' sizes only; its bus factor is the all-to-all's, and where no fit of it has a bandwidth, the
# even all-to-all's fit or fabric figure stands in (opbench.analyze.compose).
UNEVEN = {"alltoallv": "alltoall"}  # op -> the even op that stands in for it
# ops whose buffer splits into one chunk per rank: S must be a multiple of n elements
CHUNKED = ("allgather", "reducescatter", "alltoall")


def busbw_factor(op: str, world: int) -> float:
    """busbw / algbw: 2(n-1)/n for all-reduce, (n-1)/n for all-gather, reduce-scatter and all-to-all,
    1 for broadcast."""
    return _BUS_FACTORS[UNEVEN.get(op, op)](world)


def is_collective(op: str) -> bool:
    return op in _BUS_FACTORS or op in UNEVEN


def algbw_gbps(size_bytes: int, time_s: float) -> float:
    """S / t in GB/s (1e9 B/s)."""
    return size_bytes / time_s / 1e9


def busbw_gbps(op: str, size_bytes: int, world: int, time_s: float) -> float:
    return algbw_gbps(size_bytes, time_s) * busbw_factor(op, world)


def message_bytes(op: str, size_bytes: int, world: int, element_bytes: int) -> int:
    """The largest buffer not above size_bytes that the op can split: whole elements, and for the
    chunked ops a multiple of n elements (nccl-tests rounds its counts down the same way)."""
    unit = element_bytes * (world if op in CHUNKED else 1)
    return size_bytes - size_bytes % unit


def shape_id(shape: CollectiveShape) -> str:
    """'64KiB-n8', '1GiB-n2'; sizes that are not whole KiB stay in bytes: '24000B-n2'."""
    size = shape.size_bytes
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}-n{shape.world}"
    return f"{size}B-n{shape.world}"


@dataclass(frozen=True)
class AllToAllVShape:
    """The dispatch of `tokens` tokens per rank, each to top_k of `experts` experts spread evenly over the
    `world` ranks; a row is `hidden` elements. The combine sends the same rows back (the transposed
    splits, the same busiest buffer)."""
    tokens: int
    hidden: int
    experts: int
    top_k: int
    world: int
    seed: int = routing.ROUTING_SEED
    skew_milli: int = 0


def split_rows(shape: AllToAllVShape) -> tuple[tuple[int, ...], ...]:
    """rows[r][j]: the rows rank r sends rank j."""
    return routing.ep_splits(shape.tokens, shape.experts, shape.top_k, shape.world, shape.seed, shape.skew_milli)


def alltoallv_bytes(shape: AllToAllVShape, dtype: DType, pass_: str = "fwd") -> int:
    """S: the largest send or receive buffer of any rank, rows x hidden x element size."""
    rows = split_rows(shape)
    busiest = max(max(sum(r) for r in rows), max(sum(col) for col in zip(*rows)))
    return busiest * shape.hidden * dtype.bytes


def alltoallv_id(shape: AllToAllVShape) -> str:
    """'t4-e8top2-192-n2', and '-zipf1.2' / '-seed3' where the draw is not the default."""
    text = f"t{shape.tokens}-e{shape.experts}top{shape.top_k}-{shape.hidden}-n{shape.world}"
    if shape.skew_milli:
        text += f"-zipf{shape.skew_milli / 1000:g}"
    return text + (f"-seed{shape.seed}" if shape.seed != routing.ROUTING_SEED else "")


def describe_alltoallv(shape: AllToAllVShape) -> str:
    rows = split_rows(shape)
    received = [sum(col) for col in zip(*rows)]
    return (f"rows each rank sends each rank {[list(r) for r in rows]}; received per rank {received} "
            f"(even: {shape.tokens * shape.top_k})")


def flops(shape: CollectiveShape, pass_: str = "fwd") -> int:
    """A collective is timed for the bytes it moves; the additions of a reduction are not counted."""
    return 0


def bytes_moved(shape: CollectiveShape, dtype: DType, pass_: str = "fwd") -> int:
    """S, so that the suite's GB/s of a collective is its algbw."""
    return shape.size_bytes


def pattern(rank: int, start: int, count: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Rank `rank`'s elements start .. start+count of its full buffer: (i mod 5) - 2 + (rank mod 7) - 3."""
    period = torch.arange(-2, 3, dtype=dtype, device=device)
    reps = -(-(start % 5 + count) // 5)
    values = period.repeat(reps)[start % 5:start % 5 + count]
    return values.add_(rank % 7 - 3)


def _rank_sum(world: int) -> int:
    return sum(r % 7 - 3 for r in range(world))


def _device(device: str) -> torch.device:
    return torch.device(device, torch.cuda.current_device()) if device == "cuda" else torch.device(device)


def alltoallv_inputs(shape: AllToAllVShape, dtype: DType, pass_: str, device: str) -> dict:
    """This rank's send buffer (its rows to every rank, in rank order), the receive buffer and the split
    sizes in elements: rank r's input split j is rank j's output split r."""
    rank, h = dist.get_rank(), shape.hidden
    rows = split_rows(shape)
    send_splits = [rows[rank][j] * h for j in range(shape.world)]
    recv_splits = [rows[j][rank] * h for j in range(shape.world)]
    dev = _device(device)
    return {"rank": rank, "rows": rows, "hidden": h, "send_splits": send_splits, "recv_splits": recv_splits,
            "send": pattern(rank, 0, sum(send_splits), dtype.torch, dev),
            "recv": torch.empty(sum(recv_splits), dtype=dtype.torch, device=dev)}


def alltoallv_reference(inp: dict, dtype: DType, pass_: str) -> torch.Tensor:
    """From each rank j, the part of j's send buffer that j sends to this rank."""
    rank, rows, h, device = inp["rank"], inp["rows"], inp["hidden"], inp["send"].device
    exact = torch.float64 if device.type == "cpu" else torch.float32
    return torch.cat([pattern(j, sum(rows[j][:rank]) * h, rows[j][rank] * h, exact, device)
                      for j in range(len(rows))])


def inputs(op: str, shape: CollectiveShape, dtype: DType, pass_: str, device: str) -> dict:
    """This rank's buffers (the process group must be up): 'send', and 'recv' for out-of-place ops."""
    rank, world = dist.get_rank(), shape.world
    count = shape.size_bytes // dtype.bytes
    chunk = count // world
    dev = _device(device)
    inp = {"rank": rank, "world": world, "count": count}
    if op == "allgather":  # rank r holds chunk r of the gathered buffer
        inp["send"] = pattern(rank, rank * chunk, chunk, dtype.torch, dev)
        inp["recv"] = torch.empty(count, dtype=dtype.torch, device=dev)
    elif op == "reducescatter":
        inp["send"] = pattern(rank, 0, count, dtype.torch, dev)
        inp["recv"] = torch.empty(chunk, dtype=dtype.torch, device=dev)
    elif op == "alltoall":
        inp["send"] = pattern(rank, 0, count, dtype.torch, dev)
        inp["recv"] = torch.empty(count, dtype=dtype.torch, device=dev)
    else:  # all-reduce and broadcast work in place
        inp["send"] = pattern(rank, 0, count, dtype.torch, dev)
    return inp


def reference(op: str, inp: dict, dtype: DType, pass_: str) -> torch.Tensor:
    """What this rank must hold after the first call, from the pattern every rank's data follows."""
    rank, world, count = inp["rank"], inp["world"], inp["count"]
    chunk = count // world
    device = inp["send"].device
    exact = torch.float64 if device.type == "cpu" else torch.float32  # opbench.ops.base.high_precision's choice
    if op == "allreduce":
        return pattern(0, 0, count, exact, device).add_(3).mul_(world).add_(_rank_sum(world))
    if op == "reducescatter":
        return pattern(0, rank * chunk, chunk, exact, device).add_(3).mul_(world).add_(_rank_sum(world))
    if op == "allgather":
        return pattern(0, 0, count, exact, device).add_(3).add_(
            torch.arange(world, device=device).remainder_(7).sub_(3).to(exact).repeat_interleave(chunk))
    if op == "alltoall":  # chunk j comes from rank j's chunk `rank`
        own = pattern(0, rank * chunk, chunk, exact, device).add_(3)
        return torch.cat([own + (j % 7 - 3) for j in range(world)])
    return pattern(0, 0, count, exact, device)  # broadcast from rank 0


# torch 2.13 renamed the single-tensor all-gather and reduce-scatter; older releases have only the old names
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

def _all_reduce(inp: dict) -> torch.Tensor:
    # In place, so repeated timed calls grow the values (up to inf in fp16); the time of a collective
    # does not depend on them, and the correctness check reads the first call's result.
    dist.all_reduce(inp["send"])
    return inp["send"]


def _all_gather_call(inp: dict) -> torch.Tensor:
    _all_gather(inp["recv"], inp["send"])
    return inp["recv"]


def _reduce_scatter_call(inp: dict) -> torch.Tensor:
    _reduce_scatter(inp["recv"], inp["send"])
    return inp["recv"]


def _all_to_all(inp: dict) -> torch.Tensor:
    dist.all_to_all_single(inp["recv"], inp["send"])
    return inp["recv"]


def _all_to_all_v(inp: dict) -> torch.Tensor:
    dist.all_to_all_single(inp["recv"], inp["send"], output_split_sizes=inp["recv_splits"],
                           input_split_sizes=inp["send_splits"])
    return inp["recv"]


def _broadcast(inp: dict) -> torch.Tensor:
    dist.broadcast(inp["send"], src=0)
    return inp["send"]


# op -> (the call, what it is for a reader of the JSON)
_CALLS = {
    "allreduce": (_all_reduce, "torch.distributed.all_reduce"),
    "allgather": (_all_gather_call, f"torch.distributed.{_all_gather.__name__}"),
    "reducescatter": (_reduce_scatter_call, f"torch.distributed.{_reduce_scatter.__name__}"),
    "alltoall": (_all_to_all, "torch.distributed.all_to_all_single"),
    "broadcast": (_broadcast, "torch.distributed.broadcast"),
    "alltoallv": (_all_to_all_v, "torch.distributed.all_to_all_single with split sizes"),
}


def needs_cpu(shape, dtype: DType, device: str) -> str | None:
    return None if device == "cpu" else "gloo cases run on CPU tensors (on GPUs the suite runs NCCL)"


def _family(op: str) -> OpFamily:
    if op in UNEVEN:
        family = OpFamily(name=op, shape_type=AllToAllVShape, flops=flops, bytes=alltoallv_bytes,
                          inputs=alltoallv_inputs, reference=alltoallv_reference, dtypes=("bf16", "fp16", "fp32"),
                          shape_id=alltoallv_id, describe=describe_alltoallv)
    else:
        family = OpFamily(name=op, shape_type=CollectiveShape, flops=flops, bytes=bytes_moved,
                          inputs=partial(inputs, op), reference=partial(reference, op),
                          dtypes=("bf16", "fp16", "fp32"), shape_id=shape_id)
    call, name = _CALLS[op]

    def prepare(inp: dict, dtype: DType, pass_: str):
        return partial(call, inp)
    # The backend is the process group's: NCCL when the run is on GPUs, gloo on CPUs.
    family.backend("nccl", impl=f"{name}, NCCL process group", requires=needs_cuda)(prepare)
    family.backend("gloo", impl=f"{name}, gloo process group", requires=needs_cpu)(prepare)
    return family


ALLREDUCE = _family("allreduce")
ALLGATHER = _family("allgather")
REDUCESCATTER = _family("reducescatter")
ALLTOALL = _family("alltoall")
BROADCAST = _family("broadcast")
ALLTOALLV = _family("alltoallv")
