"""The token-wise Triton kernels (kernels/norm.py, rotary.py, activation.py, cross_entropy.py) against
the op families' references, on the families' random inputs at odd widths and at row counts that
fill no block; backward passes against the references' autograd gradients.

On a machine without a GPU they run under TRITON_INTERPRET=1 (tests/conftest.py). The interpreter
computes bf16 arithmetic wrongly, so the kernels are tested in fp32 and fp16 only.
"""

import pytest
import torch

from opbench.kernels.activation import activation, activation_backward
from opbench.kernels.cross_entropy import cross_entropy, cross_entropy_backward
from opbench.kernels.norm import layer_norm, layer_norm_backward, rms_norm, rms_norm_backward
from opbench.kernels.rotary import rotary
from opbench.ops.dtypes import get_dtype
from opbench.ops import get_family, norm
from opbench.ops.tokenwise import RotaryShape, RowsShape, VocabShape
from opbench.measure.gate import check

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
WIDTHS = (4095, 5120, 14336)
TOLERANCE = {"fp32": 1e-5, "fp16": 3e-3}  # relative error (Frobenius)


def _inputs(op: str, shape, dtype: str, scale: dict | None = None) -> dict:
    """The family's backward inputs (a superset of the forward's), some scaled: {name: factor}."""
    inp = get_family(op).inputs(shape, get_dtype(dtype), "bwd", DEVICE)
    for name, factor in (scale or {}).items():
        inp[name] *= factor
    return inp


def _assert_matches(out, op: str, inp: dict, dtype: str, pass_: str) -> None:
    verdict = check(out, get_family(op).reference(inp, get_dtype(dtype), pass_), TOLERANCE[dtype])
    assert verdict.passed, verdict.as_dict()


@pytest.mark.parametrize("dtype", TOLERANCE)
@pytest.mark.parametrize("rows, width", list(zip((3, 5, 7), WIDTHS)))
def test_rms_norm(rows, width, dtype):
    inp = _inputs("rmsnorm", RowsShape(rows, width), dtype)
    x, weight = inp["x"], inp["weight"]
    out = rms_norm(x, weight, eps=norm.EPS, save_stats=True)
    _assert_matches(out.y, "rmsnorm", inp, dtype, "fwd")
    _assert_matches(rms_norm_backward(inp["dy"], x, weight, out.rstd), "rmsnorm", inp, dtype, "bwd")


@pytest.mark.parametrize("dtype", TOLERANCE)
@pytest.mark.parametrize("rows, width", list(zip((7, 3, 5), WIDTHS)))
def test_add_rms_norm(rows, width, dtype):
    """The fused residual: h = x + residual is written and normalised; dh joins the backward."""
    inp = _inputs("add_rmsnorm", RowsShape(rows, width), dtype)
    weight = inp["weight"]
    out = rms_norm(inp["x"], weight, eps=norm.EPS, residual=inp["residual"], save_stats=True)
    _assert_matches((out.y, out.residual), "add_rmsnorm", inp, dtype, "fwd")
    dx, dweight = rms_norm_backward(inp["dy"], out.residual, weight, out.rstd, dresidual=inp["dh"])
    _assert_matches((dx, dx, dweight), "add_rmsnorm", inp, dtype, "bwd")


@pytest.mark.parametrize("dtype", TOLERANCE)
@pytest.mark.parametrize("rows, width", list(zip((5, 7, 3), WIDTHS)))
def test_layer_norm(rows, width, dtype):
    inp = _inputs("layernorm", RowsShape(rows, width), dtype)
    inp["x"] += 3  # an offset mean, as real activations have, so that centring matters
    x, weight = inp["x"], inp["weight"]
    out = layer_norm(x, weight, inp["bias"], eps=norm.EPS, save_stats=True)
    _assert_matches(out.y, "layernorm", inp, dtype, "fwd")
    _assert_matches(layer_norm_backward(inp["dy"], x, weight, out.mean, out.rstd), "layernorm", inp, dtype, "bwd")


def test_norm_strided_rows():
    """Rows of a wider buffer (a row stride larger than the width) are read and written in place."""
    inp = _inputs("rmsnorm", RowsShape(5, 4095), "fp32")
    for name in ("x", "dy"):
        wide = torch.zeros(5, 4095 + 9, device=DEVICE)
        wide[:, :4095] = inp[name]
        inp[name] = wide[:, :4095]
    out = rms_norm(inp["x"], inp["weight"], eps=norm.EPS, save_stats=True)
    _assert_matches(out.y, "rmsnorm", inp, "fp32", "fwd")
    _assert_matches(rms_norm_backward(inp["dy"], inp["x"], inp["weight"], out.rstd), "rmsnorm", inp, "fp32", "bwd")


def _fused_residual_rows(kind: str, rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 x and residual. "constant": each row one value (zero variance), x + residual not an fp16
    number in most rows, so h rounds; "random": the usual normal rows."""
    if kind == "random":
        return tuple(torch.randn(rows, width, device=DEVICE, dtype=torch.float16) for _ in range(2))
    x, residual = (torch.randn(rows, 1, device=DEVICE, dtype=torch.float16).expand(rows, width).contiguous()
                   for _ in range(2))
    exact = x.double() + residual.double()
    assert (exact != (x + residual).double()).any(), "the inputs must round h"
    return x, residual


def _error(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor) -> float:
    """||got - want|| relative to ||want||, or to `scale` where want is about zero (the dweight of
    zero-variance rows)."""
    return ((got.double() - want).norm() / max(want.norm(), scale.double().norm())).item()


@pytest.mark.parametrize("kind", ("constant", "random"))
@pytest.mark.parametrize("width", (1, 7, 4096))
@pytest.mark.parametrize("op", ("layernorm", "rmsnorm"))
def test_fused_residual_norm_takes_its_statistics_from_h_as_stored(op, width, kind):
    """fp16 (the rounding of h to a 16-bit dtype is the point; the interpreter cannot run bf16) against
    float64. A LayerNorm row of zero variance (any row at width 1) has rstd = 1/sqrt(eps): statistics
    of the unrounded sum against the backward's rounded h made dweight wrong by half of ||dy||. RMSNorm
    has no centring, so its rstd is large only on rows near zero, where h's rounding is as small: it
    shares the inconsistency, not the amplification, and is held to the same bounds."""
    torch.manual_seed(width)
    rows = 13
    x, residual = _fused_residual_rows(kind, rows, width)
    weight, bias, dy, dh = (torch.randn(*size, device=DEVICE, dtype=torch.float16)
                            for size in ((width,), (width,), (rows, width), (rows, width)))
    leaves = [t.cpu().double().requires_grad_() for t in (x, residual, weight, bias)]
    h = leaves[0] + leaves[1]
    if op == "layernorm":
        out = layer_norm(x, weight, bias, eps=norm.EPS, residual=residual, save_stats=True)
        dx, dweight, _ = layer_norm_backward(dy, out.residual, weight, out.mean, out.rstd, dresidual=dh)
        y = norm.layer_norm_formula(h, leaves[2], leaves[3])
    else:
        out = rms_norm(x, weight, eps=norm.EPS, residual=residual, save_stats=True)
        dx, dweight = rms_norm_backward(dy, out.residual, weight, out.rstd, dresidual=dh)
        y = norm.rms_norm_formula(h, leaves[2])
    want_dx, _, want_dweight = torch.autograd.grad((y, h), leaves[:3], (dy.cpu().double(), dh.cpu().double()),
                                                   allow_unused=True)
    tol = TOLERANCE["fp16"]
    assert _error(out.y.cpu(), y.detach(), dy.cpu()) < tol
    assert _error(dx.cpu(), want_dx, dy.cpu()) < tol
    assert _error(dweight.cpu(), want_dweight, dy.cpu()) < tol


def test_norms_reject_weights_and_statistics_of_the_wrong_shape():
    """A weight, bias or per-row statistic shorter than the rows would be read past its end."""
    x, dy = torch.randn(5, 7, device=DEVICE), torch.randn(5, 7, device=DEVICE)
    weight = torch.randn(7, device=DEVICE)
    out = layer_norm(x, weight, weight, eps=norm.EPS, save_stats=True)
    for bad in (weight[:6], torch.randn(8, device=DEVICE), weight[None], torch.randn(14, device=DEVICE)[::2]):
        with pytest.raises(ValueError, match="weight"):
            rms_norm(x, bad, eps=norm.EPS)
        with pytest.raises(ValueError, match="weight"):
            layer_norm_backward(dy, x, bad, out.mean, out.rstd)
        with pytest.raises(ValueError, match="bias"):
            layer_norm(x, weight, bad, eps=norm.EPS)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, weight, eps=norm.EPS, residual=x[:4])
    with pytest.raises(ValueError, match="dy"):
        rms_norm_backward(dy[:4], x, weight, out.rstd)
    with pytest.raises(ValueError, match="rstd"):
        rms_norm_backward(dy, x, weight, out.rstd[:4])
    with pytest.raises(ValueError, match="mean"):
        layer_norm_backward(dy, x, weight, out.mean.double(), out.rstd)


@pytest.mark.parametrize("dtype", TOLERANCE)
@pytest.mark.parametrize("rows, width", list(zip((5, 3, 4), WIDTHS)))
@pytest.mark.parametrize("op, act, gated", [("swiglu", "silu", True), ("geglu", "gelu_tanh", True),
                                           ("gelu", "gelu_tanh", False)], ids=("swiglu", "geglu", "gelu"))
def test_activation(op, act, gated, rows, width, dtype):
    inp = _inputs(op, RowsShape(rows, width), dtype, scale={"x": 2})  # reaches both tails of the activation
    _assert_matches(activation(inp["x"], act=act, gated=gated), op, inp, dtype, "fwd")
    _assert_matches(activation_backward(inp["dy"], inp["x"], act=act, gated=gated), op, inp, dtype, "bwd")


@pytest.mark.parametrize("dtype", TOLERANCE)
@pytest.mark.parametrize("rows, vocab", list(zip((3, 6, 5), WIDTHS)))
def test_cross_entropy(rows, vocab, dtype):
    # peaked rows: the online maximum must follow the true one
    inp = _inputs("cross_entropy", VocabShape(rows, vocab, vocab), dtype, scale={"logits": 4})
    logits, targets = inp["logits"], inp["targets"]
    loss, lse = cross_entropy(logits, targets)
    assert loss.dtype == lse.dtype == torch.float32
    _assert_matches(loss, "cross_entropy", inp, dtype, "fwd")
    assert check(lse, torch.logsumexp(logits.double(), dim=-1), TOLERANCE[dtype]).passed
    dlogits = cross_entropy_backward(inp["dloss"], logits, targets, lse)
    assert dlogits.dtype == logits.dtype
    _assert_matches(dlogits, "cross_entropy", inp, dtype, "bwd")
    buffer = logits.clone()
    assert cross_entropy_backward(inp["dloss"], buffer, targets, lse, inplace=True).data_ptr() == buffer.data_ptr()
    _assert_matches(buffer, "cross_entropy", inp, dtype, "bwd")


@pytest.mark.parametrize("dtype", TOLERANCE)
@pytest.mark.parametrize("rows, vocab, ignore_index", [(7, 999, -100), (13, 1000, -100), (9, 999, 0)])
def test_cross_entropy_ignore_index_matches_torch(rows, vocab, ignore_index, dtype):
    """Against torch.nn.functional.cross_entropy in float64: per row, the mean over the rows not
    ignored, and the gradient; ignored rows give exactly zero loss and gradient. ignore_index 0 is
    a column of the row, ignored all the same, as torch does."""
    import torch.nn.functional as F

    torch.manual_seed(rows)
    logits = (4 * torch.randn(rows, vocab, device=DEVICE)).to(get_dtype(dtype).torch)
    targets = torch.randint(0, vocab, (rows,), device=DEVICE)
    targets[[0, rows - 1]] = torch.tensor([vocab - 1, 0 if ignore_index else 1])  # the row's two ends
    ignored = torch.zeros(rows, dtype=torch.bool, device=DEVICE)
    ignored[[1, 4, rows - 2]] = True
    targets[ignored] = ignore_index
    loss, lse = cross_entropy(logits, targets, ignore_index=ignore_index)

    leaf = logits.cpu().double().requires_grad_()
    want = F.cross_entropy(leaf, targets.cpu(), ignore_index=ignore_index, reduction="none")
    tol = TOLERANCE[dtype]
    assert check(loss, want.detach(), tol).passed
    assert (loss[ignored] == 0).all()
    counted = (targets != ignore_index).sum()
    mean = F.cross_entropy(logits.cpu().double(), targets.cpu(), ignore_index=ignore_index)
    assert check(loss.sum() / counted, mean, tol).passed

    dloss = torch.randn(rows, device=DEVICE)
    (want_grad,) = torch.autograd.grad(want, leaf, dloss.cpu().double())
    for inplace in (False, True):
        dlogits = cross_entropy_backward(dloss, logits.clone(), targets, lse, inplace=inplace,
                                         ignore_index=ignore_index)
        assert check(dlogits, want_grad, tol).passed
        assert (dlogits[ignored] == 0).all()


def test_cross_entropy_rejects_targets_out_of_range(monkeypatch):
    """On the CPU before the launch; past that check (as on a GPU, where it would synchronise), the
    kernels read nothing outside the row and give that row a NaN loss and NaN gradients."""
    import opbench.kernels.cross_entropy as ce

    logits, dloss = torch.randn(5, 999, device=DEVICE), torch.randn(5, device=DEVICE)
    fine = torch.randint(0, 999, (5,), device=DEVICE)
    _, lse = cross_entropy(logits, fine)
    for bad in (999, -1, -101, 2**40):
        targets = fine.clone()
        targets[2] = bad
        if DEVICE == "cpu":
            with pytest.raises(ValueError, match=f"row 2 has {bad}"):
                cross_entropy(logits, targets)
            with pytest.raises(ValueError, match=r"\[0, 999\) or ignore_index \(-100\)"):
                cross_entropy_backward(dloss, logits, targets, lse)
        monkeypatch.setattr(ce, "_check_targets", lambda *args: None)
        loss, _ = cross_entropy(logits, targets)
        dlogits = cross_entropy_backward(dloss, logits, targets, lse)
        monkeypatch.undo()
        rest = [0, 1, 3, 4]
        assert loss[2].isnan() and dlogits[2].isnan().all()
        assert check(loss[rest], cross_entropy(logits[rest], fine[rest])[0], 1e-6).passed
        assert check(dlogits[rest], cross_entropy_backward(dloss[rest], logits[rest], fine[rest], lse[rest]),
                     1e-6).passed


ROTARY_SHAPES = (  # (tokens, heads, kv_heads, head_dim, offset): GQA, MQA, MHA; head_dim/2 not a power of 2
    (5, 6, 2, 64, 0),
    (3, 4, 1, 80, 0),
    (7, 3, 3, 96, 0),
    (4, 5, 1, 128, 1999),  # decode: every token at position 1999
)


@pytest.mark.parametrize("dtype", TOLERANCE)
@pytest.mark.parametrize("interleaved", (0, 1), ids=("neox", "gptj"))
@pytest.mark.parametrize("tokens, heads, kv_heads, head_dim, offset", ROTARY_SHAPES)
def test_rotary(tokens, heads, kv_heads, head_dim, offset, interleaved, dtype):
    """q and k are strided views of a fused qkv buffer; the reference rotates by complex multiplication
    (interleaved) or rotate-half (NeoX); the conjugate rotation is the backward."""
    inp = _inputs("rotary", RotaryShape(tokens, heads, kv_heads, head_dim, interleaved, offset), dtype)
    assert inp["q"].stride(0) == (heads + 2 * kv_heads) * head_dim  # read in place, not copied
    tables = inp["cos"], inp["sin"], inp["positions"]
    out = tuple(rotary(inp[name], *tables, interleaved=bool(interleaved)) for name in ("q", "k"))
    _assert_matches(out, "rotary", inp, dtype, "fwd")
    grads = tuple(rotary(inp[name], *tables, interleaved=bool(interleaved), conjugate=True) for name in ("dq", "dk"))
    _assert_matches(grads, "rotary", inp, dtype, "bwd")
