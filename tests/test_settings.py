"""Typed settings: every flag lands in exactly one settings field (one mapping,
`settings_from_args`), every default has one source, and every field says what it means."""

from __future__ import annotations

import ast
import dataclasses
import inspect

import pytest

from megatron_hybrid.config import ModelConfig
from megatron_hybrid.data.builder import DataSettings
from megatron_hybrid.data.tokenizer import TokenizerSettings
from megatron_hybrid.kernels.cli import KernelSettings
from megatron_hybrid.parallel.parallelize import ParallelSettings
from megatron_hybrid.training.arguments import (
    MODEL_FLAG_FIELDS,
    build_parser,
    flags_to_settings,
    settings_from_args,
)
from megatron_hybrid.training.profiling import ProfilingSettings
from megatron_hybrid.training.settings import (
    DEFAULT_MODEL_OVERRIDES,
    CheckpointSettings,
    LoggingSettings,
    ModelSettings,
    Settings,
    TrainingSettings,
)

GROUPS = (
    TrainingSettings,
    ParallelSettings,
    CheckpointSettings,
    LoggingSettings,
    DataSettings,
    TokenizerSettings,
    KernelSettings,
    ProfilingSettings,
)
# Flags that set no field of their own: help, Megatron flags accepted and ignored, and the
# activation switches (they set ModelConfig.activation).
NOT_FIELDS = {"help", "group_query_attention", "multi_latent_attention", "swiglu", "squared_relu"}
MODEL_CONFIG_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.init}


def flag_dests() -> set[str]:
    return {action.dest for action in build_parser()._actions} - NOT_FIELDS


def model_flag_field(dest: str) -> str | None:
    field = MODEL_FLAG_FIELDS.get(dest, dest)
    return field if field in MODEL_CONFIG_DEFAULTS and field != "vocab_size" else None


def test_every_flag_sets_exactly_one_settings_field_and_every_field_has_a_flag():
    owners: dict[str, list[str]] = {}
    for group in GROUPS:
        for field in dataclasses.fields(group):
            owners.setdefault(field.name, []).append(group.__name__)
    owners.setdefault("make_vocab_size_divisible_by", []).append("ModelSettings")
    for dest in flag_dests():
        if model_flag_field(dest) is not None:
            owners.setdefault(dest, []).append("ModelSettings.config_fields")
    assert {dest: groups for dest, groups in owners.items() if len(groups) > 1} == {}
    assert flag_dests() ^ owners.keys() == set()


@pytest.mark.parametrize("group", GROUPS, ids=lambda g: g.__name__)
def test_flag_defaults_are_the_settings_defaults(group):
    parsed = flags_to_settings(group, build_parser().parse_args([]))
    assert parsed == group()


def model_config_default(field: str):
    default = MODEL_CONFIG_DEFAULTS[field]
    return None if default is dataclasses.MISSING else default


def test_model_flag_defaults_are_model_config_defaults_except_the_stated_overrides():
    args = build_parser().parse_args([])
    fields = settings_from_args(args).model.resolved_fields()
    for dest in vars(args):
        field = model_flag_field(dest)
        if field is None or field == "activation":
            continue
        expected = DEFAULT_MODEL_OVERRIDES.get(field, model_config_default(field))
        assert fields[field] == expected, dest
    assert args.make_vocab_size_divisible_by == ModelSettings().make_vocab_size_divisible_by


def test_a_command_line_that_sizes_its_model_gets_megatron_defaults_for_the_rest():
    # A Megatron-LM command line: the small model's values (state 32, chunks of 64, 4 experts,
    # an aux loss) must not leak into it; every flag it leaves out means Megatron's default.
    megatron = ["--hidden-size", "1024", "--num-attention-heads", "16", "--mamba-num-heads", "32"]
    fields = settings_from_args(build_parser().parse_args(megatron)).model.resolved_fields()
    for field in DEFAULT_MODEL_OVERRIDES:
        if field in ("hidden_size", "num_attention_heads", "hybrid_layer_pattern"):
            continue
        assert fields[field] == model_config_default(field), field
    assert (fields["mamba_state_dim"], fields["mamba_chunk_size"]) == (128, 128)
    assert fields["hybrid_layer_pattern"] == DEFAULT_MODEL_OVERRIDES["hybrid_layer_pattern"]
    # Only a pattern (the embedded run with another stack) keeps the small model.
    pattern = ["--hybrid-layer-pattern", "M*-"]
    fields = settings_from_args(build_parser().parse_args(pattern)).model.resolved_fields()
    assert fields["mamba_state_dim"] == DEFAULT_MODEL_OVERRIDES["mamba_state_dim"]
    assert fields["hidden_size"] == DEFAULT_MODEL_OVERRIDES["hidden_size"]
    # A hidden size that arrives later (a Megatron checkpoint's args under
    # --use-checkpoint-args, which lack the chunk length) decides the same way.
    unset = settings_from_args(build_parser().parse_args([])).model
    from_checkpoint = dataclasses.replace(
        unset, config_fields={**unset.config_fields, "hidden_size": 1024}
    )
    assert from_checkpoint.resolved_fields()["mamba_chunk_size"] == 128
    # A flag given explicitly wins either way.
    given = [*megatron, "--mamba-chunk-size", "64"]
    fields = settings_from_args(build_parser().parse_args(given)).model.resolved_fields()
    assert fields["mamba_chunk_size"] == 64


def test_every_override_differs_from_model_config():
    for field, value in DEFAULT_MODEL_OVERRIDES.items():
        assert MODEL_CONFIG_DEFAULTS[field] != value, field


def test_settings_from_args_maps_every_group():
    args = build_parser().parse_args(
        [
            "--num-experts",
            "8",
            "--norm-epsilon",
            "1e-6",
            "--swiglu",
            "--seq-length",
            "64",
            "--tensor-model-parallel-size",
            "2",
            "--save",
            "ckpt",
            "--eval-iters",
            "3",
            "--mock-data",
            "--tokenizer-type",
            "NullTokenizer",
            "--vocab-size",
            "300",
            "--kernel",
            "rms_norm=eager",
        ]
    )
    settings = settings_from_args(args)
    fields = settings.model.config_fields
    assert (fields["num_moe_experts"], fields["layernorm_epsilon"], fields["activation"]) == (
        8,
        1e-6,
        "swiglu",
    )
    assert "vocab_size" not in fields  # --vocab-size is the NullTokenizer's
    assert settings.model.config(301).vocab_size == 384  # padded to a multiple of 128
    assert (
        settings.training.seq_length,
        settings.parallel.tensor_model_parallel_size,
        settings.checkpoint.save,
        settings.logging.eval_iters,
    ) == (64, 2, "ckpt", 3)
    assert settings.data.mock_data and settings.tokenizer.vocab_size == 300
    assert settings.kernels.kernel == ["rms_norm=eager"]


@pytest.mark.parametrize("group", (*GROUPS, ModelSettings, Settings), ids=lambda g: g.__name__)
def test_every_settings_field_has_a_docstring(group):
    source = ast.parse(inspect.getsource(inspect.getmodule(group)))
    body = next(
        node
        for node in source.body
        if isinstance(node, ast.ClassDef) and node.name == group.__name__
    ).body
    undocumented = [
        node.target.id
        for node, after in zip(body, [*body[1:], None], strict=True)
        if isinstance(node, ast.AnnAssign)
        and not (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant))
    ]
    assert undocumented == []
