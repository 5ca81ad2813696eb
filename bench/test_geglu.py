"""GeGLU over the fused gate/up output: every distinct shape, dtype and pass of the plans, per backend."""

OP = "geglu"


def test_geglu(measure_case, case):
    measure_case(case)
