"""The DType record: storage bits, the activation dtype, scales, fallbacks, what a GPU needs; and that no
op or module tests a dtype by its name."""

import re
from pathlib import Path

import pytest

from opbench.analyze.estimate import memory
from opbench.ops import FAMILIES, get_family
from opbench.ops.base import needs_capability
from opbench.ops.dtypes import DTYPES, DType, get_dtype
from opbench.ops.gemm import GemmShape, bytes_moved
from opbench.spec.models import ZOO
from opbench.spec.plan import plan
from opbench.spec.workload import Workload

SOURCE = Path(__file__).resolve().parent.parent / "opbench"
NAMES = "|".join(DTYPES)
# a comparison with a dtype's name, or a test of membership in a literal list of names
BY_NAME = re.compile(rf"""(==|!=)\s*["']({NAMES})["']|["']({NAMES})["']\s*(==|!=)|\bin\s*[(\[{{]\s*["']({NAMES})["']""")


def test_no_module_tests_a_dtype_by_its_name():
    found = [f"{path.relative_to(SOURCE.parent)}:{n}: {line.strip()}"
             for path in sorted(SOURCE.rglob("*.py")) if path.name != "dtypes.py"
             for n, line in enumerate(path.read_text().splitlines(), 1) if BY_NAME.search(line)]
    assert not found, "\n".join(found)


def test_storage_bits_and_packed_bytes():
    assert [(d.name, d.bits, d.bytes) for d in DTYPES.values()] == [
        ("bf16", 16, 2), ("fp16", 16, 2), ("fp32", 32, 4), ("tf32", 32, 4), ("fp8", 8, 1)]
    int4 = DType("int4", "uint8", 4, 1e-2, activations="bf16", scaled=True, fallback="bf16")
    assert int4.bytes_of(4096) == 2048 and int4.bytes_of(3) == 2  # a partial byte counts whole
    with pytest.raises(ValueError, match="bytes_of"):
        int4.bytes
    # W4A16: the packed weight read at 4 bits, the activations at 16
    assert bytes_moved(GemmShape(16, 32, 64), int4) == (16 * 64 + 64 * 32) // 2 + 16 * 32 * 2


def test_activations_scales_and_fallbacks():
    fp8, bf16, tf32 = get_dtype("fp8"), get_dtype("bf16"), get_dtype("tf32")
    assert fp8.activation is bf16 and bf16.activation is bf16 and tf32.activation is tf32
    assert fp8.scaled and not bf16.scaled
    assert fp8.fallbacks == ("bf16",) and tf32.fallbacks == ("fp32",) and bf16.fallbacks == ()
    assert [d.name for d in DTYPES.values() if d.plain] == ["bf16", "fp16", "fp32"]


def test_case_dtypes_are_those_of_the_name_table():
    """The fallbacks of every family as the table keyed by names had them."""
    old = {"fp8": "bf16", "tf32": "fp32"}
    for op in FAMILIES:
        family = get_family(op)
        for name in DTYPES:
            if op == "adamw":  # fp32 master weights and moments, whatever the workload
                expected = "fp32"
            else:
                expected = name if name in family.dtypes else old.get(name) if old.get(name) in family.dtypes else None
            assert family.case_dtype(name) == expected, (op, name)


def test_fp8_work_as_before():
    fp8 = get_dtype("fp8")
    assert bytes_moved(GemmShape(16, 32, 64), fp8) == (16 * 64 + 64 * 32) * 1 + 16 * 32 * 2  # bf16 output
    assert bytes_moved(GemmShape(16, 32, 64), get_dtype("bf16")) == (16 * 64 + 64 * 32 + 16 * 32) * 2
    p = plan(ZOO["llama-3-8b"], Workload("prefill", 1, 16, tp=2, dtype="fp8"))
    allreduce = next(c for c in p.calls if c.op == "allreduce")
    assert allreduce.shape.size_bytes == 16 * 4096 * 2  # bf16 activations
    m = ZOO["llama-3-8b"]
    mem = memory(m, Workload("decode", 2, 1024, dtype="fp8"))
    assert mem.weights_bytes == m.params  # a byte a weight
    assert mem.kv_cache_bytes == 2 * m.layers * m.kv_heads * m.head_dim * 2 * 1024 * 2  # bf16 cache


def test_capability_reason_comes_from_the_dtype():
    shape = GemmShape(16, 16, 16)
    assert needs_capability(shape, get_dtype("fp8"), "cpu") == \
        "fp8 matmul needs a CUDA GPU of compute capability 8.9 or newer"
    assert needs_capability(shape, get_dtype("bf16"), "cpu") is None
    assert get_family("gemm").backends["torch"].requires(shape, get_dtype("fp8"), "cpu") == \
        "fp8 matmul needs a CUDA GPU of compute capability 8.9 or newer"
