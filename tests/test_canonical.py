"""Physical module names <-> canonical checkpoint keys."""

from __future__ import annotations

import pytest
from conftest import small_config

from megatron_hybrid.canonical import (
    CanonicalKeyError,
    canonical_key,
    physical_name,
)
from megatron_hybrid.model import HybridModel
from megatron_hybrid.pattern import parse_hybrid_pattern


def test_fused_block_maps_sequence_and_channel_sides_to_consecutive_layers():
    p = parse_hybrid_pattern("M[M-][*E]")
    assert (
        canonical_key("decoder.layers.1.sequence_norm.weight", p) == "decoder.layers.1.norm.weight"
    )
    assert (
        canonical_key("decoder.layers.1.sequence_mixer.in_proj.weight", p)
        == "decoder.layers.1.mixer.in_proj.weight"
    )
    assert (
        canonical_key("decoder.layers.1.channel_mixer.linear_fc1.weight", p)
        == "decoder.layers.2.mlp.linear_fc1.weight"
    )
    assert (
        canonical_key("decoder.layers.2.sequence_mixer.linear_qkv.weight", p)
        == "decoder.layers.3.self_attention.linear_qkv.weight"
    )
    assert (
        canonical_key("decoder.layers.2.channel_mixer.router.weight", p)
        == "decoder.layers.4.mlp.router.weight"
    )


def test_attention_and_mlp_tensors_keep_megatron_names_at_their_canonical_layers():
    # "M[*-]*-": canonical layers 0 M, 1 * and 2 - (one fused block), 3 *, 4 -. Attention and
    # MLP sides keep Megatron's names; only their layer index changes.
    config = small_config("M[*-]*-")
    L = "decoder.layers."
    expected = {
        f"{L}1.sequence_norm.weight": f"{L}1.input_layernorm.weight",
        f"{L}1.sequence_mixer.linear_qkv.weight": f"{L}1.self_attention.linear_qkv.weight",
        f"{L}1.sequence_mixer.linear_proj.weight": f"{L}1.self_attention.linear_proj.weight",
        f"{L}1.channel_norm.weight": f"{L}2.pre_mlp_layernorm.weight",
        f"{L}1.channel_mixer.linear_fc1.weight": f"{L}2.mlp.linear_fc1.weight",
        f"{L}1.channel_mixer.linear_fc2.weight": f"{L}2.mlp.linear_fc2.weight",
        f"{L}2.sequence_norm.weight": f"{L}3.input_layernorm.weight",
        f"{L}2.sequence_mixer.linear_qkv.weight": f"{L}3.self_attention.linear_qkv.weight",
        f"{L}2.sequence_mixer.linear_proj.weight": f"{L}3.self_attention.linear_proj.weight",
        f"{L}3.channel_norm.weight": f"{L}4.pre_mlp_layernorm.weight",
        f"{L}3.channel_mixer.linear_fc1.weight": f"{L}4.mlp.linear_fc1.weight",
        f"{L}3.channel_mixer.linear_fc2.weight": f"{L}4.mlp.linear_fc2.weight",
    }
    names = [
        n
        for n in HybridModel(config).state_dict()
        if n.startswith("decoder.layers.") and not n.startswith("decoder.layers.0.")
    ]
    assert {n: canonical_key(n, config.pattern) for n in names} == expected


def test_names_outside_the_decoder_layers_are_unchanged():
    p = parse_hybrid_pattern("[M-]")
    for name in (
        "embedding.word_embeddings.weight",
        "decoder.final_norm.weight",
        "output_layer.weight",
    ):
        assert canonical_key(name, p) == name == physical_name(name, p)


@pytest.mark.parametrize("pattern", ["M-*EM-", "[M-][*E]M-", "[M-]|[*E]M-", "MM*--E"])
def test_physical_name_inverts_canonical_key_for_every_tensor(pattern):
    config = small_config(pattern, untie_embeddings_and_output_weights=True)
    for name in HybridModel(config).state_dict():
        assert physical_name(canonical_key(name, config.pattern), config.pattern) == name


def test_fused_and_unfused_models_share_one_set_of_canonical_keys():
    keys = {}
    for pattern in ("[M-][*E]M-", "M-*EM-", "[M-]*EM-"):
        config = small_config(pattern)
        keys[pattern] = sorted(
            canonical_key(n, config.pattern) for n in HybridModel(config).state_dict()
        )
    assert keys["[M-][*E]M-"] == keys["M-*EM-"] == keys["[M-]*EM-"]


def test_keys_outside_the_pattern_are_errors_naming_the_key():
    p = parse_hybrid_pattern("M-")
    with pytest.raises(CanonicalKeyError, match="decoder.layers.5.mixer.D"):
        physical_name("decoder.layers.5.mixer.D", p)
    with pytest.raises(CanonicalKeyError, match="unknown block slot 'mixer'"):
        canonical_key("decoder.layers.0.mixer.D", p)
