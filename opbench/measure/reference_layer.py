"""A Llama-style decoder layer, and a whole model of such layers, from plain torch ops.

Timed as one unit (bench/test_layer.py) to check what composition predicts from the op-by-op cases.
Shapes are one GPU's under tensor parallelism; the all-reduces are left out, as one GPU cannot run
them, and composition leaves them out of the comparison too. A layer is built for one kind of layer
(attention full or in a window, MLP dense or a mixture of experts); the mixture runs the eager ops
the MoE cases time: router, routing, permutation, grouped GEMMs, un-permutation with the weighted
combine, and shared experts as a dense MLP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from opbench.spec.models import ModelConfig
from opbench.spec.workload import Workload
from opbench.ops.grouped_gemm import grouped_linear
from opbench.ops.moe_permute import permute
from opbench.ops.moe_route import route
from opbench.ops.moe_unpermute import combine
from opbench.spec.plan import shard

ACTIVATIONS = {"swiglu": F.silu, "geglu": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu}


def supported(model: ModelConfig) -> str | None:
    """Why the reference layer cannot stand for this model, or None."""
    if model.mla:
        return "multi-head latent attention has no reference layer"
    if model.attention_sinks:
        return "attention sinks have no reference layer"
    return None


def _norm(model: ModelConfig, width: int) -> nn.Module:
    return nn.RMSNorm(width, eps=1e-5) if model.norm == "rmsnorm" else nn.LayerNorm(width, eps=1e-5)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x * cos + rotate(x) * sin, cos and sin already laid out per element (rope_tables)."""
    if interleaved:  # GPT-J: pairs (x0, x1), (x2, x3), ...
        pairs = x.unflatten(-1, (-1, 2))
        rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    else:  # GPT-NeoX / Llama: the two halves rotate together
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class MLP(nn.Module):
    def __init__(self, model: ModelConfig, width: int):
        super().__init__()
        self.gated = model.gated
        self.gate_up = nn.Linear(model.hidden, (2 if model.gated else 1) * width, bias=False)
        self.down = nn.Linear(width, model.hidden, bias=False)
        self.act = ACTIVATIONS[model.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = self.gate_up(x)
        if self.gated:
            gate, up = up.chunk(2, dim=-1)
            return self.down(self.act(gate) * up)
        return self.down(self.act(up))


class MoE(nn.Module):
    """Routed experts (their widths sharded by tp, as the plan has them without expert parallelism) and
    shared experts. `pinned`: expert ids to use instead of the router's choice, so that a reference in
    another precision follows the same routes (a near tie may otherwise pick another expert)."""

    def __init__(self, model: ModelConfig, tp: int = 1):
        super().__init__()
        h, ffn, experts = model.hidden, model.expert_ffn // tp, model.experts
        self.model = model
        self.router = nn.Linear(h, experts, bias=False)
        self.w_gate_up = nn.Parameter(torch.randn(experts, (2 if model.gated else 1) * ffn, h) * h ** -0.5)
        self.w_down = nn.Parameter(torch.randn(experts, h, ffn) * ffn ** -0.5)
        self.act = ACTIVATIONS[model.activation]
        self.shared = MLP(model, model.shared_experts * model.shared_ffn // tp) if model.shared_experts else None
        self.pinned: torch.Tensor | None = None
        self.chosen: torch.Tensor | None = None  # the ids of the last forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        k = self.model.experts_per_token
        sigmoid = self.model.router == "sigmoid"
        weights, ids = route(self.router(x), k, sigmoid, self.model.router_norm)
        if self.pinned is not None:  # the pinned experts' weights, from this layer's own scores
            scores = self.router(x)
            scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
            scores = scores.sigmoid() if sigmoid else scores.softmax(dim=-1)
            ids, weights = self.pinned, scores.gather(1, self.pinned)
            weights = weights / weights.sum(dim=-1, keepdim=True) if self.model.router_norm else weights
        self.chosen = ids
        xs, row_of, offs = permute(x, ids, self.w_gate_up.shape[0])
        up = grouped_linear(xs, self.w_gate_up, offs)
        if self.model.gated:
            gate, up = up.chunk(2, dim=-1)
            hidden = self.act(gate) * up
        else:
            hidden = self.act(up)
        out = combine(grouped_linear(hidden, self.w_down, offs), row_of, weights)
        if self.shared is not None:
            out = out + self.shared(x)
        return out.view(shape)


class ReferenceLayer(nn.Module):
    def __init__(self, model: ModelConfig, tp: int = 1, kind: tuple[str, str] | None = None):
        """kind: (attention "full" | "window", MLP "dense" | "moe"); default: the first layer's."""
        super().__init__()
        dims = shard(model, tp)
        self.model, self.heads, self.kv_heads = model, dims.heads, dims.kv_heads
        self.kind = kind or next(iter(model.layer_kinds()))
        h, d = model.hidden, model.head_dim
        self.norm_input, self.norm_post_attn = _norm(model, h), _norm(model, h)
        self.qkv = nn.Linear(h, (dims.heads + 2 * dims.kv_heads) * d, bias=False)
        self.o = nn.Linear(dims.heads * d, h, bias=False)
        self.mlp = MoE(model, tp) if self.kind[1] == "moe" else MLP(model, dims.ffn)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x: (batch, q_len, hidden). cache: K and V of (batch, kv_heads, kv_len, head_dim) whose last
        q_len positions this call fills (inference: the prompt in prefill, one token in decode); None
        attends within x (training)."""
        b, s, _ = x.shape
        d = self.model.head_dim
        q, k, v = self.qkv(self.norm_input(x)).split([self.heads * d, self.kv_heads * d, self.kv_heads * d], -1)
        q = q.view(b, s, self.heads, d).transpose(1, 2)
        k = k.view(b, s, self.kv_heads, d).transpose(1, 2)
        v = v.view(b, s, self.kv_heads, d).transpose(1, 2)
        if rope is not None:
            interleaved = self.model.rotary == "gptj"
            q, k = _rotate(q, *rope, interleaved), _rotate(k, *rope, interleaved)
        if cache is not None:
            cache[0][:, :, -s:], cache[1][:, :, -s:] = k, v
            k, v = cache
        mask = self._mask(s, k.shape[2], x.device)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and s > 1,
                                              enable_gqa=self.heads != self.kv_heads)
        x = x + self.o(attn.transpose(1, 2).reshape(b, s, self.heads * d))
        return x + self.mlp(self.norm_post_attn(x))

    def _mask(self, q_len: int, kv_len: int, device) -> torch.Tensor | None:
        """Causal, aligned bottom-right, within the sliding window if any. None where SDPA's own
        is_causal says the same (square, or one query), so fused kernels stay eligible."""
        window = self.model.sliding_window if self.kind[0] == "window" else 0
        if (q_len == kv_len or q_len == 1) and not (window and window < kv_len):
            return None
        q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
        k_pos = torch.arange(kv_len, device=device)[None, :]
        mask = k_pos <= q_pos
        if window:
            mask &= k_pos > q_pos - window
        return mask


class ReferenceModel(nn.Module):
    """Embedding, the decoder layers, the final norm and the LM head (logits of the last position
    in inference, of every position in training, as the plan has it)."""

    def __init__(self, model: ModelConfig, tp: int = 1):
        super().__init__()
        dims = shard(model, tp)
        self.embed = nn.Embedding(dims.vocab, model.hidden)
        self.layers = nn.ModuleList(
            ReferenceLayer(model, tp, ("window" if model.window_layer(i) else "full",
                                       "moe" if model.moe_layer(i) else "dense"))
            for i in range(model.layers))
        self.norm = _norm(model, model.hidden)
        self.lm_head = nn.Linear(model.hidden, dims.vocab, bias=False)

    def forward(self, tokens: torch.Tensor, rope, caches=None, last_only: bool = True) -> torch.Tensor:
        x = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, caches[i] if caches is not None else None)
        x = self.norm(x)
        return self.lm_head(x[:, -1:] if last_only else x)


def rope_tables(model: ModelConfig, positions: torch.Tensor, dtype: torch.dtype):
    """cos and sin of (len(positions), head_dim), base 10000, each angle repeated where the layout
    pairs its elements (interleaved: side by side; half rotation: half a head apart), so a call
    multiplies and adds only; None for models without rotary."""
    if model.rotary == "none":
        return None
    half = model.head_dim // 2
    inv_freq = 1.0 / (10000 ** (torch.arange(half, device=positions.device, dtype=torch.float64) / half))
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    angles = angles.repeat_interleave(2, -1) if model.rotary == "gptj" else torch.cat((angles, angles), -1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def layer_inputs(model: ModelConfig, w: Workload, dtype: torch.dtype, device: str) -> dict:
    """Random activations (and a filled KV cache in decode) for one layer at workload w."""
    q_len = 1 if w.phase == "decode" else w.seq_len
    x = torch.randn(w.batch, q_len, model.hidden, device=device, dtype=dtype)
    positions = torch.arange(w.seq_len - q_len, w.seq_len, device=device)
    return {"x": x, "rope": rope_tables(model, positions, dtype), "cache": kv_cache(model, w, dtype, device)}


def kv_cache(model: ModelConfig, w: Workload, dtype: torch.dtype, device: str):
    """K and V of seq_len positions that inference writes its new tokens into (None in training)."""
    if w.training:
        return None
    kv = shard(model, w.tp).kv_heads
    return tuple(torch.randn(w.batch, kv, w.seq_len, model.head_dim, device=device, dtype=dtype) for _ in range(2))


def pin_routes(module: nn.Module, reference: nn.Module) -> None:
    """Make every MoE block of `reference` follow the routes `module`'s blocks chose in their last forward."""
    mine = [m for m in module.modules() if isinstance(m, MoE)]
    for m, r in zip(mine, [m for m in reference.modules() if isinstance(m, MoE)]):
        r.pinned = m.chosen
