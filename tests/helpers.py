"""Running the suite the way a user does: pytest in a subprocess from the repository root."""

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
