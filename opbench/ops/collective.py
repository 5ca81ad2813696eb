"""Collective shapes, sized as nccl-tests sizes them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CollectiveShape:
    size_bytes: int  # the full buffer S of nccl-tests (the all-gather output, the reduce-scatter input)
    world: int  # ranks taking part
