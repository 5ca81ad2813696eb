"""Where compiled kernels persist between runs, so that a second run on the same machine skips most
of its compilation.

Triton keeps every compiled kernel in TRITON_CACHE_DIR and inductor its generated code and compiled
FX graphs in TORCHINDUCTOR_CACHE_DIR, both keyed by source, compiler version and GPU architecture,
so a cached artifact is exactly what a compile would produce again. Left unset, inductor's cache lives
under /tmp (gone at the next reboot) and Triton's under it too for the kernels inductor generates;
the suite points both into one folder that stays: $OPBENCH_CACHE_DIR, else $XDG_CACHE_HOME/opbench,
else ~/.cache/opbench. Variables already set are left as they are.

Autotuning results are not cached on disk by default: Triton keys them by architecture, not by GPU
model, and two models of one architecture (H100 PCIe and SXM) may tune differently. Set
TRITON_CACHE_AUTOTUNING=1 to keep them where the cache folder serves one GPU model.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from pathlib import Path


def cache_root(env: MutableMapping[str, str] = os.environ) -> Path:
    if env.get("OPBENCH_CACHE_DIR"):
        return Path(env["OPBENCH_CACHE_DIR"])
    base = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "opbench"


def use_persistent_caches(env: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Point Triton's and inductor's caches into cache_root (unless set already) and keep inductor's
    FX graph cache on; returns the variables as they now are. Call before anything compiles."""
    root = cache_root(env)
    env.setdefault("TRITON_CACHE_DIR", str(root / "triton"))
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))
    env.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    return {k: env[k] for k in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE")}
