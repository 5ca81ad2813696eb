"""Token-wise ops: norms, residual adds, activations, rotary, embedding lookup, the LM-head loss and the
optimizer step. Their shapes, and what their families share: the backward pass of a torch function
through autograd, the reference of a formula in high precision, torch.compile for one case.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from opbench.ops.base import RECOMPILE_LIMIT, allow_recompiles, high_precision, needs_compile_gpu


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
    # 0: prompts and training, token t at position t. Decode: the cached context before the new tokens,
    # one token per sequence, all at position `offset`.
    offset: int = 0


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


@dataclass(frozen=True)
class Grads:
    """An op's backward: the gradients of its outputs, inputs named in `outputs` (in the order the
    forward returns them), flow back to the inputs named in `wrt`."""
    outputs: tuple[str, ...]
    wrt: tuple[str, ...]


def autograd_pass(forward: Callable[..., Any], inp: dict, pass_: str, grads: Grads) -> Callable[[], Any]:
    """A call of one pass of `forward` (keyword arguments: the inputs but the output gradients).

    fwd: forward itself. bwd: forward runs once here, on leaf copies of the `wrt` inputs, and the call
    is autograd's backward alone, keeping the graph (retain_graph) for the next call.
    """
    args = {k: v for k, v in inp.items() if k not in grads.outputs}
    if pass_ == "fwd":
        return lambda: forward(**args)
    leaves = {k: args[k].detach().requires_grad_() for k in grads.wrt}
    out = forward(**{**args, **leaves})
    outs = out if isinstance(out, tuple) else (out,)
    cotangents = tuple(inp[k] for k in grads.outputs)
    wrt = tuple(leaves.values())
    return lambda: torch.autograd.grad(outs, wrt, cotangents, retain_graph=True)


def reference(formula: Callable[..., Any], grads: Grads) -> Callable[[dict, Any, str], Any]:
    """An OpFamily reference: `formula`'s pass (see autograd_pass) on the inputs in high precision;
    integer tensors and flags pass as they are."""
    def ref(inp: dict, dtype, pass_: str):
        precise = {k: high_precision(v) if torch.is_tensor(v) and v.is_floating_point() else v
                   for k, v in inp.items()}
        return autograd_pass(formula, precise, pass_, grads)()
    return ref


_COMPILES: Counter = Counter()  # cases compiled per function since dynamo's caches were last reset


def compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """torch.compile of fn for one case, at the case's static shapes. What earlier cases compiled is
    kept (dynamo's limits are raised to RECOMPILE_LIMIT): other functions' code, FlexAttention's
    among them, and fn's own at other shapes and passes, which a later case at the same shape and
    pass reuses. Only when fn nears the limit are dynamo's caches reset, since past it dynamo would
    run fn eagerly; the cases after a reset recompile from inductor's FX graph cache."""
    allow_recompiles()
    if _COMPILES[fn] >= RECOMPILE_LIMIT - 8:  # a case may add a few entries (forward, backward)
        torch._dynamo.reset()
        _COMPILES.clear()
    _COMPILES[fn] += 1
    return torch.compile(fn, dynamic=False)


def eager_and_compiled(family, eager: Callable[..., Any], grads: Grads, what: str) -> None:
    """Register a torch function as the family's "torch" backend and, compiled, its "compile" backend;
    both take their backward from autograd. `what` names the eager op in the backends' impl."""
    @family.backend("torch", impl=f"{what}; backward: autograd")
    def torch_backend(inp: dict, dtype, pass_: str):
        return autograd_pass(eager, inp, pass_, grads)

    @family.backend("compile", impl=f"torch.compile({what}); backward: autograd", requires=needs_compile_gpu)
    def compile_backend(inp: dict, dtype, pass_: str):
        return autograd_pass(compiled(eager), inp, pass_, grads)
