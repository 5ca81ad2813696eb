"""Mixtures of experts, multi-head latent attention and alternating windows in the model record and the
config.json loader, checked against the published configurations and parameter counts."""

import json
from dataclasses import asdict

import pytest

from opbench.spec.models import ZOO, ConfigError, load_hf_config

from tests.test_models import CONFIGS

VARIANTS = ("mixtral-8x7b", "mixtral-8x22b", "qwen3-30b-a3b", "qwen3-235b-a22b", "deepseek-v3", "gpt-oss-120b")


@pytest.mark.parametrize("name", VARIANTS)
def test_every_field_of_the_zoo_entry_matches_its_published_config(name):
    loaded = {k: v for k, v in asdict(load_hf_config(CONFIGS / f"{name}.json")).items() if k not in ("name", "source")}
    zoo = {k: v for k, v in asdict(ZOO[name]).items() if k not in ("name", "source")}
    assert loaded == zoo


@pytest.mark.parametrize("name, total, active", [
    ("mixtral-8x7b", 46.7e9, 12.9e9),  # Mistral's announcement
    ("mixtral-8x22b", 141e9, 39e9),
    ("qwen3-30b-a3b", 30.5e9, 3.3e9),  # Qwen3 model cards
    ("qwen3-235b-a22b", 235e9, 22e9),
    ("deepseek-v3", 671e9, 37e9),  # DeepSeek-V3 report, without the multi-token-prediction module
])
def test_total_and_active_parameters_match_the_published_counts(name, total, active):
    assert ZOO[name].params == pytest.approx(total, rel=0.01)
    assert ZOO[name].active_params == pytest.approx(active, rel=0.02)


def test_gpt_oss_counts_its_total_and_the_active_weights_its_card_counts():
    m = ZOO["gpt-oss-120b"]
    assert m.params == pytest.approx(116.8e9, rel=0.01)
    # its card's 5.1B active counts the unembedding but not the input embedding (a lookup)
    assert m.active_params - m.vocab * m.hidden == pytest.approx(5.1e9, rel=0.02)


def test_layer_kinds_count_dense_moe_window_and_full_layers():
    assert ZOO["deepseek-v3"].layer_kinds() == {("full", "dense"): 3, ("full", "moe"): 58}
    assert ZOO["gpt-oss-120b"].layer_kinds() == {("window", "moe"): 18, ("full", "moe"): 18}
    assert ZOO["llama-3-8b"].layer_kinds() == {("full", "dense"): 32}
    assert ZOO["mistral-7b"].layer_kinds() == {("window", "dense"): 32}


def test_mla_caches_the_latent_and_the_rotary_key_per_token():
    v3, llama = ZOO["deepseek-v3"], ZOO["llama-3-70b"]
    assert v3.kv_cache_elements_per_token == 512 + 64
    assert llama.kv_cache_elements_per_token == 2 * 8 * 128
    # by hand: q down 7168x1536 (+ norm), q up 1536x128x192, kv down 7168x576 (+ norm), kv up 512x128x256, o 16384x7168
    assert v3.attention_params == (7168 * 1536 + 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 + 512 * 128 * 256
                                   + 128 * 128 * 7168)


def _write(tmp_path, **cfg):
    base = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 96,
            "vocab_size": 100, "model_type": "qwen2_moe"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**base, **cfg}))
    return path


def test_the_loader_reads_every_usual_spelling_of_the_moe_fields(tmp_path):
    m = load_hf_config(_write(tmp_path, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=40,
                              shared_expert_intermediate_size=80, decoder_sparse_step=2, mlp_only_layers=[3]))
    assert (m.experts, m.experts_per_token, m.moe_ffn_hidden) == (6, 2, 40)
    assert (m.shared_experts, m.shared_ffn_hidden) == (1, 80)
    assert m.dense_layers == (0, 2, 3)  # every second layer is sparse, and layer 3 is dense by name
    assert m.router_norm is False  # Qwen2-MoE's default: top-k weights not renormalised
    m = load_hf_config(_write(tmp_path, n_routed_experts=8, moe_topk=3, n_shared_experts=2, first_k_dense_replace=1,
                              scoring_func="sigmoid", norm_topk_prob=True))
    assert (m.experts, m.experts_per_token, m.shared_experts, m.dense_layers, m.router, m.router_norm) == \
        (8, 3, 2, (0,), "sigmoid", True)


@pytest.mark.parametrize("cfg, named", [
    ({"num_experts": 8}, "how many a token uses"),
    ({"num_experts": 8, "num_experts_per_tok": 0}, "'num_experts_per_tok'"),
    ({"num_experts": 8, "num_experts_per_tok": 2, "mlp_only_layers": [9]}, "'mlp_only_layers'"),
    ({"num_experts": 8, "num_experts_per_tok": 2, "scoring_func": "relu"}, "'scoring_func'"),
    ({"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": "wide"}, "'moe_intermediate_size'"),
])
def test_the_loader_names_the_field_it_could_not_read(tmp_path, cfg, named):
    with pytest.raises(ConfigError, match=named):
        load_hf_config(_write(tmp_path, **cfg))


def test_the_loader_reads_latent_attention_and_alternating_windows(tmp_path):
    m = load_hf_config(_write(tmp_path, model_type="deepseek_v3", kv_lora_rank=32, q_lora_rank=None,
                              qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16))
    assert (m.mla, m.head_dim, m.qk_rope_head_dim, m.value_dim, m.q_lora_rank) == (True, 24, 8, 16, 0)
    m = load_hf_config(_write(tmp_path, model_type="gpt_oss", sliding_window=16,
                              layer_types=["full_attention", "sliding_attention"] * 2))
    assert m.window_layers == (1, 3) and m.attention_sinks
    assert [m.window_layer(i) for i in range(4)] == [False, True, False, True]
