"""fp8 activation quantization before each scaled GEMM: every distinct (tokens, features, format) of the plans."""

OP = "act_quant"


def test_act_quant(measure_case, case):
    measure_case(case)
