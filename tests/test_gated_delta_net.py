"""Gated DeltaNet (`G`): the layer against its float64 token-by-token reference
(tests/gdn_reference.py), its sizes and config checks, Megatron-Core's checkpoint names,
initialization, FLOPs and parameters, fused == unfused, the flags, Hugging Face export, and the
embedded default run with G layers."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import perturb_parameters, small_config
from gdn_reference import gated_delta_net_layer
from test_model import canonical_state
from test_training import TINY, short_default_run

from megatron_hybrid.checkpointing.hf_nemotron_h import HFExportError, hf_config_from_model_config
from megatron_hybrid.config import ConfigError
from megatron_hybrid.flops import layer_forward_flops_per_token, parameter_count
from megatron_hybrid.kernels.registry import REGISTRY, Implementation, resolve_kernels
from megatron_hybrid.layers.gated_delta_net import GatedDeltaNet
from megatron_hybrid.model import HybridModel
from megatron_hybrid.training.arguments import build_parser, model_config_from_args
from megatron_hybrid.training.trainer import run_training

# float32 against float64: relative error (max |error| / max |reference|) at most 1e-5, for the
# output and every gradient. float32 rounding is ~1e-7 per operation; through the delta rule
# (triangular solve, state carried over chunks) and the per-head output norm it grows to 1e-6
# to 6e-6 (measured over seeds and both size sets).
FLOAT32_REL = 1e-5


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@torch.no_grad()
def randomize(mixer: GatedDeltaNet, seed: int = 0) -> GatedDeltaNet:
    """Every parameter random (not the structured init) at the scales training sees: in_proj
    giving pre-activations of about N(0, 0.6), A = exp(A_log) in Megatron's [1, 16], dt_bias and
    the norm weight around their initial ones. (Far stronger decays and gates make the layer's
    own gradients ill-conditioned: float32 then loses bits before the kernel runs, whatever it
    does, as a float64 delta rule inside a float32 layer shows.)"""
    gen = torch.Generator().manual_seed(seed)
    scales = {"in_proj.weight": 0.1, "conv1d.weight": 0.5, "out_proj.weight": 0.2}
    for name, p in mixer.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if name in scales:
            p.copy_(scales[name] * noise)
        elif name == "A_log":
            p.copy_(torch.empty(p.shape).uniform_(0.0, math.log(16.0), generator=gen))
        else:  # dt_bias, out_norm.weight
            p.copy_(1.0 + 0.3 * noise)
    return mixer


SIZES = {
    # Derived from hidden 32 and 4 attention heads: 4 key heads, 8 value heads, all of dim 8.
    "derived": {},
    # Other key and value dims, three value heads per key head.
    "explicit": dict(
        linear_num_key_heads=2,
        linear_key_head_dim=6,
        linear_num_value_heads=6,
        linear_value_head_dim=4,
        linear_conv_kernel_dim=3,
    ),
}


@pytest.mark.parametrize("sizes", SIZES, ids=list(SIZES))
def test_layer_matches_the_float64_reference_forward_and_every_gradient(sizes):
    config = small_config("G", **SIZES[sizes])
    mixer = randomize(GatedDeltaNet(config))
    # 70 tokens: a whole chunk of 64 (the layer's) and a partial one, carrying state across.
    x = torch.randn(2, 70, 32, generator=torch.Generator().manual_seed(1))
    dy = torch.randn(2, 70, 32, generator=torch.Generator().manual_seed(2))

    x32 = x.clone().requires_grad_()
    y = mixer(x32)
    grads = torch.autograd.grad((y * dy).sum(), [x32, *mixer.parameters()])

    params64 = {n: p.detach().double().requires_grad_() for n, p in mixer.named_parameters()}
    x64 = x.double().requires_grad_()
    sizes64 = (
        config.linear_num_key_heads,
        config.linear_key_head_dim,
        config.linear_num_value_heads,
        config.linear_value_head_dim,
    )
    y64 = gated_delta_net_layer(x64, params64, sizes64, config.layernorm_epsilon)
    grads64 = torch.autograd.grad((y64 * dy.double()).sum(), [x64, *params64.values()])

    assert relative_error(y, y64) < FLOAT32_REL
    names = ["input", *params64]
    for name, got, want in zip(names, grads, grads64, strict=True):
        assert want.abs().max() > 0, name  # every parameter takes part
        assert relative_error(got, want) < FLOAT32_REL, name


def test_layer_runs_the_bound_gated_delta_rule_kernel():
    calls = []
    eager = REGISTRY.implementations("gated_delta_rule")["eager"].load()

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return eager(*args, **kwargs)

    registry = REGISTRY.copy()
    registry.register(Implementation("gated_delta_rule", "spy", spy))
    kernels = resolve_kernels({"gated_delta_rule": "spy"}, "eager", "cpu", registry)
    HybridModel(small_config("G-"), kernels=kernels)(torch.randint(0, 64, (2, 5)))
    assert calls == [(2, 5, 4, 8)]  # q: batch, seq, key heads, key dim


# -- sizes and checks -------------------------------------------------------------------------
def test_sizes_derive_from_hidden_size_and_heads():
    config = small_config("[G-]M")
    assert (config.linear_num_key_heads, config.linear_key_head_dim) == (4, 8)
    assert (config.linear_num_value_heads, config.linear_value_head_dim) == (8, 8)
    assert config.linear_conv_kernel_dim == 4
    # At Qwen3-Next's hidden size and heads, the derivation gives its (and Megatron's) sizes.
    qwen = small_config("G", hidden_size=2048, num_attention_heads=16)
    assert (qwen.linear_num_key_heads, qwen.linear_key_head_dim) == (16, 128)
    assert (qwen.linear_num_value_heads, qwen.linear_value_head_dim) == (32, 128)


def test_megatron_flags_override_the_derived_sizes():
    args = build_parser().parse_args(
        [
            *TINY,
            "--hybrid-layer-pattern",
            "[G-]M",
            "--linear-num-key-heads",
            "2",
            "--linear-key-head-dim",
            "16",
            "--linear-num-value-heads",
            "6",
            "--linear-value-head-dim",
            "12",
            "--linear-conv-kernel-dim",
            "2",
        ]
    )
    config = model_config_from_args(args, 256)
    assert (config.linear_num_key_heads, config.linear_key_head_dim) == (2, 16)
    assert (config.linear_num_value_heads, config.linear_value_head_dim) == (6, 12)
    assert config.linear_conv_kernel_dim == 2
    mixer = HybridModel(config).decoder.layers["0"].sequence_mixer
    assert mixer.conv1d.weight.shape == (2 * 32 + 72, 1, 2)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(num_attention_heads=None),
            r"Gated DeltaNet \('G'\) layers, whose sizes derive from num_attention_heads "
            r"\(--num-attention-heads\): set it, or set linear_num_key_heads",
        ),
        (
            dict(num_attention_heads=3),
            r"hidden_size=32 is not divisible by num_attention_heads=3.*--linear-key-head-dim",
        ),
        (
            dict(linear_num_key_heads=4, linear_num_value_heads=6),
            r"linear_num_value_heads=6 \(--linear-num-value-heads\) is not a multiple of "
            r"linear_num_key_heads=4 .*valid: a multiple of 4",
        ),
        (dict(linear_value_head_dim=0), "linear_value_head_dim must be a positive number, got 0"),
        (dict(linear_conv_kernel_dim=0), "linear_conv_kernel_dim must be a positive number"),
    ],
)
def test_sizes_that_do_not_fit_are_refused_naming_the_flag(overrides, message):
    with pytest.raises(ConfigError, match=message):
        small_config("M[G-]", **overrides)


def test_explicit_sizes_need_no_attention_heads():
    config = small_config(
        "G-", num_attention_heads=None, linear_num_key_heads=2, linear_key_head_dim=8
    )
    assert (config.linear_num_value_heads, config.linear_value_head_dim) == (4, 8)


def test_tensor_parallel_size_must_divide_key_and_value_heads():
    from megatron_hybrid.parallel.tensor_parallel import tensor_parallel_problems

    config = small_config("G-", linear_num_key_heads=3, linear_num_value_heads=6)
    problems = tensor_parallel_problems(config, 2)
    assert any("--linear-num-key-heads 3 is not divisible by" in p for p in problems), problems
    assert tensor_parallel_problems(small_config("G-"), 4) == []


# -- checkpoint names and initialization ------------------------------------------------------
def test_checkpoint_keys_and_shapes_are_megatron_cores():
    config = small_config("G")
    state = {k: tuple(v.shape) for k, v in canonical_state(HybridModel(config)).items()}
    layer = {k: v for k, v in state.items() if k.startswith("decoder.layers.0.")}
    # in_proj packs [q, k, v, z, beta, alpha]: 32 + 32 + 64 + 64 + 8 + 8 rows; the conv [q, k, v].
    assert layer == {
        "decoder.layers.0.input_layernorm.weight": (32,),
        "decoder.layers.0.self_attention.in_proj.weight": (208, 32),
        "decoder.layers.0.self_attention.conv1d.weight": (128, 1, 4),
        "decoder.layers.0.self_attention.dt_bias": (8,),
        "decoder.layers.0.self_attention.A_log": (8,),
        "decoder.layers.0.self_attention.out_norm.weight": (8,),
        "decoder.layers.0.self_attention.out_proj.weight": (32, 64),
    }


def test_initial_values_follow_megatron_core():
    config = small_config("G-", init_method_std=0.02)
    state = canonical_state(HybridModel(config, seed=0))
    mixer = "decoder.layers.0.self_attention."
    assert torch.equal(state[mixer + "dt_bias"], torch.ones(8))
    assert torch.equal(state[mixer + "out_norm.weight"], torch.ones(8))
    a = state[mixer + "A_log"].exp()
    assert ((a >= 1.0) & (a <= 16.0)).all() and a.std() > 0
    conv = state[mixer + "conv1d.weight"]
    assert conv.abs().max() <= 0.5 and conv.std() > 0.2  # U(-1/sqrt(4), 1/sqrt(4))
    assert abs(state[mixer + "in_proj.weight"].std().item() - 0.02) < 0.002
    out = state[mixer + "out_proj.weight"]
    assert abs(out.std().item() - 0.02 / math.sqrt(2 * 2)) < 0.002  # scaled by 1/sqrt(2 layers)


# -- cost -------------------------------------------------------------------------------------
def test_flops_by_hand():
    # small_config: H = 32; nk = 4 key heads of dk = 8, nv = 8 value heads of dv = 8, K = 4.
    qk, v = 4 * 8, 8 * 8  # 32, 64
    in_proj = 2 * 32 * (2 * qk + 2 * v + 2 * 8)  # 2 * 32 * 208 = 13312
    conv = 2 * 4 * (2 * qk + v)  # 1024
    rule = 2 * 4 * 8 * 8 * 8  # 4096
    out_proj = 2 * v * 32  # 4096
    assert in_proj + conv + rule + out_proj == 22528
    assert layer_forward_flops_per_token(small_config("G"), "G", 16) == 22528
    # The recurrence's cost per token does not grow with the sequence.
    assert layer_forward_flops_per_token(small_config("G"), "G", 4096) == 22528


def test_parameter_count_by_hand_and_of_the_built_model():
    config = small_config("G")
    mixer = 32 * 208 + 128 * 4 + 2 * 8 + 8 + 64 * 32  # in_proj, conv1d, dt_bias + A_log, norms
    # embedding 64*32 + final norm 32 + input_layernorm 32 + the mixer
    assert parameter_count(config) == 64 * 32 + 32 + 32 + mixer
    for pattern in ("[G-]M[*E]G", "G-M*EG"):
        config = small_config(pattern, linear_num_value_heads=12, linear_value_head_dim=4)
        assert parameter_count(config) == HybridModel(config).num_parameters()


# -- fused == unfused -------------------------------------------------------------------------
# Gated DeltaNet beside each other sequence mixer: attention, MLA and DeepSeek sparse attention.
PAIRS = pytest.mark.parametrize(
    "FUSED, UNFUSED", [("[G-]M[*E]", "G-M*E"), ("[G-]M[+E]", "G-M+E"), ("[G-]M[DE]", "G-MDE")]
)


@PAIRS
def test_fused_and_unfused_models_have_identical_canonical_parameters(FUSED, UNFUSED):
    fused = canonical_state(HybridModel(small_config(FUSED), seed=7))
    unfused = canonical_state(HybridModel(small_config(UNFUSED), seed=7))
    assert fused.keys() == unfused.keys()
    assert all(torch.equal(fused[k], unfused[k]) for k in fused)


@PAIRS
def test_fused_and_unfused_models_give_the_same_logits(FUSED, UNFUSED):
    tokens = torch.randint(0, 64, (2, 70), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fused = perturb_parameters(HybridModel(small_config(FUSED), seed=7), seed=3)(tokens)
        unfused = perturb_parameters(HybridModel(small_config(UNFUSED), seed=7), seed=3)(tokens)
    # The same ops on the same operands (the fused block's residual add and norm are one op
    # with the same float32 math), so 1e-6 is float32 noise with room to spare.
    torch.testing.assert_close(fused, unfused, rtol=1e-6, atol=1e-6)


@PAIRS
def test_fused_and_unfused_patterns_train_alike_for_20_steps(FUSED, UNFUSED):
    def losses(pattern):
        flags = ["--hybrid-layer-pattern", pattern, "--train-iters", "20", "--log-interval", "5"]
        return run_training(build_parser().parse_args([*TINY, *flags])).losses

    fused, unfused = losses(FUSED), losses(UNFUSED)
    assert len(fused) == len(unfused) == 20
    for a, b in zip(fused, unfused, strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    assert fused[-1] < fused[0]


def test_runs_forward_and_backward_under_bf16_autocast():
    # The CPU stand-in for `--bf16` on CUDA: GEMMs in bf16, the delta rule in float32.
    model = HybridModel(small_config("[G-]M"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randint(0, 64, (2, 19)))
    logits.float().sum().backward()
    assert torch.isfinite(logits.float()).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# -- Hugging Face -----------------------------------------------------------------------------
def test_hugging_face_export_refuses_gated_deltanet_naming_it():
    with pytest.raises(HFExportError, match=r"layer symbol 'G' \(Gated DeltaNet\)"):
        hf_config_from_model_config(small_config("M[G-]"))


# -- the embedded default run -----------------------------------------------------------------
def test_default_run_with_gated_deltanet_layers_learns():
    # The default model and data with G layers, shortened like the default run's own test.
    short_default_run("[G-]M[*-]", seq_length=128)
