"""Token-wise op families: work formulas against hand-computed values, every backend that can run here
through the correctness gate at odd shapes, rotary layouts by hand, and what the plan asks of them."""

import math

import pytest
import torch

from opbench.measure.cases import build_cases
from opbench.ops.dtypes import get_dtype
from opbench.measure.hardware import last_level_cache_bytes
from opbench.spec.models import get_model
from opbench.ops import FAMILIES, activation, embedding, get_family, norm, optim, rotary
from opbench.ops.tokenwise import ParamsShape, RotaryShape, RowsShape, VocabShape
from opbench.measure.selection import select
from opbench.measure.gate import check
from opbench.spec.workload import parse_workload
from opbench.spec.plan import plan

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BF16, FP32 = get_dtype("bf16"), get_dtype("fp32")
ROWS, ROTARY, VOCAB, PARAMS = RowsShape(3, 5), RotaryShape(3, 4, 2, 8, 0), VocabShape(3, 5, 7), ParamsShape(10)


@pytest.mark.parametrize("formula, args, expected", [
    # rows: T=3, W=5, bf16 (2 bytes)
    (norm.rms_norm_bytes, (ROWS, BF16, "fwd"), (2 * 15 + 5) * 2),
    (norm.rms_norm_bytes, (ROWS, BF16, "bwd"), (3 * 15 + 2 * 5) * 2),
    (norm.rms_norm_flops, (ROWS, "bwd"), 9 * 15),
    (norm.layer_norm_bytes, (ROWS, BF16, "fwd"), (2 * 15 + 2 * 5) * 2),
    (norm.layer_norm_bytes, (ROWS, BF16, "bwd"), (3 * 15 + 3 * 5) * 2),
    (norm.layer_norm_flops, (ROWS, "fwd"), 7 * 15),
    (norm.add_bytes, (ROWS, FP32, "bwd"), 3 * 15 * 4),
    (norm.add_rms_norm_bytes, (ROWS, BF16, "fwd"), (4 * 15 + 5) * 2),
    (norm.add_rms_norm_bytes, (ROWS, BF16, "bwd"), (4 * 15 + 2 * 5) * 2),
    (activation.gated_bytes, (ROWS, BF16, "fwd"), 3 * 15 * 2),
    (activation.gated_bytes, (ROWS, BF16, "bwd"), 5 * 15 * 2),
    (activation.gelu_bytes, (ROWS, FP32, "bwd"), 3 * 15 * 4),
    (activation.swiglu_flops, (ROWS, "fwd"), 5 * 15),
    (activation.geglu_flops, (ROWS, "bwd"), 24 * 15),
    (activation.gelu_flops, (ROWS, "fwd"), 9 * 15),
    # rotary: 3 tokens x (4 + 2) heads x 8 = 144 elements; cos and sin rows of 4 each per position
    (rotary.bytes_moved, (ROTARY, BF16), (2 * 144 + 3 * 8) * 2 + 3 * 8),
    (rotary.bytes_moved, (RotaryShape(3, 4, 2, 8, 1, offset=9), BF16), (2 * 144 + 8) * 2 + 3 * 8),
    (rotary.flops, (ROTARY, "bwd"), 3 * 144),
    # vocab: T=3, W=5, V=7, int64 ids
    (embedding.embedding_bytes, (VOCAB, BF16, "fwd"), 2 * 15 * 2 + 3 * 8),
    (embedding.embedding_bytes, (VOCAB, BF16, "bwd"), (15 + 35) * 2 + 3 * 8),
    (embedding.embedding_flops, (VOCAB, "bwd"), 15),
    (embedding.cross_entropy_bytes, (VOCAB, BF16, "fwd"), 15 * 2 + 3 * (8 + 4)),
    (embedding.cross_entropy_bytes, (VOCAB, BF16, "bwd"), 2 * 15 * 2 + 3 * (8 + 4)),
    (embedding.cross_entropy_flops, (VOCAB, "fwd"), 4 * 15),
    (optim.bytes_moved, (PARAMS, FP32), 7 * 10 * 4),
    (optim.flops, (PARAMS,), 14 * 10),
])
def test_work_formulas(formula, args, expected):
    assert formula(*args) == expected


# (op, shape) at odd sizes; rotary in both layouts, the interleaved one at a decode offset
CASES = [pytest.param(op, shape, id=f"{op}-{get_family(op).id_of(shape)}") for op, shape in (
    ("rmsnorm", RowsShape(5, 4095)),
    ("layernorm", RowsShape(3, 5120)),
    ("add", RowsShape(7, 4095)),
    ("add_rmsnorm", RowsShape(5, 5120)),
    ("rotary", RotaryShape(5, 6, 2, 80, 0)),
    ("rotary", RotaryShape(3, 4, 1, 64, 1, offset=37)),
    ("swiglu", RowsShape(3, 4095)),
    ("geglu", RowsShape(5, 5120)),
    ("gelu", RowsShape(7, 4095)),
    ("embedding", VocabShape(7, 96, 1000)),
    ("cross_entropy", VocabShape(5, 5120, 5120)),
)]


def _gate(op, shape, dtype, pass_, backend):
    """What the harness checks before timing: the backend's output against the family's reference."""
    family, dt = get_family(op), get_dtype(dtype)
    inp = family.inputs(shape, dt, pass_, DEVICE)
    verdict = check(family.backends[backend].prepare(inp, dt, pass_)(), family.reference(inp, dt, pass_), dt.tol)
    assert verdict.passed, verdict.as_dict()


@pytest.mark.parametrize("pass_", ("fwd", "bwd"))
@pytest.mark.parametrize("dtype", ("fp32", "bf16"))
@pytest.mark.parametrize("op, shape", CASES)
def test_torch_backends(op, shape, dtype, pass_):
    _gate(op, shape, dtype, pass_, "torch")


@pytest.mark.parametrize("pass_", ("fwd", "bwd"))
@pytest.mark.parametrize("dtype", ("fp32", "fp16"))  # the interpreter computes bf16 wrongly
@pytest.mark.parametrize("op, shape", [c for c in CASES if "triton" in get_family(c.values[0]).backends])
def test_triton_backends(op, shape, dtype, pass_):
    """The triton backends' forward and backward wiring, on the kernels (the interpreter on a CPU)."""
    _gate(op, shape, dtype, pass_, "triton")


@pytest.mark.parametrize("backend", ("torch-fused", "torch-foreach"))
def test_adamw_backends(backend):
    _gate("adamw", ParamsShape(10007), "fp32", "fwd", backend)


def test_every_family_is_registered():
    for op in ("rmsnorm", "layernorm", "add", "add_rmsnorm", "rotary", "swiglu", "geglu", "gelu", "embedding",
               "cross_entropy", "adamw"):
        assert get_family(op).name == op and op in FAMILIES


@pytest.mark.parametrize("interleaved, pairs", [(0, ((0, 2), (1, 3))), (1, ((0, 1), (2, 3)))], ids=("neox", "gptj"))
def test_rotary_by_hand(interleaved, pairs):
    """One head of [1, 2, 3, 4] at position 1, angles 1 and 0.5: each pair turns by its own angle."""
    q = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]], dtype=torch.float64)
    cos = torch.tensor([[1.0, 1.0], [math.cos(1.0), math.cos(0.5)]], dtype=torch.float64)
    sin = torch.tensor([[0.0, 0.0], [math.sin(1.0), math.sin(0.5)]], dtype=torch.float64)
    expected = torch.empty(4, dtype=torch.float64)
    for (i, j), angle in zip(pairs, (1.0, 0.5)):
        a, b = q[0, 0, i], q[0, 0, j]
        expected[i] = a * math.cos(angle) - b * math.sin(angle)
        expected[j] = b * math.cos(angle) + a * math.sin(angle)
    args = {"q": q, "k": q, "cos": cos, "sin": sin, "positions": torch.tensor([1]), "interleaved": bool(interleaved)}
    for fn in (rotary.rotary_formula, rotary.torch_rotary):
        out_q, out_k = fn(**args)
        torch.testing.assert_close(out_q[0, 0], expected)
        torch.testing.assert_close(out_k[0, 0], expected)


def test_rotary_inputs():
    """Tables hold position x base^(-2i/d); decode tokens all sit at the offset; q, k view one qkv buffer."""
    inp = rotary.inputs(RotaryShape(4, 4, 2, 8, 0, offset=99), FP32, "fwd", DEVICE)
    assert inp["cos"].shape == (100, 4)
    assert inp["positions"].tolist() == [99] * 4
    assert inp["cos"][99, 1].item() == pytest.approx(math.cos(99 * 10000 ** (-2 / 8)), abs=1e-6)
    assert inp["sin"][3, 0].item() == pytest.approx(math.sin(3.0), abs=1e-6)
    assert inp["k"].data_ptr() == inp["q"].data_ptr() + 4 * 8 * FP32.bytes  # after q's 4 heads of 8
    assert rotary.inputs(RotaryShape(4, 4, 2, 8, 0), FP32, "fwd", DEVICE)["positions"].tolist() == [0, 1, 2, 3]


def test_plan_rotary_offset():
    tiny = get_model("tiny")

    def rotary_shape(workload):
        return next(c.shape for c in plan(tiny, parse_workload(workload)).calls if c.op == "rotary")
    assert rotary_shape("decode:b=4,s=200").offset == 199
    assert rotary_shape("prefill:b=2,s=96").offset == 0
    assert rotary_shape("train:b=2,s=96").offset == 0
    assert get_family("rotary").id_of(rotary_shape("decode:b=4,s=200")) == "t4h6kv2d32p199"


def test_adamw_runs_in_fp32_for_every_workload_dtype():
    sel = select(profile="smoke", device="cpu", models=["tiny"], workloads=["train:b=2,s=96"],
                 dtypes=["fp32", "bf16", "fp16"])
    cases = build_cases(sel.plans, "adamw", ["torch-fused"])
    assert {c.dtype for c in cases} == {"fp32"}
    assert len(cases) == 2  # the layer's and the embeddings' steps, each serving every dtype's plan
    assert get_family("rmsnorm").case_dtype("bf16") == "bf16"


def test_last_level_cache(tmp_path):
    for index, (level, size) in enumerate(((1, "48K"), (1, "32K"), (2, "1024K"), (3, "32768K"))):
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "level").write_text(f"{level}\n")
        (tmp_path / f"index{index}" / "size").write_text(f"{size}\n")
    assert last_level_cache_bytes(tmp_path) == 32 * 2**20
    assert last_level_cache_bytes(tmp_path / "missing") == 0
