"""Bad input gives one clear error line, never a traceback."""

import json

import pytest

from opbench.cli import main

from tests.helpers import run_pytest


@pytest.fixture
def bad_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 512, "num_attention_heads": 8,
                                "num_hidden_layers": 2, "vocab_size": 1000}))  # no intermediate_size
    return path


@pytest.mark.parametrize("args, message", [
    (["--model", "gpt-5"], "opbench: unknown model 'gpt-5'"),
    (["--model", "{bad_config}"], "missing field 'intermediate_size'"),
    (["--workload", "decode:b=0,s=16"], "opbench: workload batch must be a positive integer, got 0"),
    (["--model", "llama-3-8b", "--workload", "prefill:b=1,s=128,tp=3"], "tp=3 does not divide"),
    (["--dtype", "fp4"], "opbench: unknown dtype 'fp4'"),
    (["--backend", "cublass"], "opbench: unknown backend(s) cublass"),
])
def test_pytest_bench_usage_errors(args, message, bad_config):
    args = [a.replace("{bad_config}", str(bad_config)) for a in args]
    proc = run_pytest("bench/test_gemm.py", "--collect-only", "-q", *args, timeout=120)
    assert proc.returncode == 4  # pytest's usage error
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("ERROR: opbench: ") and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["plan", "gpt-5", "prefill:b=1,s=8"], "unknown model 'gpt-5'"),
    (["plan", "tiny", "decode:b=1"], "missing s"),
    (["plan", "tiny", "prefill:b=1,s=100000"], "exceeds tiny's max_seq_len 512"),
])
def test_cli_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("opbench: error:") and message in err[0]


def test_cli_plan_and_models(capsys):
    main(["plan", "llama-3-8b", "decode:b=8,s=4096,tp=8", "--json"])
    data = json.loads(capsys.readouterr().out)
    qkv = next(c for c in data["calls"] if c["role"] == "attn.qkv")
    assert qkv["shape"] == {"m": 8, "n": 768, "k": 4096}
    main(["models"])
    out = capsys.readouterr().out
    assert "llama-3.1-405b" in out and "mixtral-8x7b" in out
