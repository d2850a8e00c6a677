"""Default grouping for the checkpoint families we promise, and user patterns."""

from __future__ import annotations

import pytest

from manifest.errors import LocalError
from publisher.grouping import assign_groups, parse_pattern

CASES = [
    # Mixtral
    ("model.layers.3.block_sparse_moe.experts.7.w1.weight", "layers.3.experts.7"),
    ("model.layers.3.block_sparse_moe.gate.weight", "layers.3"),
    ("model.layers.3.self_attn.q_proj.weight", "layers.3"),
    ("model.layers.3.input_layernorm.weight", "layers.3"),
    # Qwen2-MoE / Qwen3-MoE / OLMoE / DeepSeek-V3
    ("model.layers.12.mlp.experts.63.down_proj.weight", "layers.12.experts.63"),
    ("model.layers.12.mlp.experts.63.down_proj.weight_scale_inv", "layers.12.experts.63"),
    ("model.layers.12.mlp.gate.weight", "layers.12"),
    ("model.layers.12.mlp.shared_expert.up_proj.weight", "layers.12"),
    ("model.layers.12.mlp.shared_expert_gate.weight", "layers.12"),
    ("model.layers.12.mlp.shared_experts.gate_proj.weight", "layers.12"),
    ("model.layers.12.self_attn.kv_a_proj_with_mqa.weight", "layers.12"),
    # Llama / Mistral
    ("model.embed_tokens.weight", "embeddings"),
    ("model.norm.weight", "norm"),
    ("lm_head.weight", "lm_head"),
    ("model.layers.0.mlp.gate_proj.weight", "layers.0"),
    # BERT / MiniLM (sentence-transformers naming and bert. prefix)
    ("embeddings.word_embeddings.weight", "embeddings"),
    ("embeddings.LayerNorm.bias", "embeddings"),
    ("bert.embeddings.position_embeddings.weight", "embeddings"),
    ("encoder.layer.5.attention.self.query.weight", "layers.5"),
    ("bert.encoder.layer.5.output.dense.bias", "layers.5"),
    ("pooler.dense.weight", "pooler.dense"),
    ("cls.predictions.transform.dense.weight", "cls.predictions.transform.dense"),
    # GPT-2 style
    ("transformer.h.2.attn.c_attn.weight", "layers.2"),
    ("transformer.wte.weight", "embeddings"),
    ("transformer.ln_f.weight", "norm"),
]


@pytest.mark.parametrize(("name", "group"), CASES)
def test_default_groups(name: str, group: str) -> None:
    assert list(assign_groups([name])) == [group]


def test_every_tensor_in_exactly_one_group_and_natural_order() -> None:
    names = [n for n, _ in CASES]
    groups = assign_groups(names)
    flat = [t for ts in groups.values() for t in ts]
    assert sorted(flat) == sorted(names)
    order = list(groups)
    assert order.index("layers.2") < order.index("layers.3") < order.index("layers.12")
    assert order.index("layers.12") < order.index("layers.12.experts.63")


def test_user_pattern_overrides_defaults() -> None:
    rule = parse_pattern(r"model\.layers\.(?P<layer>\d+)\.block_sparse_moe\.experts\.\d+\.")
    g = assign_groups(["model.layers.1.block_sparse_moe.experts.0.w1.weight",
                       "model.layers.1.block_sparse_moe.experts.5.w1.weight",
                       "model.layers.1.self_attn.q_proj.weight"], [rule])
    assert g == {
        "layers.1": ["model.layers.1.self_attn.q_proj.weight"],
        "layer.1": ["model.layers.1.block_sparse_moe.experts.0.w1.weight",
                    "model.layers.1.block_sparse_moe.experts.5.w1.weight"],
    }


def test_group_capture_names_the_group() -> None:
    rule = parse_pattern(r"(?P<group>model\.layers\.\d+)\.")
    assert list(assign_groups(["model.layers.4.mlp.experts.1.w1.weight"], [rule])) == [
        "model.layers.4"
    ]


@pytest.mark.parametrize("bad", [r"layers\.(\d+)", r"(?P<x>[", ""])
def test_bad_patterns(bad: str) -> None:
    with pytest.raises(LocalError):
        parse_pattern(bad)


def test_unsafe_characters_are_replaced() -> None:
    assert list(assign_groups(["weird/../name.weight"])) == ["weird_.._name".replace("..", ".")]
