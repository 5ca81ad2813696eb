"""The process group of a collectives run: how it was launched, starting it with clear errors, and the
agreements every rank must reach so that none waits on a collective another never issues.

torchrun (also run by srun on each node of a Slurm job) starts one pytest per rank with RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK, GROUP_WORLD_SIZE, MASTER_ADDR and MASTER_PORT
set. Without them pytest runs a world of one.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re
import socket
import sys
import traceback
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0
# Environment variables that change how collectives run; the JSON records every one that is set.
_TUNING_PREFIXES = ("NCCL_", "TORCH_NCCL_", "GLOO_")


class DistributedError(RuntimeError):
    """A process group that cannot form or broke; the message says what to check."""


@dataclass(frozen=True)
class Launch:
    """How this process was started, read from the launcher's environment."""
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int  # ranks on this node
    nodes: int
    endpoint: str | None  # MASTER_ADDR:MASTER_PORT, the store every rank meets at
    launcher: str  # "torchrun", "env" (RANK and WORLD_SIZE set some other way) or "none" (a world of one)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Launch:
        if "RANK" not in env or "WORLD_SIZE" not in env:
            return cls(0, 1, 0, 1, 1, None, "none")
        world = int(env["WORLD_SIZE"])
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
        return cls(rank=int(env["RANK"]), world_size=world, local_rank=int(env.get("LOCAL_RANK", 0)),
                   local_world_size=local_world, nodes=int(env.get("GROUP_WORLD_SIZE", max(1, world // local_world))),
                   endpoint=f"{env.get('MASTER_ADDR', '?')}:{env.get('MASTER_PORT', '?')}",
                   launcher="torchrun" if "TORCHELASTIC_RUN_ID" in env else "env")

    @property
    def distributed(self) -> bool:
        return self.launcher != "none"

    def describe(self) -> str:
        if not self.distributed:
            return ("a world of one rank (not launched by torchrun; "
                    "`torchrun --nproc-per-node=N -m pytest collectives/` runs N ranks)")
        return (f"world of {self.world_size} ranks: {self.nodes} node(s) x {self.local_world_size} ranks, "
                f"launched by {self.launcher}, store at {self.endpoint}")


def is_reporting_rank(env: Mapping[str, str] = os.environ) -> bool:
    """Rank 0 (or a process outside any launcher) reports; under torchrun every rank runs pytest."""
    return env.get("RANK", "0") == "0"


@dataclass(frozen=True)
class GpuPlacement:
    rank: int
    host: str
    index: int  # CUDA device index as the rank sees it
    uuid: str


def shared_gpus(placements: Iterable[GpuPlacement], visible: int) -> str | None:
    """Why these ranks cannot run NCCL (two of them on one GPU), or None."""
    owners: dict[tuple[str, str], list[GpuPlacement]] = {}
    for p in placements:
        owners.setdefault((p.host, p.uuid), []).append(p)
    for (host, uuid), ps in owners.items():
        if len(ps) > 1:
            ranks = " and ".join(str(p.rank) for p in sorted(ps, key=lambda p: p.rank))
            per_node = sum(len(v) for (h, _), v in owners.items() if h == host)
            return (f"ranks {ranks} share GPU {ps[0].index} ({uuid}) on {host}: NCCL needs one GPU per rank. "
                    f"{per_node} ranks run on this node but each sees {visible} GPU(s): start at most "
                    f"--nproc-per-node={visible}, or make more GPUs visible (CUDA_VISIBLE_DEVICES)")
    return None


def first_line(error: BaseException) -> str:
    """An error's first line, without the source location and the advice gloo's errors carry."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = re.sub(r"^\[[^\]]*\]\s*", "", lines[0]) if lines else type(error).__name__
    return text.split(" This is typically caused by")[0].rstrip(". ")[:300]


def _rendezvous(launch: Launch, timeout_s: float) -> dist.Store:
    try:
        store, _, _ = next(dist.rendezvous("env://", timeout=datetime.timedelta(seconds=timeout_s)))
    except (RuntimeError, ValueError) as error:  # DistStoreError, DistNetworkError, a bad MASTER_PORT
        raise DistributedError(
            f"rendezvous at {launch.endpoint} (MASTER_ADDR:MASTER_PORT) did not complete within {timeout_s:g} s "
            f"({first_line(error)}). Rank {launch.rank} of {launch.world_size} waited: check that every rank "
            f"was started (torchrun --nnodes and --nproc-per-node on every node) and that {launch.endpoint} "
            f"is reachable from every node; --dist-timeout sets the wait") from None
    return store


def _check_one_gpu_per_rank(store: dist.Store, launch: Launch, device: torch.device, timeout_s: float) -> None:
    """NCCL fails obscurely (or hangs) when two ranks share a GPU; compare this node's ranks first."""
    uuid = str(torch.cuda.get_device_properties(device).uuid)
    store.set(f"opbench/gpu/{launch.rank}", f"{socket.gethostname()} {device.index} {uuid}")
    first = launch.rank - launch.local_rank  # torchrun numbers a node's ranks consecutively
    placements = []
    for r in range(first, first + launch.local_world_size):
        try:
            host, index, gpu = store.get(f"opbench/gpu/{r}").decode().split(" ", 2)
        except RuntimeError as error:
            raise DistributedError(f"rank {r} on this node did not say which GPU it uses within {timeout_s:g} s "
                                   f"({first_line(error)})") from None
        placements.append(GpuPlacement(r, host, int(index), gpu))
    reason = shared_gpus(placements, torch.cuda.device_count())
    if reason:
        raise DistributedError(reason)


@dataclass(frozen=True)
class World:
    """A started process group, and what every rank must agree on."""
    launch: Launch
    backend: str  # "nccl" or "gloo"
    device: torch.device  # where this rank's buffers live
    timeout_s: float
    hosts: tuple[str, ...]  # host of each rank

    @property
    def rank(self) -> int:
        return self.launch.rank

    @property
    def size(self) -> int:
        return self.launch.world_size

    def layout(self) -> dict:
        """For machine_info: the world's shape, the launcher's variables and the collective tuning set."""
        per_host: dict[str, int] = {}
        for host in self.hosts:
            per_host[host] = per_host.get(host, 0) + 1
        return launch_layout(self.launch) | {
            "backend": self.backend, "nodes": len(per_host), "ranks_per_node": sorted(set(per_host.values())),
            "hosts": sorted(per_host), "timeout_s": self.timeout_s}

    def _reduce(self, values: list[float], op, dtype=torch.float64) -> list:
        t = torch.tensor(values, dtype=dtype, device=self.device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def max(self, *values: float) -> list[float]:
        """Each value's maximum over the ranks."""
        return self._reduce(list(values), dist.ReduceOp.MAX)

    def barrier(self) -> None:
        """Every rank here before any goes on; on GPUs the device too, so timing starts together."""
        dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def gather(self, value: float) -> list[float]:
        """Every rank's value, in rank order."""
        slots = [0.0] * self.size
        slots[self.rank] = value
        return self._reduce(slots, dist.ReduceOp.SUM)

    def agree(self, reason: str | None) -> str | None:
        """Any rank's reason not to run a case, on every rank: ranks skip together or not at all."""
        first = int(self._reduce([self.rank if reason else self.size], dist.ReduceOp.MIN)[0])
        if first == self.size:
            return None
        box = [reason]
        dist.broadcast_object_list(box, src=first, device=self.device)
        return box[0] if self.size == 1 else f"rank {first}: {box[0]}"

    def check_same_tests(self, nodeids: Iterable[str]) -> None:
        """Ranks must run the same sequence; different files or options would deadlock at the first difference."""
        digest = hashlib.sha256("\n".join(nodeids).encode()).digest()
        mine = int.from_bytes(digest[:7], "big")  # fits int64
        high, minus_low = self._reduce([mine, -mine], dist.ReduceOp.MAX, torch.int64)
        if high != -minus_low:
            raise DistributedError("the ranks collected different tests: run the same command, with the same "
                                   "files and options, on every node")

    @contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Turn any error into a DistributedError that ends the session (see stop): the other ranks
        would wait for this one in the next collective, so going on helps nobody."""
        try:
            yield
        except Exception as error:
            reason = self.explain(error)
            if reason is None:  # this rank's own error: its traceback says where
                traceback.print_exc()
                reason = first_line(error)
            raise DistributedError(f"{what} failed on rank {self.rank}: {reason}") from None

    def explain(self, error: BaseException) -> str | None:
        """What a collective's error says about the other ranks, or None when it is not about them."""
        text = first_line(error)
        lowered = text.lower()
        if "timed out" in lowered or "timeout" in lowered:
            return (f"no answer within the {self.timeout_s:g} s timeout (--dist-timeout): another rank hangs or "
                    f"stopped issuing collectives ({text})")
        if any(s in lowered for s in ("reset by peer", "closed by peer", "broken pipe", "connection refused")):
            return (f"another rank has stopped (its process died or its network failed); its own output, and "
                    f"torchrun's 'Root Cause' section, say why ({text})")
        return None


def launch_layout(launch: Launch) -> dict:
    """The world as the launcher describes it, and every collective tuning variable that is set."""
    return {
        "launcher": launch.launcher, "world_size": launch.world_size, "nodes": launch.nodes,
        "ranks_per_node": [launch.local_world_size], "endpoint": launch.endpoint,
        "env": {k: v for k, v in sorted(os.environ.items())
                if k in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                         "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "OMP_NUM_THREADS")
                or k.startswith(_TUNING_PREFIXES)},
    }


def start(launch: Launch, device_type: str, timeout_s: float) -> World:
    """Start the default process group: NCCL on GPUs (one per rank), gloo on CPUs."""
    backend = "nccl" if device_type == "cuda" else "gloo"
    store = _rendezvous(launch, timeout_s) if launch.distributed else dist.HashStore()
    device = torch.device("cpu")
    if backend == "nccl":  # a rank past the visible GPUs lands on a shared one, which the check names
        device = torch.device("cuda", launch.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        _check_one_gpu_per_rank(store, launch, device, timeout_s)
    try:
        dist.init_process_group(backend, store=store, rank=launch.rank, world_size=launch.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if backend == "nccl" else None)
        hosts: list = [None] * launch.world_size
        dist.all_gather_object(hosts, socket.gethostname())
    except RuntimeError as error:
        raise DistributedError(
            f"the {backend} process group of {launch.world_size} ranks did not form within {timeout_s:g} s "
            f"(store at {launch.endpoint}): {first_line(error)}. Check that the nodes reach each other on "
            f"the network interface NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME names") from None
    return World(launch, backend, device, timeout_s, tuple(hosts))


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def stop(message: str, config: pytest.Config) -> None:
    """End this rank's session with `message`, printed at once past pytest's capture (torchrun may end
    this process soon) and written where torchrun's failure summary shows it."""
    message = f"opbench: {message}"
    capture = config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else nullcontext():
        print(message, file=sys.stderr, flush=True)
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        try:  # the handler records the exception being handled
            raise DistributedError(message)
        except DistributedError as error:
            ErrorHandler().record_exception(error)
    pytest.exit(message, returncode=1)
