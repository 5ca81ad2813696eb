"""The optimizer step: AdamW over the parameters one GPU updates, ParamsShape(params).

Mixed-precision training keeps fp32 master weights, fp32 gradients and fp32 moments, so the step
runs in fp32 whatever the workload's dtype (the family's runs_in). The parameters come as TENSORS
tensors of near-equal size, about as many as a decoder layer hands the optimizer, so that the
multi-tensor (foreach) and fused implementations batch over tensors as they do in training.
"""

from __future__ import annotations

import torch

from opbench.ops.dtypes import DType
from opbench.ops.base import OpFamily, high_precision
from opbench.ops.tokenwise import ParamsShape

TENSORS = 8
# lr is 1 so that the correctness gate, which compares the updated parameters, sees the update
# itself: at a training lr the update is below the tolerance. The cost does not depend on it.
LR, BETAS, EPS, WEIGHT_DECAY = 1.0, (0.9, 0.95), 1e-8, 0.1
STEPS_TAKEN = 10  # the bias corrections of step 11 are far from 0 and 1


def flops(s: ParamsShape, pass_: str = "fwd") -> int:
    """14 per parameter: weight decay 1, first moment 3, second moment 4, denominator (sqrt, bias
    correction, eps) 3, update (divide, times step size, subtract) 3."""
    return 14 * s.params


def bytes_moved(s: ParamsShape, dtype: DType, pass_: str = "fwd") -> int:
    """Parameter, gradient and both moments read; parameter and moments written: 7 x params x b."""
    return 7 * s.params * dtype.bytes


def tensor_sizes(s: ParamsShape) -> list[int]:
    base, extra = divmod(s.params, TENSORS)
    return [n for n in (base + (i < extra) for i in range(TENSORS)) if n]


def inputs(s: ParamsShape, dtype: DType, pass_: str, device: str) -> dict:
    def each(make):
        return [make(n, device=device, dtype=dtype.torch) for n in tensor_sizes(s)]
    # the second moment is a running mean of squares: positive
    return {"params": each(torch.randn), "grads": each(torch.randn), "exp_avg": each(torch.randn),
            "exp_avg_sq": [v + 0.1 for v in each(torch.rand)]}


def reference(inp: dict, dtype: DType, pass_: str) -> tuple[torch.Tensor, ...]:
    """The updated parameters, by torch.optim.AdamW's documented algorithm."""
    step = STEPS_TAKEN + 1
    (beta1, beta2), out = BETAS, []
    for p, g, m, v in zip(*(map(high_precision, inp[k]) for k in ("params", "grads", "exp_avg", "exp_avg_sq"))):
        p = p * (1 - LR * WEIGHT_DECAY)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        denominator = v.sqrt() / (1 - beta2 ** step) ** 0.5 + EPS
        out.append(p - LR / (1 - beta1 ** step) * m / denominator)
    return tuple(out)


ADAMW = OpFamily(name="adamw", shape_type=ParamsShape, flops=flops, bytes=bytes_moved, inputs=inputs,
                 reference=reference, dtypes=("fp32",), runs_in="fp32")


def _adamw_step(inp: dict, fused: bool):
    """A torch AdamW over copies of the parameters and moments, STEPS_TAKEN steps in; returns a call
    of one step that gives the updated parameters."""
    params = [p.clone() for p in inp["params"]]
    for p, g in zip(params, inp["grads"]):
        p.grad = g
    device = params[0].device
    capturable = device.type == "cuda"  # the step count stays on the GPU, so a CUDA graph can hold the step
    optimizer = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                                  capturable=capturable, fused=fused, foreach=not fused)
    step_device = device if capturable or fused else "cpu"  # where torch.optim keeps it for each mode
    for p, m, v in zip(params, inp["exp_avg"], inp["exp_avg_sq"]):
        optimizer.state[p] = {"step": torch.tensor(float(STEPS_TAKEN), device=step_device),
                              "exp_avg": m.clone(), "exp_avg_sq": v.clone()}

    def step():
        optimizer.step()
        return tuple(params)
    return step


@ADAMW.backend("torch-fused", impl="torch.optim.AdamW(fused=True)")
def adamw_fused(inp: dict, dtype: DType, pass_: str):
    return _adamw_step(inp, fused=True)


@ADAMW.backend("torch-foreach", impl="torch.optim.AdamW(foreach=True)")
def adamw_foreach(inp: dict, dtype: DType, pass_: str):
    return _adamw_step(inp, fused=False)
