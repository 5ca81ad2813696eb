import json
from dataclasses import asdict
from pathlib import Path

import pytest

from opbench.spec.models import TEST_MODEL, ZOO, ConfigError, get_model, load_hf_config

CONFIGS = Path(__file__).parent / "data" / "configs"
SHAPE_FIELDS = ("hidden", "layers", "heads", "kv_heads", "head_dim", "ffn_hidden", "vocab", "max_seq_len", "norm",
                "activation", "rotary", "sliding_window", "experts", "experts_per_token", "tied_embeddings")


PUBLISHED = [n for n, m in ZOO.items() if m.source != TEST_MODEL]


@pytest.mark.parametrize("name", PUBLISHED)
def test_zoo_matches_published_config(name):
    published = load_hf_config(CONFIGS / f"{name}.json")
    zoo = ZOO[name]
    assert {f: getattr(published, f) for f in SHAPE_FIELDS} == {f: getattr(zoo, f) for f in SHAPE_FIELDS}


def test_every_zoo_entry_has_a_published_config_file():
    assert sorted(p.stem for p in CONFIGS.glob("*.json")) == sorted(PUBLISHED)


def test_parameter_counts_match_the_model_names():
    # Published totals: Llama-3-8B 8.03B, Llama-2-70B 68.98B, Mixtral 46.7B, GPT-3 175B.
    assert ZOO["llama-3-8b"].params == pytest.approx(8.03e9, rel=0.01)
    assert ZOO["llama-2-70b"].params == pytest.approx(68.98e9, rel=0.01)
    assert ZOO["mixtral-8x7b"].params == pytest.approx(46.7e9, rel=0.01)
    assert ZOO["gpt-3-175b"].params == pytest.approx(175e9, rel=0.01)


def test_get_model_is_case_insensitive_and_reads_a_config_folder(tmp_path):
    assert get_model("Llama-3-8B") is ZOO["llama-3-8b"]
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text((CONFIGS / "mistral-7b.json").read_text())
    model = get_model(str(folder))
    assert model.name == "my-model" and model.sliding_window == 4096 and model.kv_heads == 8


def test_explicit_head_dim_and_default_kv_heads(tmp_path):
    cfg = json.loads((CONFIGS / "llama-2-7b.json").read_text())
    cfg.update(head_dim=256, num_attention_heads=8)
    del cfg["num_key_value_heads"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    model = load_hf_config(path)
    assert (model.head_dim, model.heads, model.kv_heads) == (256, 8, 8)


def _write(tmp_path, text):
    path = tmp_path / "config.json"
    path.write_text(text)
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.pop("hidden_size"), "missing field 'hidden_size'"),
    (lambda c: c.update(num_hidden_layers=0), "field 'num_hidden_layers' must be a positive integer"),
    (lambda c: c.update(vocab_size="32000"), "field 'vocab_size' must be a positive integer"),
    (lambda c: c.update(num_key_value_heads=5), "heads (32) is not a multiple of kv_heads (5)"),
])
def test_invalid_config_names_the_field(tmp_path, edit, message):
    cfg = json.loads((CONFIGS / "llama-2-7b.json").read_text())
    edit(cfg)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_hf_config(_write(tmp_path, json.dumps(cfg)))


def test_malformed_and_missing_files(tmp_path):
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_hf_config(_write(tmp_path, "{not json"))
    with pytest.raises(ConfigError, match="expected a JSON object"):
        load_hf_config(_write(tmp_path, "[1, 2]"))
    with pytest.raises(ConfigError, match="no such file"):
        get_model(str(tmp_path / "absent.json"))
    with pytest.raises(ConfigError, match="unknown model 'gpt-5'"):
        get_model("gpt-5")


def test_zoo_records_are_plain_data():
    # The JSON's opbench section stores models with asdict: every field must be JSON-serialisable.
    for model in ZOO.values():
        json.dumps(asdict(model))
