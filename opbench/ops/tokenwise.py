"""Shapes of the token-wise ops a decoder layer plans: norms, residual adds, activations, rotary,
embedding lookup, the LM-head loss and the optimizer step."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RowsShape:
    """tokens rows of `width` elements: norms, residual adds, activations (width: their output)."""
    tokens: int
    width: int


@dataclass(frozen=True)
class RotaryShape:
    """Rotary embedding applied to q (heads) and k (kv_heads) of `tokens` tokens."""
    tokens: int
    heads: int
    kv_heads: int
    head_dim: int
    interleaved: int  # 0: half rotation (GPT-NeoX, Llama); 1: interleaved pairs (GPT-J)


@dataclass(frozen=True)
class VocabShape:
    """Rows over a vocabulary: embedding lookup (width = hidden) and the LM-head loss (width = vocab)."""
    tokens: int
    width: int
    vocab: int


@dataclass(frozen=True)
class ParamsShape:
    """An optimizer step over `params` parameters."""
    params: int
