"""The vocabulary ends of the model, VocabShape(tokens, width, vocab).

embedding      out = weight[ids] with width = hidden and vocab = the table rows this GPU holds (its
               slice under tensor parallelism; every id falls in it). Backward: the table's dense
               gradient, zeros(vocab, hidden) with dy's rows added at the ids.
cross_entropy  per-token loss = logsumexp(logits) - logits[target] over the LM head's logits, width =
               this GPU's slice of the vocabulary. Backward: dlogits = (softmax - onehot) x dloss.
               Under tensor parallelism the loss also all-reduces row maxima, sums and target logits;
               those collectives are not part of this op.
The loss is per token (reduction "none"), so every row is checked; a trainer's mean of it is one
more small reduction. At large vocabularies the logits are the largest activation of a training
step, and an fp32 copy of them (as `logits.float()` makes) is the memory cost to avoid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from opbench.ops.dtypes import DType
from opbench.ops.base import OpFamily, needs_triton_gpu
from opbench.ops.tokenwise import Grads, VocabShape, eager_and_compiled, reference

INDEX_BYTES = 8  # int64 ids and targets
EMBEDDING_GRADS = Grads(outputs=("dy",), wrt=("weight",))
LOSS_GRADS = Grads(outputs=("dloss",), wrt=("logits",))


# Embedding ------------------------------------------------------------------------------------------

def embedding_flops(s: VocabShape, pass_: str = "fwd") -> int:
    """fwd: a gather, no arithmetic. bwd: one add per gradient element."""
    return 0 if pass_ == "fwd" else s.tokens * s.width


def embedding_bytes(s: VocabShape, dtype: DType, pass_: str = "fwd") -> int:
    """fwd: ids and the T rows they select read, the output written: 2TW b + 8T. bwd: ids and dy read,
    the dense table gradient written: (TW + VW) b + 8T."""
    t, w, v = s.tokens, s.width, s.vocab
    rows = 2 * t * w if pass_ == "fwd" else t * w + v * w
    return rows * dtype.bytes + INDEX_BYTES * t


def embedding_inputs(s: VocabShape, dtype: DType, pass_: str, device: str) -> dict:
    inp = {"ids": torch.randint(0, s.vocab, (s.tokens,), device=device),
           "weight": torch.randn(s.vocab, s.width, device=device, dtype=dtype.torch)}
    if pass_ == "bwd":
        inp["dy"] = torch.randn(s.tokens, s.width, device=device, dtype=dtype.torch)
    return inp


def embedding_formula(ids, weight):
    return weight[ids]


EMBEDDING = OpFamily(name="embedding", shape_type=VocabShape, flops=embedding_flops, bytes=embedding_bytes,
                     inputs=embedding_inputs, reference=reference(embedding_formula, EMBEDDING_GRADS))


def torch_embedding(ids, weight):
    return F.embedding(ids, weight)


eager_and_compiled(EMBEDDING, torch_embedding, EMBEDDING_GRADS, "torch.nn.functional.embedding")


# Cross-entropy --------------------------------------------------------------------------------------

def cross_entropy_flops(s: VocabShape, pass_: str = "fwd") -> int:
    """4 per logit: fwd max, subtract, exp, add; bwd subtract the logsumexp, exp, subtract the
    one-hot, times dloss."""
    return 4 * s.tokens * s.width


def cross_entropy_bytes(s: VocabShape, dtype: DType, pass_: str = "fwd") -> int:
    """fwd: logits and targets read, fp32 losses written: TW b + 12T. bwd: logits, targets and fp32
    dloss read, dlogits written: 2TW b + 12T."""
    t = s.tokens
    logits = t * s.width * dtype.bytes
    return (logits if pass_ == "fwd" else 2 * logits) + (INDEX_BYTES + 4) * t


def cross_entropy_inputs(s: VocabShape, dtype: DType, pass_: str, device: str) -> dict:
    inp = {"logits": torch.randn(s.tokens, s.width, device=device, dtype=dtype.torch),
           "targets": torch.randint(0, s.width, (s.tokens,), device=device)}
    if pass_ == "bwd":
        inp["dloss"] = torch.randn(s.tokens, device=device, dtype=torch.float32)
    return inp


def cross_entropy_formula(logits, targets):
    return torch.logsumexp(logits, dim=-1) - logits.gather(-1, targets[:, None])[:, 0]


CROSS_ENTROPY = OpFamily(name="cross_entropy", shape_type=VocabShape, flops=cross_entropy_flops,
                         bytes=cross_entropy_bytes, inputs=cross_entropy_inputs,
                         reference=reference(cross_entropy_formula, LOSS_GRADS))


def torch_cross_entropy(logits, targets):
    return F.cross_entropy(logits, targets, reduction="none")


eager_and_compiled(CROSS_ENTROPY, torch_cross_entropy, LOSS_GRADS,
                   "torch.nn.functional.cross_entropy(reduction='none') on the logits' dtype")


@CROSS_ENTROPY.backend("triton", impl="opbench/kernels/cross_entropy.py: chunked online softmax; backward in place "
                                      "over the logits, in their dtype", requires=needs_triton_gpu)
def cross_entropy_triton(inp: dict, dtype: DType, pass_: str):
    from opbench.kernels.cross_entropy import cross_entropy, cross_entropy_backward

    logits, targets = inp["logits"], inp["targets"]
    if pass_ == "fwd":
        return lambda: cross_entropy(logits, targets)[0]
    lse = cross_entropy(logits, targets)[1]
    # The backward overwrites its logits, so it gets a copy; after the first call it rewrites
    # gradients, which costs the same.
    buffer = logits.clone()
    return lambda: cross_entropy_backward(inp["dloss"], buffer, targets, lse, inplace=True)
