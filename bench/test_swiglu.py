"""SwiGLU over the fused gate/up output: every distinct shape, dtype and pass of the plans, per backend."""

OP = "swiglu"


def test_swiglu(measure_case, case):
    measure_case(case)
