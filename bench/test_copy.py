"""Copy bandwidth: the peak memory-bound cases' GB/s is compared with. In no plan; runs first, and
whatever backends are selected, since every memory-bound case is compared with it."""

from opbench.cases import Case
from opbench.ops.copy import CopyShape, copy_size


def CASES(selection):
    return [Case("copy", CopyShape(copy_size(selection.device)), "fp32", "fwd", "torch", roles=())]


def test_copy(measure_case, case):
    measure_case(case)
