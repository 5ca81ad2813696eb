"""Rotary position embedding of q and k, RotaryShape(tokens, heads, kv_heads, head_dim, interleaved, offset).

q and k are the views of the fused qkv projection's output that attention reads, (tokens, heads,
head_dim) and (tokens, kv_heads, head_dim); they are rotated into new tensors. Each pair of
dimensions (i, i + head_dim/2) in the half-rotation layout (GPT-NeoX, Llama), (2i, 2i + 1) in the
interleaved one (GPT-J), turns by the angle position x base^(-2i / head_dim), read from cos and sin
tables (positions, head_dim/2) by each token's position. The backward turns the output gradients back.
"""

from __future__ import annotations

import torch

from opbench.ops.dtypes import DType
from opbench.ops.base import OpFamily, needs_flash_attn, needs_triton_gpu
from opbench.ops.tokenwise import Grads, RotaryShape, eager_and_compiled, reference

BASE = 10000.0
GRADS = Grads(outputs=("dq", "dk"), wrt=("q", "k"))


def shape_id(s: RotaryShape) -> str:
    """t4h6kv2d32p199: tokens, heads, kv heads, head_dim, then "i" when interleaved, p and the offset."""
    return (f"t{s.tokens}h{s.heads}kv{s.kv_heads}d{s.head_dim}" + ("i" if s.interleaved else "")
            + (f"p{s.offset}" if s.offset else ""))


def positions(s: RotaryShape, device: str) -> torch.Tensor:
    """Each token's position: 0, 1, ... for prompts and training; `offset` for every decode token."""
    if s.offset:
        return torch.full((s.tokens,), s.offset, device=device, dtype=torch.int64)
    return torch.arange(s.tokens, device=device)


def _rotated(s: RotaryShape) -> int:
    """Elements rotated: q and k of every token."""
    return s.tokens * (s.heads + s.kv_heads) * s.head_dim


def flops(s: RotaryShape, pass_: str = "fwd") -> int:
    """3 per element: a pair costs 4 multiplies and 2 adds. The backward is the same rotation."""
    return 3 * _rotated(s)


def bytes_moved(s: RotaryShape, dtype: DType, pass_: str = "fwd") -> int:
    """q and k read, their rotations written; the cos and sin rows of the positions present (one
    for decode, whose tokens share a position), head_dim/2 each; int64 positions."""
    rows = 1 if s.offset else s.tokens
    return (2 * _rotated(s) + rows * s.head_dim) * dtype.bytes + 8 * s.tokens


def inputs(s: RotaryShape, dtype: DType, pass_: str, device: str) -> dict:
    t, h, kv, d = s.tokens, s.heads, s.kv_heads, s.head_dim
    qkv = torch.randn(t, (h + 2 * kv) * d, device=device, dtype=dtype.torch)
    table = max(t, s.offset + 1)  # positions covered by the tables
    angles = torch.outer(torch.arange(table, device=device, dtype=torch.float64),
                         BASE ** (-torch.arange(0, d, 2, device=device, dtype=torch.float64) / d))
    inp = {"q": qkv[:, :h * d].view(t, h, d), "k": qkv[:, h * d:(h + kv) * d].view(t, kv, d),
           "cos": angles.cos().to(dtype.torch), "sin": angles.sin().to(dtype.torch),
           "positions": positions(s, device), "interleaved": bool(s.interleaved)}
    if pass_ == "bwd":
        inp.update(dq=torch.randn(t, h, d, device=device, dtype=dtype.torch),
                   dk=torch.randn(t, kv, d, device=device, dtype=dtype.torch))
    return inp


def _turned(x, cos, sin, interleaved: bool):
    """x rotated: complex multiplication for interleaved pairs, rotate-half for the NeoX layout."""
    if interleaved:
        pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
        return torch.view_as_real(pairs * torch.complex(cos, sin)).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return x * torch.cat((cos, cos), -1) + torch.cat((-x2, x1), -1) * torch.cat((sin, sin), -1)


def rotary_formula(q, k, cos, sin, positions, interleaved):
    cos, sin = cos[positions][:, None, :], sin[positions][:, None, :]
    return _turned(q, cos, sin, interleaved), _turned(k, cos, sin, interleaved)


ROTARY = OpFamily(name="rotary", shape_type=RotaryShape, flops=flops, bytes=bytes_moved, inputs=inputs,
                  reference=reference(rotary_formula, GRADS), shape_id=shape_id)


def torch_rotary(q, k, cos, sin, positions, interleaved):
    """The eager form most model code has: gather cos/sin by position, then x cos + swap(x) sin."""
    cos, sin = cos[positions][:, None, :], sin[positions][:, None, :]

    def turn(x):
        if interleaved:
            x1, x2 = x[..., 0::2], x[..., 1::2]
            return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return turn(q), turn(k)


eager_and_compiled(ROTARY, torch_rotary, GRADS, "eager torch ops (gather cos/sin, multiply, cat)")


@ROTARY.backend("triton", impl="opbench/kernels/rotary.py: rotary (backward: the conjugate rotation)",
                requires=needs_triton_gpu)
def rotary_triton(inp: dict, dtype: DType, pass_: str):
    from opbench.kernels.rotary import rotary

    cos, sin, pos, interleaved = inp["cos"], inp["sin"], inp["positions"], inp["interleaved"]
    q, k = (inp["q"], inp["k"]) if pass_ == "fwd" else (inp["dq"], inp["dk"])
    conjugate = pass_ == "bwd"
    return lambda: (rotary(q, cos, sin, pos, interleaved=interleaved, conjugate=conjugate),
                    rotary(k, cos, sin, pos, interleaved=interleaved, conjugate=conjugate))


@ROTARY.backend("flash-attn", impl="flash_attn.ops.triton.rotary.apply_rotary (backward: conjugate=True)",
                requires=needs_flash_attn)
def rotary_flash_attn(inp: dict, dtype: DType, pass_: str):
    from flash_attn.ops.triton.rotary import apply_rotary

    cos, sin, interleaved = inp["cos"], inp["sin"], inp["interleaved"]
    # flash-attn takes (batch, seqlen, heads, head_dim) and a start position: one sequence from 0
    # (prompts), or one token per sequence at the decode offset, which is then every token's position.
    offset = int(inp["positions"][0])
    q, k = (inp["q"], inp["k"]) if pass_ == "fwd" else (inp["dq"], inp["dk"])
    q4, k4 = (x.unsqueeze(1) if offset else x.unsqueeze(0) for x in (q, k))

    def call():
        return tuple(apply_rotary(x, cos, sin, seqlen_offsets=offset, interleaved=interleaved,
                                  conjugate=pass_ == "bwd").flatten(0, 1) for x in (q4, k4))
    return call
