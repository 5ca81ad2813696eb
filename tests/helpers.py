"""Running the suite the way a user does: pytest in a subprocess from the repository root; Triton's
autotuning under the interpreter."""

import itertools
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_python(*args: str, extra_path: Path | None = None, env: dict | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.pop("TRITON_INTERPRET", None)  # the suite decides; tests/conftest.py sets it for in-process kernels
    if extra_path is not None:
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_path), full_env.get("PYTHONPATH")]))
    full_env.update(env or {})
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def run_pytest(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return run_python("-m", "pytest", *args, **kwargs)


def run_torchrun(nproc: int, *args: str, launcher: tuple[str, ...] = (), **kwargs) -> subprocess.CompletedProcess:
    """torchrun (python -m torch.distributed.run) on this machine; --standalone picks a free port."""
    return run_python("-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *launcher,
                      "-m", "pytest", *args, **kwargs)


def twin_autotuner(tuned):
    """A copy of the Triton autotuner `tuned` (its configs, key, pruning and zeroed arguments) that runs
    under TRITON_INTERPRET=1: its clock runs each config once, as a benchmark would, and finds each
    faster than the one before, so that the last config left after pruning is kept. Its `cache` maps
    each key it tuned for to that config. (Triton's autotune listener cannot serve: it fails on
    interpreted kernels.)"""
    import triton

    times = itertools.count(1000.0, -1.0)

    def clock(kernel_call, quantiles):
        kernel_call()
        return [next(times)] * 3

    return triton.autotune(configs=tuned.configs, key=tuned.keys, reset_to_zero=tuned.reset_to_zero,
                           prune_configs_by={"early_config_prune": tuned.early_config_prune},
                           do_bench=clock)(tuned.fn)
