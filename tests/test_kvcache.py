import pytest

from opbench.ops.dtypes import DTYPES
from opbench.spec.models import ZOO
from opbench.ops.kvcache import KV_WRITE, KVWriteShape, bytes_moved, flops
from opbench.measure.gate import check
from opbench.spec.workload import Workload
from opbench.spec.plan import plan


def test_bytes_by_hand():
    # Llama-3-8B decode at batch 32: 32 tokens x 8 kv heads x 128: K and V read and written in bf16,
    # 4 x 32 x 8 x 128 x 2 = 262,144 bytes, and 32 int64 slots
    assert bytes_moved(KVWriteShape(32, 8, 128), DTYPES["bf16"]) == 262_144 + 256
    assert flops(KVWriteShape(32, 8, 128)) == 0


def test_inference_plans_write_the_cache_and_training_does_not():
    writes = {ph: [c.shape for c in plan(ZOO["llama-3-8b"], Workload(ph, 4, 512, tp=2)).calls if c.op == "kv_write"]
              for ph in ("prefill", "decode", "train")}
    assert writes == {"prefill": [KVWriteShape(4 * 512, 4, 128)], "decode": [KVWriteShape(4, 4, 128)], "train": []}


@pytest.mark.parametrize("tokens", [1, 37])
def test_the_gate_passes_the_write_and_catches_a_wrong_slot(tokens):
    shape, fp32 = KVWriteShape(tokens, 3, 16), DTYPES["fp32"]
    inp = KV_WRITE.inputs(shape, fp32, "fwd", "cpu")
    out = KV_WRITE.backends["torch"].prepare(inp, fp32, "fwd")()
    assert check(out, KV_WRITE.reference(inp, fp32, "fwd"), 0.0).passed
    wrong = KV_WRITE.inputs(shape, fp32, "fwd", "cpu")
    wrong["k_cache"].index_copy_(0, (wrong["slots"] + 1) % (2 * tokens), wrong["k"])  # one row off
    assert not check((wrong["k_cache"], wrong["v_cache"]), KV_WRITE.reference(wrong, fp32, "fwd"), 1e-6).passed
