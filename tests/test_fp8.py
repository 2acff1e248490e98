"""FP8 GEMMs (`--fp8-format`, `--fp8-recipe`, torchao's float8 training): flag and device errors
before any work, which linear layers are converted, checkpoints that stay canonical and high
precision, and the numerics of a training step against float32."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from conftest import perturb_parameters, small_config
from test_training import TINY

from megatron_hybrid.checkpointing.state import ModelState
from megatron_hybrid.kernels.float8 import FP8_RECIPES, UNSUPPORTED_MEGATRON_RECIPES
from megatron_hybrid.kernels.registry import KernelError
from megatron_hybrid.model import HybridModel
from megatron_hybrid.parallel.activation_checkpoint import _save_expensive_ops
from megatron_hybrid.parallel.dims import ParallelDims
from megatron_hybrid.parallel.fp8 import bind_fp8, convert_blocks_to_fp8, fp8_linear_eligible
from megatron_hybrid.parallel.parallelize import ParallelSettings, parallelize
from megatron_hybrid.training.cli import main

SUPPORTED = "supported: --fp8-format e4m3 or hybrid with --fp8-recipe tensorwise or rowwise"


def fp8_config(pattern: str, **overrides):
    """small_config with every dense GEMM's dimensions multiples of 16 (hidden 64, Mamba in_proj
    2 x 128 + 2 x 2 x 16 + 16 = 336 rows, attention qkv 128 rows, shared experts 32 wide) and an
    untied output layer; the routed experts and the router as in any MoE layer."""
    fields = dict(
        hidden_size=64,
        ffn_hidden_size=128,
        mamba_head_dim=8,
        mamba_num_heads=16,
        mamba_state_dim=16,
        moe_ffn_hidden_size=32,
        moe_shared_expert_intermediate_size=32,
        untie_embeddings_and_output_weights=True,  # an output layer of its own, left as it is
    )
    return small_config(pattern, **{**fields, **overrides})


def run_cli_capturing(capsys, *flags):
    code = main(list(flags))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- errors before any work (no torchao needed) ---------------------------------------------------


def test_fp8_on_the_cpu_stops_before_training_with_what_it_needs(capsys):
    code, out, err = run_cli_capturing(capsys, *TINY, "--device", "cpu", "--fp8-format", "e4m3")
    assert code == 2
    assert "--fp8-format e4m3" in err and "needs a cuda device, got cpu" in err
    assert "compute capability 8.9" in err and "drop the flag" in err
    assert "kernels (" not in out + err  # stopped before the data, kernels and model were built


def test_an_unknown_format_is_refused_naming_the_valid_ones(capsys):
    with pytest.raises(SystemExit) as stop:
        main([*TINY, "--fp8-format", "e5m2"])
    assert stop.value.code == 2
    assert "--fp8-format: invalid choice: 'e5m2' (choose from e4m3, hybrid)" in (
        capsys.readouterr().err.replace("'e4m3'", "e4m3").replace("'hybrid'", "hybrid")
    )


@pytest.mark.parametrize("recipe", sorted(UNSUPPORTED_MEGATRON_RECIPES))
def test_megatron_recipes_torchao_lacks_are_refused_with_the_reason(capsys, recipe):
    code, _, err = run_cli_capturing(capsys, *TINY, "--fp8-format", "e4m3", "--fp8-recipe", recipe)
    assert code == 2
    assert f"--fp8-recipe {recipe} is not supported: " in err and SUPPORTED in err


@pytest.mark.parametrize(
    "flags,message",
    [
        (("--fp8-format", "hybrid", "--fp8-recipe", "rowwise"), "casts the gradients to e4m3"),
        (
            ("--fp8-format", "e4m3", "--tensor-model-parallel-size", "2"),
            "--tensor-model-parallel-size 2 is not supported",
        ),
        (
            ("--fp8-format", "e4m3", "--seq-length", "21"),  # 4 x 21 = 84 tokens
            "--micro-batch-size x --seq-length = 84 tokens must be a multiple of 16",
        ),
        (("--fp8-format", "e4m3", "--kernel", "mlp=tiled"), "bypassing FP8"),
        (("--fp8-format", "e4m3", "--fp8-recipe", "rowwise"), "rowwise needs --bf16"),
    ],
)
def test_combinations_fp8_cannot_run_stop_before_any_work(capsys, flags, message):
    code, out, err = run_cli_capturing(capsys, *TINY, *flags)
    assert code == 2 and message in err, err
    assert "kernels (" not in out + err


def test_fp8_on_an_older_gpu_names_the_compute_capability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(
        KernelError, match=r"needs compute capability >= 8\.9, device cuda has 8\.0"
    ):
        bind_fp8("hybrid", "cuda")


def test_fp8_without_torchao_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # import fails as if not installed
    with pytest.raises(KernelError, match="cannot import torchao.float8") as error:
        bind_fp8("e4m3", "cuda")
    assert "pip install torchao" in str(error.value)


def test_selective_recompute_keeps_fp8_gemm_outputs():
    from torch.utils.checkpoint import CheckpointPolicy

    assert _save_expensive_ops(None, torch.ops.aten._scaled_mm.default) == (
        CheckpointPolicy.MUST_SAVE
    )


def test_parallelize_converts_to_fp8_first_and_refuses_tensor_parallelism(monkeypatch):
    from megatron_hybrid.parallel import parallelize as parallelize_module

    calls = []
    for step in ("apply_fp8", "apply_expert_parallel", "apply_activation_checkpointing"):
        monkeypatch.setattr(parallelize_module, step, lambda *a, step=step, **k: calls.append(step))
    for step in ("apply_compile", "apply_data_parallel"):
        monkeypatch.setattr(parallelize_module, step, lambda *a, step=step, **k: calls.append(step))
    settings = ParallelSettings(fp8_format="e4m3", recompute_granularity="full", compile=True)
    model = HybridModel(small_config("M-"))
    parallelize(model, ParallelDims(2), object(), settings, bf16=True)
    assert calls == [
        "apply_fp8",
        "apply_expert_parallel",
        "apply_activation_checkpointing",
        "apply_compile",
        "apply_data_parallel",
    ]
    with pytest.raises(ValueError, match="--tensor-model-parallel-size 2 is not supported"):
        parallelize(model, ParallelDims(2, tp=2), object(), settings, bf16=True)


def test_the_throughput_benchmark_hands_its_fp8_flags_to_parallelize(monkeypatch, capsys):
    from pathlib import Path

    from megatron_hybrid.parallel import parallelize as parallelize_module

    requested = []
    monkeypatch.setattr(
        parallelize_module,
        "apply_fp8",
        lambda part, fp8_format, fp8_recipe, log: requested.append((fp8_format, fp8_recipe)),
    )
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import train_throughput

    try:
        flags = ["--config", "cpu-smoke", "--steps", "1", "--warmup", "0", "--device", "cpu"]
        assert train_throughput.main([*flags, "--fp8-format", "hybrid"]) == 0
        assert requested == [("hybrid", "tensorwise")]
        with pytest.raises(SystemExit):
            train_throughput.main([*flags, "--fp8-format", "e4m3", "--fp8-recipe", "delayed"])
        assert "--fp8-recipe delayed is not supported" in capsys.readouterr().err
    finally:
        sys.modules.pop("train_throughput", None)


# -- the conversion (torchao's module swap runs on the CPU; no FP8 GEMM runs here) ----------------


def converted(pattern: str, fp8_format: str = "e4m3", **overrides):
    """(model, converted names, names left in high precision) for `pattern` under FP8."""
    from megatron_hybrid.kernels.float8.torchao import convert_to_float8_training

    model = HybridModel(fp8_config(pattern, **overrides), seed=3)
    names, kept = convert_blocks_to_fp8(model, fp8_format, "tensorwise", convert_to_float8_training)
    return model, names, kept


MLP = ("channel_mixer.linear_fc1", "channel_mixer.linear_fc2")
SHARED = ("channel_mixer.shared_experts.linear_fc1", "channel_mixer.shared_experts.linear_fc2")
MAMBA = ("sequence_mixer.in_proj", "sequence_mixer.out_proj")
ATTENTION = ("sequence_mixer.linear_qkv", "sequence_mixer.linear_proj")


@pytest.mark.parametrize(
    "pattern,expected",
    [
        ("M*-E", {0: MAMBA, 1: ATTENTION, 2: MLP, 3: SHARED}),
        ("[M-][*E]", {0: MAMBA + MLP, 1: ATTENTION + SHARED}),
    ],
)
def test_the_dense_gemms_of_the_blocks_are_converted_and_nothing_else(pattern, expected):
    pytest.importorskip("torchao.float8")
    from megatron_hybrid.kernels.float8.torchao import is_float8_linear

    model, names, kept = converted(pattern)
    assert sorted(names) == sorted(
        f"decoder.layers.{block}.{name}" for block, roles in expected.items() for name in roles
    )
    assert kept == []
    fp8_modules = {name for name, module in model.named_modules() if is_float8_linear(module)}
    assert fp8_modules == set(names)
    # Outside the rule: the output layer (an nn.Linear outside the blocks), the embedding, the
    # router (a weight parameter) and the routed experts (grouped weights of the moe.experts op).
    assert type(model.output_layer) is torch.nn.Linear
    moe = next(m for m in model.modules() if type(m).__name__ == "MoELayer")
    assert not any(is_float8_linear(m) for m in (*moe.router.modules(), *moe.experts.modules()))


def test_mtp_blocks_are_converted_but_not_eh_proj():
    pytest.importorskip("torchao.float8")
    model, names, _ = converted("M-/*-")
    assert sorted(names) == sorted(
        [*(f"decoder.layers.0.{n}" for n in MAMBA), *(f"decoder.layers.1.{n}" for n in MLP)]
        + [
            f"mtp.layers.0.mtp_model_layer.layers.{i}.{n}"
            for i, ns in ((0, ATTENTION), (1, MLP))
            for n in ns
        ]
    )
    assert type(model.mtp.layers[0].eh_proj) is torch.nn.Linear


def test_a_linear_layer_with_a_dimension_not_a_multiple_of_16_stays_and_is_logged():
    pytest.importorskip("torchao.float8")
    # 8 Mamba heads: in_proj has 2 x 64 + 2 x 2 x 16 + 8 = 200 rows, not a multiple of 16.
    model, names, kept = converted("M-", mamba_num_heads=8)
    assert kept == ["decoder.layers.0.sequence_mixer.in_proj"]
    assert "decoder.layers.0.sequence_mixer.out_proj" in names
    assert not fp8_linear_eligible(model.decoder.layers["0"].sequence_mixer.in_proj)


def test_the_format_and_recipe_reach_torchao_as_megatron_defines_them():
    pytest.importorskip("torchao.float8")
    from megatron_hybrid.kernels.float8.torchao import float8_linear_config

    e4m3, e5m2 = torch.float8_e4m3fn, torch.float8_e5m2
    for fp8_format, recipe, gradient in [
        ("e4m3", "tensorwise", e4m3),
        ("hybrid", "tensorwise", e5m2),
        ("e4m3", "rowwise", e4m3),
    ]:
        config = float8_linear_config(fp8_format, recipe)
        assert config.cast_config_input.target_dtype == e4m3
        assert config.cast_config_weight.target_dtype == e4m3
        assert config.cast_config_grad_output.target_dtype == gradient
        assert config.cast_config_grad_output_for_grad_weight.target_dtype == gradient
        granularity = config.cast_config_input.scaling_granularity.value
        assert granularity == {"tensorwise": "tensorwise", "rowwise": "axiswise"}[recipe]
    assert set(FP8_RECIPES) == {"tensorwise", "rowwise"}


@pytest.mark.parametrize("pattern", ["M*-E", "[M-][*E]"])
def test_the_canonical_state_is_unchanged_by_the_conversion(pattern):
    pytest.importorskip("torchao.float8")
    plain = perturb_parameters(HybridModel(fp8_config(pattern), seed=3))
    fp8 = copy.deepcopy(plain)
    from megatron_hybrid.kernels.float8.torchao import convert_to_float8_training

    convert_blocks_to_fp8(fp8, "hybrid", "tensorwise", convert_to_float8_training)
    before = ModelState(plain, plain.config.pattern).state_dict()
    after = ModelState(fp8, fp8.config.pattern).state_dict()
    assert list(after) == list(before)  # the same canonical keys, in the same order
    for key, tensor in before.items():
        assert after[key].dtype == tensor.dtype == torch.float32, key  # never FP8
        assert torch.equal(after[key], tensor), key


def test_checkpoints_of_fp8_and_plain_models_load_into_each_other(tmp_path):
    pytest.importorskip("torchao.float8")
    from megatron_hybrid.checkpointing.manager import CheckpointSaver, load_checkpoint
    from megatron_hybrid.kernels.float8.torchao import convert_to_float8_training

    def model(seed: int, fp8: bool) -> HybridModel:
        built = perturb_parameters(HybridModel(fp8_config("[M-][*E]"), seed=seed), seed=seed)
        if fp8:
            convert_blocks_to_fp8(built, "e4m3", "tensorwise", convert_to_float8_training)
        return built

    for saved_fp8 in (True, False):
        source, target = model(1, saved_fp8), model(2, not saved_fp8)
        directory = tmp_path / f"saved_fp8_{saved_fp8}"
        CheckpointSaver(directory, log=lambda _: None).save(1, source, None, None, source.config)
        load_checkpoint(directory, target, None, target.config)
        want = ModelState(source, source.config.pattern).state_dict()
        got = ModelState(target, target.config.pattern).state_dict()
        assert want.keys() == got.keys()
        assert all(torch.equal(want[key], got[key]) for key in want)


# -- numerics of one training step ---------------------------------------------------------------


def step_loss_and_grads(model: HybridModel, tokens: torch.Tensor, autocast: bool):
    """The mean next-token loss of `tokens` and every parameter's gradient (float32)."""
    model.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    grads = {name: p.grad.float().clone() for name, p in model.named_parameters()}
    return loss.detach().float(), grads


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value - reference).norm() / reference.norm()).item()


# e4m3 keeps 3 mantissa bits: one rounding moves a value by up to 2^-4 of itself, 2^-4 / sqrt(3)
# = 3.6% RMS (e5m2's 2 bits, the hybrid format's gradients: 7.2%). A GEMM's output sums K
# products whose errors are independent, so it is off by about as much as its operands, and a
# gradient reaching a weight passes through a few such GEMMs: the whole gradient (every
# parameter's, as one vector) stays within about 10% of float32 (measured with torchao's
# emulation on the CPU: 5.7% e4m3, 7.6% hybrid). Single tensors whose gradient sums terms that
# cancel (norm weights, dt_bias) lose more of their small norm (measured at most 12.5% e4m3,
# 15.8% hybrid), so each tensor only has to stay within 30%: a gradient that is missing or wrong
# is off by 100%. The loss, a mean over 128 near-uniform predictions, moves far less (measured
# 2e-5): within 1%. bf16 rounds to 2^-9, about 16 times finer than e4m3: FP8 GEMMs really ran
# when the gradient is off by more than twice what bf16 alone costs (and, emulated, by 2%).
LOSS_TOLERANCE = 1e-2
TOTAL_GRAD_TOLERANCE = 0.12
TENSOR_GRAD_TOLERANCE = 0.3
# No MoE layer here: FP8 rounding of the router's scores can flip a token's expert choice, a
# discrete change in the gradients that rounding does not bound.
NUMERICS_PATTERN = "[M-][*-]"


def gradient_errors(reference, grads) -> tuple[float, dict[str, float]]:
    """(the whole gradient's relative error, each parameter's) against `reference`."""
    flat = [(grads[name].flatten(), want.flatten()) for name, want in reference.items()]
    total = relative_error(torch.cat([g for g, _ in flat]), torch.cat([w for _, w in flat]))
    return total, {name: relative_error(grads[name], want) for name, want in reference.items()}


def check_fp8_step_against_float32(fp8_format: str, fp8_recipe: str, device: str, emulate: bool):
    from megatron_hybrid.kernels.float8.torchao import convert_to_float8_training

    reference = perturb_parameters(HybridModel(fp8_config(NUMERICS_PATTERN), seed=3)).to(device)
    fp8 = copy.deepcopy(reference)
    if emulate:  # the CPU: the module swap with emulated FP8 GEMMs (the bound one needs CUDA)
        convert_blocks_to_fp8(
            fp8,
            fp8_format,
            fp8_recipe,
            lambda *args: convert_to_float8_training(*args, emulate=True),
        )
    else:  # the parallelize step as the trainer runs it
        logs = []
        settings = ParallelSettings(fp8_format=fp8_format, fp8_recipe=fp8_recipe)
        parallelize(fp8, ParallelDims(world_size=1), None, settings, bf16=True, log=logs.append)
        assert any(line.startswith(f"FP8 ({fp8_format}, {fp8_recipe}, torchao)") for line in logs)
    tokens = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(1)).to(device)
    want_loss, want_grads = step_loss_and_grads(reference, tokens, autocast=False)
    loss, grads = step_loss_and_grads(fp8, tokens, autocast=not emulate)
    assert abs(loss - want_loss) <= LOSS_TOLERANCE * want_loss, (loss, want_loss)
    total, per_tensor = gradient_errors(want_grads, grads)
    assert total <= TOTAL_GRAD_TOLERANCE, total
    worst = max(per_tensor, key=per_tensor.get)
    assert per_tensor[worst] <= TENSOR_GRAD_TOLERANCE, (worst, per_tensor[worst])
    if emulate:
        assert total > 0.02, total  # FP8 rounding really happened
    else:
        bf16 = copy.deepcopy(reference)
        _, bf16_grads = step_loss_and_grads(bf16, tokens, autocast=True)
        bf16_total, _ = gradient_errors(want_grads, bf16_grads)
        assert total > 2 * bf16_total, (total, bf16_total)  # not bf16 GEMMs under another name


@pytest.mark.parametrize(
    "fp8_format,fp8_recipe", [("e4m3", "tensorwise"), ("hybrid", "tensorwise")]
)
def test_an_emulated_fp8_step_stays_within_fp8_rounding_of_float32(fp8_format, fp8_recipe):
    pytest.importorskip("torchao.float8")
    check_fp8_step_against_float32(fp8_format, fp8_recipe, "cpu", emulate=True)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "fp8_format,fp8_recipe", [("e4m3", "tensorwise"), ("hybrid", "tensorwise"), ("e4m3", "rowwise")]
)
def test_an_fp8_step_on_the_gpu_stays_within_fp8_rounding_of_float32(fp8_format, fp8_recipe):
    pytest.importorskip("torchao.float8")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 GEMMs need compute capability 8.9")
    check_fp8_step_against_float32(fp8_format, fp8_recipe, "cuda", emulate=False)


@pytest.mark.gpu
def test_a_checkpoint_saved_under_fp8_resumes_in_bf16_and_the_reverse(tmp_path):
    pytest.importorskip("torchao.float8")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 GEMMs need compute capability 8.9")
    from megatron_hybrid.training.arguments import build_parser
    from megatron_hybrid.training.trainer import run_training

    model_flags = [
        *("--hybrid-layer-pattern", "[M-][*E]", "--hidden-size", "64", "--ffn-hidden-size", "128"),
        *("--num-attention-heads", "4", "--num-query-groups", "2", "--mamba-head-dim", "8"),
        *("--mamba-num-heads", "16", "--mamba-state-dim", "16", "--num-experts", "4"),
        *("--moe-ffn-hidden-size", "32", "--moe-shared-expert-intermediate-size", "32"),
        *("--seq-length", "32", "--micro-batch-size", "4", "--device", "cuda", "--bf16"),
        *("--eval-iters", "0", "--generate-tokens", "0", "--no-progress-bar"),
    ]

    def run(directory, iters: int, *flags: str):
        args = build_parser().parse_args(
            [*model_flags, "--train-iters", str(iters), "--save", str(directory), *flags]
        )
        return run_training(args)

    for first, then in [(("--fp8-format", "hybrid"), ()), ((), ("--fp8-format", "e4m3"))]:
        directory = tmp_path / ("fp8_first" if first else "bf16_first")
        run(directory, 2, *first)
        resumed = run(directory, 4, "--load", str(directory), *then)
        assert resumed.iteration == 4 and len(resumed.losses) == 2
        assert all(torch.isfinite(torch.tensor(resumed.losses)))
