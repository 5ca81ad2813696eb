"""KV-cache writes: every distinct (tokens, kv heads, head dim, dtype) of the selected inference plans."""

OP = "kv_write"


def test_kv_write(measure_case, case):
    measure_case(case)
