"""Megatron-Core `torch_dist` checkpoints in and out.

In: checkpoints built by the independent writer of tests/megatron_core_writer.py, in every key
spelling of the format (TE-fused or separate norms, split or packed Mamba in_proj/conv1d,
stacked or per-expert experts), saved at tensor-parallel size 1 and 2, load with `--load` into
the same logits as the same weights loaded our way, and resume training as our own checkpoint
of the same state does. Out: `to-megatron` writes what a Megatron-Core model requests, and
ours -> to-megatron -> from-megatron -> ours is bitwise the same model.
"""

from __future__ import annotations

import dataclasses
import io
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import perturb_parameters, small_config
from megatron_core_writer import (
    Variant,
    extra_state_keys,
    megatron_tensors,
    write_megatron_checkpoint,
)
from test_distributed import assert_close, torchrun
from test_training import TINY

from megatron_hybrid.canonical import canonical_key
from megatron_hybrid.checkpointing.consolidated import read_model_state
from megatron_hybrid.checkpointing.convert import main as convert
from megatron_hybrid.checkpointing.errors import CheckpointError
from megatron_hybrid.checkpointing.manager import CheckpointSaver, load_checkpoint
from megatron_hybrid.checkpointing.megatron_core.args import MIXER_ARG_NAMES
from megatron_hybrid.checkpointing.state import ModelState, TrainProgress
from megatron_hybrid.model import HybridModel
from megatron_hybrid.training.arguments import (
    build_parser,
    model_config_from_args,
    settings_from_args,
)
from megatron_hybrid.training.optimizer import build_optimizer
from megatron_hybrid.training.trainer import run_training

# Every tensor kind of the format: Mamba, attention with rope, SwiGLU MLP, MoE with sigmoid
# routing, expert bias and a shared expert; fused groups on our side.
OPTIONS = dict(
    activation="swiglu",
    position_embedding_type="rope",
    moe_router_score_function="sigmoid",
    moe_router_enable_expert_bias=True,
    moe_shared_expert_intermediate_size=16,
)
PATTERN = "[M-]M*E"
TOKENS = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(1))

VARIANTS = [
    Variant(layer_spec, in_proj, experts, tp)
    for tp in (1, 2)
    for layer_spec, in_proj, experts in (
        ("te", "split", "grouped"),
        ("local", "split", "grouped"),
        ("te", "packed", "per_expert"),
        ("local", "packed", "local_experts"),
    )
] + [Variant(common="file"), Variant(tp=2, common="file"), Variant(tp=2, pp=2)]


def model_and_state(pattern=PATTERN, seed=3, **options):
    config = small_config(pattern, **{**OPTIONS, **options})
    model = perturb_parameters(HybridModel(config, seed=seed), seed=seed)
    return model, ModelState(model, config.pattern).state_dict()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS)


def loaded_our_way(tmp_path, model) -> torch.Tensor:
    CheckpointSaver(tmp_path / "ours", log=lambda _: None).save(1, model, None, None, model.config)
    fresh = HybridModel(model.config, seed=99)
    load_checkpoint(tmp_path / "ours", fresh, None, fresh.config)
    return logits(fresh)


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_each_variant_loads_with_the_logits_of_our_own_load(tmp_path, variant):
    model, state = model_and_state()
    write_megatron_checkpoint(tmp_path / "megatron", state, model.config, variant)
    fresh = HybridModel(model.config, seed=99)  # other weights: the load must replace all
    assert load_checkpoint(tmp_path / "megatron", fresh, None, fresh.config) is None
    # The same float32 values either way (equal in fact); 1e-6 bounds float32 rounding of
    # logits of size ~1 had any tensor gone through arithmetic.
    torch.testing.assert_close(logits(fresh), loaded_our_way(tmp_path, model), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "variant",
    [Variant("te", "split", "grouped", 2), Variant("local", "packed", "per_expert")],
    ids=str,
)
def test_gated_deltanet_and_a_latent_grouped_moe_load_too(tmp_path, variant):
    options = dict(moe_latent_size=16, moe_router_num_groups=2, moe_router_group_topk=1)
    model, state = model_and_state("G[*E]M", **options)
    write_megatron_checkpoint(tmp_path / "megatron", state, model.config, variant)
    fresh = HybridModel(model.config, seed=99)
    load_checkpoint(tmp_path / "megatron", fresh, None, fresh.config)
    torch.testing.assert_close(logits(fresh), loaded_our_way(tmp_path, model), atol=1e-6, rtol=0)


# MLA and DSA, fused and apart, with the query latent and the latent norms, which TE's MLA fuses
# into its up-projections and DSA keeps apart; the indexer picks 4 keys of up to 13.
LATENT_PATTERN = "[+E]M[D-]"
LATENT_OPTIONS = dict(q_lora_rank=16, qk_layernorm=True, dsa_indexer_topk=4)


@pytest.mark.parametrize(
    "variant", [Variant(spec, tp=tp) for tp in (1, 2) for spec in ("te", "local")], ids=str
)
def test_mla_and_dsa_load_with_the_logits_of_our_own_load(tmp_path, variant):
    model, state = model_and_state(LATENT_PATTERN, **LATENT_OPTIONS)
    write_megatron_checkpoint(tmp_path / "megatron", state, model.config, variant)
    fresh = HybridModel(model.config, seed=99)
    messages = []
    load_checkpoint(tmp_path / "megatron", fresh, None, fresh.config, log=messages.append)
    # The args describe the same MLA and DSA layers (other fields Megatron's args lack may warn).
    differences = "\n".join(m for m in messages if "another model config" in m)
    assert not any(f"{name}:" in differences for name in MIXER_ARG_NAMES), differences
    torch.testing.assert_close(logits(fresh), loaded_our_way(tmp_path, model), atol=1e-6, rtol=0)


def test_an_untied_output_layer_loads(tmp_path):
    model, state = model_and_state(untie_embeddings_and_output_weights=True)
    write_megatron_checkpoint(tmp_path / "megatron", state, model.config, Variant(tp=2))
    fresh = HybridModel(model.config, seed=99)
    load_checkpoint(tmp_path / "megatron", fresh, None, fresh.config)
    assert torch.equal(fresh.output_layer.weight, model.output_layer.weight)
    torch.testing.assert_close(logits(fresh), loaded_our_way(tmp_path, model), atol=1e-6, rtol=0)


def test_an_iteration_directory_loads_too(tmp_path):
    model, state = model_and_state()
    directory = write_megatron_checkpoint(tmp_path, state, model.config, Variant(), iteration=5)
    fresh = HybridModel(model.config, seed=99)
    load_checkpoint(directory, fresh, None, fresh.config)
    assert torch.equal(logits(fresh), logits(model))


# -- resume ----------------------------------------------------------------------------------------
RESUME = [*TINY, "--hybrid-layer-pattern", "[M-]*E", "--swiglu", "--train-iters", "5"]
RESUME += ["--log-interval", "1", "--moe-router-enable-expert-bias", "--global-batch-size", "4"]


def resume_state(seed: int = 0):
    """A model, Adam moments and step 3 as three iterations of training would leave them (the
    flags' model; random values, drawn per canonical key)."""
    args = build_parser().parse_args(RESUME)
    config, training = model_config_from_args(args, 257), settings_from_args(args).training
    model = perturb_parameters(HybridModel(config, seed=seed), seed=seed)
    betas = (training.adam_beta1, training.adam_beta2)
    optimizer = build_optimizer(model, training.lr, training.weight_decay, betas, training.adam_eps)
    generator = torch.Generator().manual_seed(seed)
    moments = {}
    for name, param in model.named_parameters():
        exp_avg = 1e-3 * torch.randn(param.shape, generator=generator)
        exp_avg_sq = 1e-6 * torch.rand(param.shape, generator=generator)
        optimizer.state[param] = {
            "step": torch.tensor(3.0),
            "exp_avg": exp_avg,
            "exp_avg_sq": exp_avg_sq,
        }
        moments[canonical_key(name, config.pattern)] = (exp_avg, exp_avg_sq)
    return config, model, optimizer, moments


def resume(directory) -> list[float]:
    return run_training(build_parser().parse_args([*RESUME, "--load", str(directory)])).losses


@pytest.fixture(scope="module")
def resumed_from_ours(tmp_path_factory) -> list[float]:
    """The losses of a run resuming our own checkpoint of `resume_state()` at iteration 3."""
    config, model, optimizer, _ = resume_state()
    schedule = settings_from_args(build_parser().parse_args(RESUME)).training.lr_schedule()
    progress = TrainProgress(3, 12, lr_schedule=dataclasses.asdict(schedule))
    directory = tmp_path_factory.mktemp("ours")
    CheckpointSaver(directory, log=lambda _: None).save(3, model, optimizer, progress, config)
    return resume(directory)


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_each_variant_resumes_training_as_our_own_checkpoint_does(
    tmp_path, variant, resumed_from_ours
):
    config, model, _, moments = resume_state()
    state = ModelState(model, config.pattern).state_dict()
    write_megatron_checkpoint(
        tmp_path, state, config, variant, iteration=3, consumed_train_samples=12, moments=moments
    )
    from_megatron = resume(tmp_path)
    assert len(from_megatron) == 2  # iterations 4 and 5: it resumed at iteration 3
    # Same weights, moments, step, iteration and samples consumed: the same float32 training.
    assert from_megatron == resumed_from_ours


def test_use_checkpoint_args_builds_the_model_the_megatron_args_describe(
    tmp_path, resumed_from_ours, capsys
):
    config, model, _, moments = resume_state()
    state = ModelState(model, config.pattern).state_dict()
    write_megatron_checkpoint(
        tmp_path, state, config, Variant(), iteration=3, consumed_train_samples=12, moments=moments
    )
    flags = [*RESUME, "--hidden-size", "64", "--load", str(tmp_path), "--use-checkpoint-args"]
    resumed = run_training(build_parser().parse_args(flags)).losses
    assert "hidden_size: 64 -> 32" in capsys.readouterr().out
    assert resumed == resumed_from_ours  # the same model, state and data as our own resume


def test_the_optimizer_moments_land_on_their_parameters(tmp_path):
    config, model, _, moments = resume_state()
    state = ModelState(model, config.pattern).state_dict()
    write_megatron_checkpoint(tmp_path, state, config, Variant(tp=2), moments=moments)
    fresh = HybridModel(config, seed=7)
    optimizer = build_optimizer(fresh, 1e-2, 0.1, (0.9, 0.999), 1e-8)
    progress = load_checkpoint(tmp_path, fresh, optimizer, config, progress=TrainProgress())
    assert progress.iteration == 3
    for name, param in fresh.named_parameters():
        exp_avg, exp_avg_sq = moments[canonical_key(name, config.pattern)]
        assert torch.equal(optimizer.state[param]["exp_avg"], exp_avg)
        assert torch.equal(optimizer.state[param]["exp_avg_sq"], exp_avg_sq)
        assert float(optimizer.state[param]["step"]) == 3.0


def test_finetune_loads_the_weights_and_starts_at_iteration_0(tmp_path, capsys):
    config, model, _, moments = resume_state()
    state = ModelState(model, config.pattern).state_dict()
    write_megatron_checkpoint(tmp_path, state, config, Variant(), moments=moments)
    run_training(
        build_parser().parse_args(
            [*RESUME, "--train-iters", "1", "--finetune", "--load", str(tmp_path)]
        )
    )
    assert "starting at iteration 0" in capsys.readouterr().out


def test_an_optimizer_layout_that_does_not_map_is_skipped_with_one_warning(tmp_path, capsys):
    config, model, _, _ = resume_state()
    state = ModelState(model, config.pattern).state_dict()
    # Megatron's distributed optimizer (dp_reshardable): flat buffers per bucket, not moments
    # per parameter.
    buffers = {
        "optimizer.distributed.dp_group_idx_0.gbuf_idx_0.dtype_(torch.float32, torch.float32)"
        ".bucket_idx_0.exp_avg": torch.zeros(100)
    }
    write_megatron_checkpoint(tmp_path, state, config, Variant(), extra_tensors=buffers)
    result = run_training(build_parser().parse_args([*RESUME, "--load", str(tmp_path)]))
    assert len(result.losses) == 2  # resumed at iteration 3 with a fresh optimizer
    warnings = [line for line in capsys.readouterr().out.splitlines() if "optimizer" in line]
    assert len([w for w in warnings if w.startswith("warning: optimizer state not loaded")]) == 1


# -- what is not carried ---------------------------------------------------------------------------
def test_an_fp8_scale_history_is_reported_not_silently_dropped(tmp_path):
    model, state = model_and_state()
    write_megatron_checkpoint(tmp_path, state, model.config, Variant(fp8=True))
    messages = []
    load_checkpoint(tmp_path, HybridModel(model.config), None, model.config, log=messages.append)
    fp8 = [m for m in messages if "FP8 delayed-scaling" in m]
    assert len(fp8) == 1 and "decoder.layers.0.mixer.in_proj" in fp8[0]


def test_megatron_classes_in_the_args_are_read_without_megatron(tmp_path):
    from megatron_hybrid.checkpointing.megatron_core import read_megatron_state

    model, state = model_and_state()
    write_megatron_checkpoint(tmp_path, state, model.config, Variant())
    assert not any(name.startswith("megatron.") for name in sys.modules)  # nothing to import
    read = read_megatron_state(tmp_path)
    assert not any(name.startswith("megatron.") for name in sys.modules)
    assert read.args.model_type.stand_in_name == "megatron.core.enums.ModelType"
    assert read.args.model_type.stand_in_args == (1,)
    assert read.args.optimizer_config.optimizer == "adam"  # a dataclass's fields come through
    # The model config from the args, in Megatron's terms (its pattern has no fusion groups).
    assert read.config.hybrid_layer_pattern == "M-M*E"
    for field in (
        "hidden_size",
        "num_query_groups",
        "mamba_num_heads",
        "activation",
        "moe_router_score_function",
        "moe_shared_expert_intermediate_size",
    ):
        assert getattr(read.config, field) == getattr(model.config, field), field


def test_the_checkpoints_args_describe_the_model_and_differences_warn(tmp_path):
    model, state = model_and_state()
    write_megatron_checkpoint(
        tmp_path, state, model.config, Variant(), args_overrides={"moe_router_topk": 1}
    )
    messages = []
    load_checkpoint(tmp_path, HybridModel(model.config), None, model.config, log=messages.append)
    assert any("moe_router_topk: checkpoint 1, now 2" in m for m in messages)


# -- bad input -------------------------------------------------------------------------------------
def test_a_tensor_no_layer_saves_is_named_with_the_index_file(tmp_path):
    model, state = model_and_state()
    unknown = {"decoder.layers.2.self_attention.linear_qkv.bias": torch.zeros(8)}
    directory = write_megatron_checkpoint(
        tmp_path, state, model.config, Variant(), extra_tensors=unknown
    )
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(tmp_path, HybridModel(model.config), None, model.config)
    assert str(directory / ".metadata") in str(error.value)
    assert "decoder.layers.2.self_attention.linear_qkv.bias" in str(error.value)


def test_a_truncated_distcp_is_named_with_a_key_it_cuts_off(tmp_path):
    model, state = model_and_state()
    directory = write_megatron_checkpoint(tmp_path, state, model.config, Variant())
    shard = directory / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(tmp_path, HybridModel(model.config), None, model.config)
    message = str(error.value)
    assert str(shard) in message and "truncated" in message and "key '" in message


def test_a_missing_metadata_json_is_named(tmp_path):
    model, state = model_and_state()
    directory = write_megatron_checkpoint(tmp_path, state, model.config, Variant())
    (directory / "metadata.json").unlink()
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(tmp_path, HybridModel(model.config), None, model.config)
    assert f"{directory / 'metadata.json'} is missing" in str(error.value)
    assert "sharded_backend" in str(error.value)


def test_another_sharded_backend_is_refused_naming_the_file_and_key(tmp_path):
    model, state = model_and_state()
    directory = write_megatron_checkpoint(tmp_path, state, model.config, Variant())
    (directory / "metadata.json").write_text('{"sharded_backend": "zarr"}')
    with pytest.raises(CheckpointError, match="key 'sharded_backend' is 'zarr'") as error:
        load_checkpoint(tmp_path, HybridModel(model.config), None, model.config)
    assert str(directory / "metadata.json") in str(error.value)


def test_args_of_a_model_this_version_cannot_build_are_named(tmp_path, capsys):
    model, state = model_and_state()
    write_megatron_checkpoint(
        tmp_path,
        state,
        model.config,
        Variant(),
        args_overrides={"normalization": "LayerNorm", "swiglu": False},
    )
    assert convert(["from-megatron", str(tmp_path), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "normalization='LayerNorm'" in error and "neither swiglu nor squared_relu" in error


# -- out: to-megatron ------------------------------------------------------------------------------
def our_checkpoint(tmp_path, pattern=PATTERN, **options):
    model, _ = model_and_state(pattern, **options)
    progress = TrainProgress(iteration=6, consumed_train_samples=24)
    CheckpointSaver(tmp_path / "ours", log=lambda _: None).save(
        6, model, None, progress, model.config
    )
    return model


@pytest.mark.parametrize("layer_spec", ["te", "local"])
@pytest.mark.parametrize("tp", [1, 2])
def test_to_megatron_writes_the_keys_a_megatron_core_model_requests(tmp_path, layer_spec, tp):
    model = our_checkpoint(tmp_path)
    out = tmp_path / "megatron"
    args = ["to-megatron", str(tmp_path / "ours"), str(out), "--layer-spec", layer_spec]
    assert convert([*args, "--tensor-parallel-size", str(tp)]) == 0
    written = assert_holds_what_the_writer_spells(out, model, Variant(layer_spec=layer_spec, tp=tp))
    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    assert (out / "iter_0000006" / "metadata.json").read_text() == (
        '{"sharded_backend": "torch_dist", "sharded_backend_version": 1}'
    )
    # Megatron-LM reads the common state with weights_only=True, its Namespace allowed.
    (raw,) = written.read_objects(["common_state/shard_0_1"]).values()
    with torch.serialization.safe_globals([__import__("argparse").Namespace]):
        (common,) = torch.load(io.BytesIO(raw), weights_only=True)
    assert common["iteration"] == 6 and common["checkpoint_version"] == 3.0
    args = common["args"]
    assert args.tensor_model_parallel_size == tp and args.consumed_train_samples == 24
    assert args.hybrid_layer_pattern == "M-M*E" and args.num_layers == 5
    assert args.no_save_optim and args.no_save_rng  # Megatron-LM looks for neither
    if tp == 2:  # saved as two tensor-parallel ranks would: their chunks of in_proj's z part
        chunks = written.tensors["decoder.layers.0.mixer.in_proj.weight.z"].chunks
        assert [tuple(c.offsets) for c in chunks] == [(0, 0), (32, 0)]


def assert_holds_what_the_writer_spells(out: Path, model, variant: Variant):
    """What the writer of the format (the tests' own reading of Megatron-Core) says a model of
    `variant`'s spelling holds: every tensor with its global shape, every _extra_state, the
    common state. Returns the checkpoint `out` as read."""
    from megatron_hybrid.checkpointing.megatron_core.directory import open_checkpoint

    canonical = ModelState(model, model.config.pattern).state_dict()
    expected = {
        k: tuple(t.shape) for k, t in megatron_tensors(canonical, model.config, variant).items()
    }
    written = open_checkpoint(out)
    assert {k: tuple(m.size) for k, m in written.tensors.items()} == expected
    objects = set(extra_state_keys(canonical, model.config, variant)) | {"common_state/shard_0_1"}
    assert set(written.objects) == objects
    return written


@pytest.mark.parametrize("layer_spec", ["te", "local"])
@pytest.mark.parametrize("tp", [1, 2])
def test_ours_to_megatron_and_back_is_bitwise_the_same_model(tmp_path, layer_spec, tp):
    our_checkpoint(tmp_path, "[M-]|[*E]M-", moe_shared_expert_intermediate_size=None)
    assert_round_trip_is_bitwise(tmp_path, layer_spec, tp, "[M-]|[*E]M-")


def test_gated_deltanet_and_latent_moe_round_trip_bitwise(tmp_path):
    our_checkpoint(tmp_path, "[G-]|*[ME]", moe_latent_size=16)
    assert_round_trip_is_bitwise(tmp_path, "te", 2, "[G-]|*[ME]")


@pytest.mark.parametrize("layer_spec", ["te", "local"])
def test_mla_and_dsa_round_trip_bitwise_spelled_as_megatron_core_does(tmp_path, layer_spec):
    model = our_checkpoint(tmp_path, LATENT_PATTERN, **LATENT_OPTIONS)
    assert_round_trip_is_bitwise(tmp_path, layer_spec, 2, LATENT_PATTERN)
    assert_holds_what_the_writer_spells(tmp_path / "megatron", model, Variant(layer_spec, tp=2))


def assert_round_trip_is_bitwise(tmp_path, layer_spec, tp, pattern):
    megatron, back = tmp_path / "megatron", tmp_path / "back"
    args = ["to-megatron", str(tmp_path / "ours"), str(megatron), "--layer-spec", layer_spec]
    assert convert([*args, "--tensor-parallel-size", str(tp)]) == 0
    assert convert(["from-megatron", str(megatron), str(back)]) == 0
    before, config_before, _ = read_model_state(tmp_path / "ours")
    after, config_after, meta = read_model_state(back)
    assert config_after == config_before  # fusion groups and stages included
    assert config_after.hybrid_layer_pattern == pattern
    assert after.keys() == before.keys()
    assert all(
        torch.equal(after[k], before[k]) and after[k].dtype == before[k].dtype for k in before
    )
    assert meta["iteration"] == 6 and meta["consumed_train_samples"] == 24


def test_from_megatron_keeps_the_optimizer_so_our_checkpoint_resumes_alike(tmp_path):
    config, model, _, moments = resume_state()
    state = ModelState(model, config.pattern).state_dict()
    write_megatron_checkpoint(
        tmp_path / "megatron",
        state,
        config,
        Variant(),
        iteration=3,
        consumed_train_samples=12,
        moments=moments,
    )
    assert convert(["from-megatron", str(tmp_path / "megatron"), str(tmp_path / "ours")]) == 0
    direct = run_training(
        build_parser().parse_args([*RESUME, "--load", str(tmp_path / "megatron")])
    )
    converted = run_training(build_parser().parse_args([*RESUME, "--load", str(tmp_path / "ours")]))
    assert converted.losses == direct.losses and len(direct.losses) == 2


def test_to_megatron_refuses_a_tensor_parallel_size_that_does_not_divide(tmp_path, capsys):
    our_checkpoint(tmp_path)
    args = [
        "to-megatron",
        str(tmp_path / "ours"),
        str(tmp_path / "m"),
        "--tensor-parallel-size",
        "3",
    ]
    assert convert(args) == 2
    assert "is not divisible by it" in capsys.readouterr().err


@pytest.mark.slow
def test_a_tensor_parallel_run_resumes_a_megatron_checkpoint_as_one_process(tmp_path):
    config, model, _, moments = resume_state()
    state = ModelState(model, config.pattern).state_dict()
    megatron = tmp_path / "megatron"
    write_megatron_checkpoint(
        megatron,
        state,
        config,
        Variant(tp=2),
        iteration=3,
        consumed_train_samples=12,
        moments=moments,
    )
    one = run_training(build_parser().parse_args([*RESUME, "--load", str(megatron)])).losses
    tp2 = torchrun(
        2,
        *RESUME,
        "--load",
        str(megatron),
        "--tensor-model-parallel-size",
        "2",
        "--device",
        "cpu",
        log_dir=tmp_path,
    )
    # Tensor-parallel partial sums reorder float32 additions (tests/test_parallel_layouts.py).
    assert_close(tp2, one)


def test_tools_for_our_checkpoints_point_a_megatron_checkpoint_to_from_megatron(tmp_path, capsys):
    model, state = model_and_state()
    write_megatron_checkpoint(tmp_path, state, model.config, Variant())
    assert convert(["inspect", str(tmp_path)]) == 2
    assert "is a Megatron-Core checkpoint" in capsys.readouterr().err


def test_the_flags_the_readme_says_carry_over_are_flags_here():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = " ".join(readme[readme.index("**Flags that carry over unchanged**") :].split())
    section = section[: section.index("Megatron-LM's other flags")]
    listed = set(re.findall(r"`(--[a-z0-9-]+)`", section))
    ours = {o for a in build_parser()._actions for o in a.option_strings}
    assert len(listed) > 60 and listed <= ours, sorted(listed - ours)
