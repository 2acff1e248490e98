"""Multi-latent attention (`+`): the layer against a float64 reference written from DeepSeek-V2's
equations, its sizes, spec, FLOPs and checkpoint names, fused == unfused, and its parallel
layouts (torchrun, gloo, CPU) against one process.

The reference decompresses queries, keys and values explicitly from the latents (DeepSeek-V2,
section 2.1.2, eqs. 9-19), applies rope to interleaved pairs (2i, 2i + 1) as complex rotations,
and runs softmax attention with an explicit causal mask: none of the layer's helpers."""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import launch
import pytest
import torch
from conftest import perturb_parameters, small_config
from test_tensor_parallel import TP2, assert_close, assert_loads_exactly, train_torchrun
from test_training import TINY, short_default_run, train

from megatron_hybrid.canonical import canonical_key
from megatron_hybrid.checkpointing.hf_nemotron_h import export_problems
from megatron_hybrid.config import ConfigError
from megatron_hybrid.flops import layer_forward_flops_per_token, parameter_count
from megatron_hybrid.layers.mla import MultiLatentAttention
from megatron_hybrid.layers.rotary import Yarn
from megatron_hybrid.model import HybridModel
from megatron_hybrid.training.arguments import build_parser
from megatron_hybrid.training.trainer import run_training

# Sizes of one MLA layer under test: 4 heads, dn 6, dr 4, dv 5, latents 12 / 10.
SIZES = dict(qk_head_dim=6, qk_pos_emb_head_dim=4, v_head_dim=5, kv_lora_rank=10)
VARIANTS = {
    "plain": dict(rope_type="rope"),
    "q-latent-norms": dict(q_lora_rank=12, qk_layernorm=True, rope_type="rope"),
    # YaRN with extension, a ramp over the pairs and temperature factors on both sides.
    "yarn": dict(
        q_lora_rank=12,
        qk_layernorm=True,
        rope_type="yarn",
        rotary_base=100.0,
        rotary_scaling_factor=4.0,
        original_max_position_embeddings=32,
        beta_fast=4.0,
        beta_slow=1.0,
        mscale=0.9,
        mscale_all_dim=0.6,
    ),
}


def mla_config(pattern: str = "+", **overrides):
    return small_config(pattern, **{**SIZES, **overrides})


# -- the float64 reference ------------------------------------------------------------------------
def rms_norm(x, weight, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope_interleaved(x, inv_freq, scale):
    """Rotate pairs (2i, 2i + 1) of x (B, T, ..., dr) by position * inv_freq[i], as complex
    numbers, times `scale` (YaRN's concentration)."""
    seq = x.shape[1]
    angles = torch.outer(torch.arange(seq, dtype=torch.float64), inv_freq.double())
    rotation = torch.polar(torch.full_like(angles, scale), angles)  # (T, dr/2)
    rotation = rotation.view(1, seq, *([1] * (x.dim() - 3)), -1)
    z = torch.complex(x[..., 0::2], x[..., 1::2]) * rotation
    return torch.stack((z.real, z.imag), dim=-1).flatten(-2)


class Decompressed(NamedTuple):
    """MLA's per-head queries, keys and values, decompressed from the latents, rope applied."""

    q_c: torch.Tensor  # (B, T, n, dn)
    q_r: torch.Tensor  # (B, T, n, dr)
    k_c: torch.Tensor  # (B, T, n, dn)
    k_r: torch.Tensor  # (B, T, dr): one per token, shared by the heads
    v_c: torch.Tensor  # (B, T, n, dv)
    c_q: torch.Tensor  # (B, T, q_lora_rank) query latent, normed; x without one


def rope_parameters(config) -> tuple[torch.Tensor, float]:
    """Frequencies of the rope pairs and the factor on cos and sin (YaRN's concentration)."""
    dr = config.qk_pos_emb_head_dim
    if config.rope_type != "yarn":
        return config.rotary_base ** (-torch.arange(0, dr, 2, dtype=torch.float64) / dr), 1.0
    yarn = Yarn(
        config.rotary_scaling_factor,
        config.original_max_position_embeddings,
        config.beta_fast,
        config.beta_slow,
        config.mscale,
        config.mscale_all_dim,
    )
    log_factor = math.log(config.rotary_scaling_factor)
    concentration = (0.1 * config.mscale * log_factor + 1) / (
        0.1 * config.mscale_all_dim * log_factor + 1
    )
    return yarn.inverse_frequencies(dr, config.rotary_base, torch.device("cpu")), concentration


def decompress(p: dict, x: torch.Tensor, config) -> Decompressed:
    """DeepSeek-V2's MLA queries, keys and values from the parameters `p` (float64, Megatron's
    packed layouts)."""
    batch, seq, _ = x.shape
    n, eps = config.num_attention_heads, config.layernorm_epsilon
    dn, dr, dv, rkv = (
        config.qk_head_dim,
        config.qk_pos_emb_head_dim,
        config.v_head_dim,
        config.kv_lora_rank,
    )
    # Queries: c^Q = W^DQ h (normed), [q^C; q^R] = W^UQ c^Q / W^QR c^Q per head.
    if "linear_q_proj.weight" in p:
        c_q, q = x, x @ p["linear_q_proj.weight"].T
    else:
        c_q = x @ p["linear_q_down_proj.weight"].T
        if "q_layernorm.weight" in p:
            c_q = rms_norm(c_q, p["q_layernorm.weight"], eps)
        q = c_q @ p["linear_q_up_proj.weight"].T
    q = q.view(batch, seq, n, dn + dr)
    q_c, q_r = q[..., :dn], q[..., dn:]
    # Keys and values: c^KV = W^DKV h (normed); k^C = W^UK c^KV, v^C = W^UV c^KV per head;
    # k^R = W^KR h, one per token.
    down = x @ p["linear_kv_down_proj.weight"].T
    c_kv, k_r = down[..., :rkv], down[..., rkv:]
    if "kv_layernorm.weight" in p:
        c_kv = rms_norm(c_kv, p["kv_layernorm.weight"], eps)
    up = p["linear_kv_up_proj.weight"].view(n, dn + dv, rkv)
    k_c = torch.einsum("btr,hdr->bthd", c_kv, up[:, :dn])
    v_c = torch.einsum("btr,hdr->bthd", c_kv, up[:, dn:])
    # Rope on the decoupled dims only.
    inv_freq, concentration = rope_parameters(config)
    q_r = rope_interleaved(q_r, inv_freq, concentration)
    k_r = rope_interleaved(k_r, inv_freq, concentration)
    return Decompressed(q_c, q_r, k_c, k_r, v_c, c_q)


def attention_scores(d: Decompressed, config) -> torch.Tensor:
    """(B, n, T, S): ([q^C; q^R]_t . [k^C; k^R]_s) * m^2 / sqrt(dn + dr), m YaRN's factor."""
    m = 1.0
    if config.rotary_scaling_factor > 1:
        m = 0.1 * config.mscale_all_dim * math.log(config.rotary_scaling_factor) + 1
    scale = m * m / math.sqrt(config.qk_head_dim + config.qk_pos_emb_head_dim)
    scores = torch.einsum("bthd,bshd->bhts", d.q_c, d.k_c)
    return (scores + torch.einsum("bthd,bsd->bhts", d.q_r, d.k_r)) * scale


def attend_and_project(p: dict, d: Decompressed, keep: torch.Tensor, config) -> torch.Tensor:
    """Softmax over the keys `keep` (B, T, S) allows, values, then W^O."""
    batch, seq = d.v_c.shape[:2]
    scores = attention_scores(d, config).masked_fill(~keep.unsqueeze(1), float("-inf"))
    out = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), d.v_c)
    return out.reshape(batch, seq, -1) @ p["linear_proj.weight"].T


def causal(batch: int, seq: int) -> torch.Tensor:
    return torch.ones(seq, seq, dtype=torch.bool).tril().expand(batch, seq, seq)


def mla_reference(p: dict, x: torch.Tensor, config) -> torch.Tensor:
    """MLA: causal softmax attention over the explicitly decompressed queries, keys, values."""
    return attend_and_project(p, decompress(p, x, config), causal(*x.shape[:2]), config)


def randomized(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """`module` with every parameter drawn at random (no structured init: no zeros, no ones)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return module


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise; the absolute error where the expected tensor is zero (a one-token sequence's
    query gets no gradient: its softmax over one key is constant)."""
    error, size = (actual.double() - expected).norm().item(), expected.norm().item()
    return error / size if size > 0 else error


# float32 against float64: each output sums a few dozen products (~1e-7 relative rounding
# each), so norm-wise relative errors are a few 1e-7; 1e-5 leaves a wide margin while a wrong
# head, mask, rope pair or scale is off by O(1).
FLOAT32_VS_FLOAT64 = 1e-5


def assert_layer_matches_reference(layer, reference, config, seq: int) -> None:
    """Forward and every parameter's (and the input's) gradient of the float32 `layer` against
    `reference(float64 parameters, x, config)`."""
    generator = torch.Generator().manual_seed(seq)
    x = torch.randn(2, seq, config.hidden_size, generator=generator)
    upstream = torch.randn(2, seq, config.hidden_size, generator=generator)
    x32 = x.clone().requires_grad_()
    out32 = layer(x32)
    (out32 * upstream).sum().backward()
    params = {name: p.detach().double().requires_grad_() for name, p in layer.named_parameters()}
    x64 = x.double().requires_grad_()
    out64 = reference(params, x64, config)
    (out64 * upstream.double()).sum().backward()
    assert relative_error(out32, out64) <= FLOAT32_VS_FLOAT64
    assert relative_error(x32.grad, x64.grad) <= FLOAT32_VS_FLOAT64
    for name, param in layer.named_parameters():
        assert relative_error(param.grad, params[name].grad) <= FLOAT32_VS_FLOAT64, name


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("seq", [1, 7, 13])  # no length is a multiple of anything
def test_mla_matches_the_decompressed_reference(variant, seq):
    config = mla_config(**VARIANTS[variant])
    layer = randomized(MultiLatentAttention(config))
    assert_layer_matches_reference(layer, mla_reference, config, seq)


# -- YaRN -----------------------------------------------------------------------------------------
def test_yarn_matches_transformers_deepseek_v3_rope():
    # transformers' YaRN (used by its deepseek_v3) is an independent implementation of the same
    # frequencies and attention factor.
    pytest.importorskip("transformers")
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    yarn = Yarn(40.0, 4096, 32.0, 1.0, mscale=1.0, mscale_all_dim=0.8)
    hf = DeepseekV3Config(
        qk_rope_head_dim=64,
        rope_parameters=dict(
            rope_type="yarn",
            rope_theta=10000.0,
            factor=40.0,
            original_max_position_embeddings=4096,
            beta_fast=32.0,
            beta_slow=1.0,
            mscale=1.0,
            mscale_all_dim=0.8,
        ),
    )
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    ours = yarn.inverse_frequencies(64, 10000.0, torch.device("cpu"))
    torch.testing.assert_close(ours.float(), inv_freq.float(), rtol=1e-6, atol=0)
    assert yarn.concentration == pytest.approx(attention_factor, rel=1e-12)


def test_yarn_keeps_fast_pairs_and_interpolates_slow_ones():
    yarn = Yarn(8.0, 64, beta_fast=4.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)
    plain = 100.0 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    ours = yarn.inverse_frequencies(16, 100.0, torch.device("cpu"))
    turns = 64 * plain / (2 * math.pi)  # rotations over the original context
    assert torch.equal(ours[turns > 4.0 * 1.5], plain[turns > 4.0 * 1.5])
    torch.testing.assert_close(ours[turns < 1.0 / 1.5], plain[turns < 1.0 / 1.5] / 8.0)
    assert yarn.concentration == 1.0  # mscale == mscale_all_dim


# -- sizes and config checks -------------------------------------------------------------------
def test_sizes_derive_from_hidden_size_and_heads():
    config = small_config("+", hidden_size=64, num_attention_heads=4)  # d = 16
    assert (config.qk_head_dim, config.v_head_dim) == (16, 16)
    assert (config.qk_pos_emb_head_dim, config.kv_lora_rank) == (8, 64)
    assert config.q_lora_rank is None and config.rope_type == "yarn"
    # kv_channels sets d; explicit sizes win over derived ones.
    config = small_config("+", hidden_size=64, num_attention_heads=4, kv_channels=24, v_head_dim=7)
    assert (config.qk_head_dim, config.v_head_dim, config.qk_pos_emb_head_dim) == (24, 7, 12)
    assert small_config("+", hidden_size=12, num_attention_heads=2).qk_pos_emb_head_dim == 2


def test_the_default_yarn_without_extension_is_plain_rope():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 32, generator=generator)
    layers = [
        randomized(MultiLatentAttention(mla_config(rope_type=kind))) for kind in ("yarn", "rope")
    ]
    torch.testing.assert_close(layers[0](x), layers[1](x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_attention_heads=None), "set num_attention_heads"),
        (dict(num_attention_heads=3), "kv_channels"),  # 32 / 3: sizes cannot be derived
        (dict(qk_pos_emb_head_dim=3), "qk_pos_emb_head_dim=3 .* must be even"),
        (dict(kv_lora_rank=0), "kv_lora_rank must be a positive number"),
        (dict(q_lora_rank=-2), "q_lora_rank must be a positive number"),
        (dict(rope_type="linear"), "rope_type='linear' is not one of rope, yarn"),
        (dict(rotary_scaling_factor=0.0), "rotary_scaling_factor must be a positive"),
        (dict(mscale=float("nan")), "mscale must be a finite number >= 0"),
    ],
)
def test_bad_sizes_are_refused_naming_the_field(overrides, message):
    fields = {**SIZES, **overrides}
    if overrides.get("num_attention_heads") == 3:
        fields = overrides
    with pytest.raises(ConfigError, match=message):
        small_config("M+", **fields)


def test_attention_settings_that_only_mla_reads_are_refused_for_attention():
    with pytest.raises(ConfigError, match="qk_layernorm .* MLA"):
        small_config("M*", qk_layernorm=True)
    with pytest.raises(ConfigError, match="rope_type='yarn' .* MLA"):
        small_config("M*", rope_type="yarn")


# -- checkpoint names, counts, FLOPs, export -----------------------------------------------------
def layer_keys(config, layer: int) -> set[str]:
    prefix = f"decoder.layers.{layer}."
    keys = {canonical_key(n, config.pattern) for n in HybridModel(config).state_dict()}
    return {k.removeprefix(prefix) for k in keys if k.startswith(prefix)}


def test_checkpoint_keys_are_megatrons_mla_names():
    with_latents = mla_config("M+-", q_lora_rank=12, qk_layernorm=True)
    assert layer_keys(with_latents, 1) == {
        "input_layernorm.weight",
        "self_attention.linear_q_down_proj.weight",
        "self_attention.q_layernorm.weight",
        "self_attention.linear_q_up_proj.weight",
        "self_attention.linear_kv_down_proj.weight",
        "self_attention.kv_layernorm.weight",
        "self_attention.linear_kv_up_proj.weight",
        "self_attention.linear_proj.weight",
    }
    assert layer_keys(mla_config("M[+-]"), 1) == {
        "input_layernorm.weight",
        "self_attention.linear_q_proj.weight",
        "self_attention.linear_kv_down_proj.weight",
        "self_attention.linear_kv_up_proj.weight",
        "self_attention.linear_proj.weight",
    }


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parameter_count_equals_the_built_model(variant):
    config = mla_config("[+-]M+E", **VARIANTS[variant])
    assert parameter_count(config) == HybridModel(config).num_parameters()


def test_flops_hand_counted():
    # H 32, n 4, dn 6, dr 4, dv 5, rq 12, rkv 10, T 16 (full T x T scores, as for '*'):
    config = mla_config(q_lora_rank=12)
    expected = (
        2 * 32 * 12  # linear_q_down_proj
        + 2 * 12 * 4 * 10  # linear_q_up_proj
        + 2 * 32 * (10 + 4)  # linear_kv_down_proj
        + 2 * 10 * 4 * (6 + 5)  # linear_kv_up_proj
        + 2 * 16 * 4 * 10  # Q K^T
        + 2 * 16 * 4 * 5  # scores @ V
        + 2 * 4 * 5 * 32  # linear_proj
    )
    assert layer_forward_flops_per_token(config, "+", 16) == expected


def test_hugging_face_export_refuses_mla_naming_it():
    problems = export_problems(mla_config("M+-"))
    assert any("'+' (MLA)" in problem for problem in problems), problems


# -- fused == unfused -------------------------------------------------------------------------
def canonical_state(model):
    return {canonical_key(k, model.config.pattern): v for k, v in model.state_dict().items()}


FUSED, UNFUSED = "[+E]M", "+EM"
MLA_OPTIONS = dict(q_lora_rank=12, qk_layernorm=True)


def test_fused_and_unfused_have_identical_canonical_parameters_and_logits():
    fused = HybridModel(mla_config(FUSED, **MLA_OPTIONS), seed=7)
    unfused = HybridModel(mla_config(UNFUSED, **MLA_OPTIONS), seed=7)
    fused_state, unfused_state = canonical_state(fused), canonical_state(unfused)
    assert fused_state.keys() == unfused_state.keys()
    assert all(torch.equal(fused_state[k], unfused_state[k]) for k in fused_state)
    tokens = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # The same ops on the same operands in both: equal up to 1e-6 (in fact bitwise).
        torch.testing.assert_close(
            perturb_parameters(fused, 3)(tokens),
            perturb_parameters(unfused, 3)(tokens),
            rtol=0,
            atol=1e-6,
        )


MLA_FLAGS = ("--q-lora-rank", "12", "--qk-layernorm", "--kv-lora-rank", "10")


def test_fused_and_unfused_train_alike():
    common = ("--train-iters", "20", "--log-interval", "5", *MLA_FLAGS)
    fused = train("--hybrid-layer-pattern", FUSED, *common)
    unfused = train("--hybrid-layer-pattern", UNFUSED, *common)
    assert len(fused.losses) == len(unfused.losses) == 20
    # Identical ops on identical operands: rtol 1e-5 is the bound (measured: equal).
    assert fused.losses == pytest.approx(unfused.losses, rel=1e-5)
    assert fused.losses[-1] < fused.losses[0]


@pytest.mark.slow
def test_the_default_run_trains_a_pattern_with_mla():
    # The embedded default model and data with MLA in place of attention, fewer, smaller steps.
    short_default_run("[M-]M[+E]M[M-]")


# -- parallel layouts (torchrun, gloo, CPU, float32) --------------------------------------------
# MLA and DSA (tests/test_dsa.py) with every optional part (query latent, latent norms, the
# indexer's loss, sparse: the top 8 of 24 keys), beside Gated DeltaNet and Mamba2, in fused
# groups, two pipeline segments (one process ignores the cut), two micro-batches per step.
DSA_TRAINING = ("--dsa-indexer-topk", "8", "--dsa-indexer-loss-coeff", "0.1")
LAYOUT_FLAGS = [
    *TINY,
    *MLA_FLAGS,
    *DSA_TRAINING,
    "--hybrid-layer-pattern",
    "[+-]G|[DE]M",
    "--global-batch-size",
    "8",
    "--train-iters",
    "6",
    "--log-interval",
    "1",
    "--device",
    "cpu",
]
PP2 = ["--pipeline-model-parallel-size", "2"]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """Losses of the one-process run, and its checkpoints at iterations 3 and 6."""
    save = tmp_path_factory.mktemp("mla-one-process")
    flags = [*LAYOUT_FLAGS, "--save", str(save), "--save-interval", "3"]
    return run_training(build_parser().parse_args(flags)).losses, save


# rtol 1e-5, as for every layout (tests/test_parallel_layouts.py): the same float32 math summed
# in another order (tensor-parallel partial sums, pipeline micro-batches) moves a loss by a few
# ulps per step. A head split wrongly, or ranks choosing different keys, is off by far more.
@pytest.mark.slow
@pytest.mark.parametrize(
    "nproc, layout",
    [(2, [*TP2, "--sequence-parallel"]), (2, PP2), (4, [*TP2, *PP2])],
    ids=["tp2-sp", "pp2", "tp2xpp2"],
)
def test_layout_matches_one_process(tmp_path, one_process_run, nproc, layout):
    losses = train_torchrun(nproc, *LAYOUT_FLAGS, *layout, log_dir=tmp_path)
    assert_close(losses, one_process_run[0])


@pytest.mark.slow
def test_a_tp2_checkpoint_loads_in_one_process_with_the_same_logits(tmp_path, one_process_run):
    # tp2 loads the one-process checkpoint (logits equal to one process's) and saves it again,
    # bit-identical to the original: so the tp2 checkpoint gives one process the same logits.
    source = one_process_run[1] / "iter_0000003"
    assert_loads_exactly(source, LAYOUT_FLAGS, tmp_path, "--tp", "2")


@pytest.mark.slow
def test_tp2_gradients_equal_one_process():
    # Losses hardly see a rope-key gradient left unsummed over the ranks (it is a small part of
    # linear_kv_down_proj's gradient, and Adam normalizes updates), nor an indexer-loss target
    # summed over one rank's heads only: gradients do.
    launch.torchrun(2, Path(__file__))


def check_tp2_gradients() -> None:
    """Under torchrun on 2 ranks: every parameter's gradient of a tensor-parallel model (with
    and without sequence parallelism) against the same model in this process, in float64."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from megatron_hybrid.parallel.distributed import end_successful_run
    from megatron_hybrid.parallel.tensor_parallel import apply_tensor_parallel

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    # MLA and DSA (the indexer's loss on, sparse: the top 4 keys); no packed weights, so full
    # tensors are canonical.
    config = mla_config("[+-]D-", **MLA_OPTIONS, dsa_indexer_topk=4, dsa_indexer_loss_coeff=0.3)
    # Sequence parallelism trains on lengths tp divides (generation pads the others).
    for sequence_parallel, seq in ((False, 13), (True, 14)):
        tokens = torch.randint(0, 64, (2, seq), generator=torch.Generator().manual_seed(0))
        upstream = torch.randn(2, seq, 64, generator=torch.Generator().manual_seed(1))
        whole = perturb_parameters(HybridModel(config, seed=3), seed=1).double()
        split = perturb_parameters(HybridModel(config, seed=3), seed=1).double()
        apply_tensor_parallel(split, mesh, sequence_parallel, log=lambda _: None)
        for model in (whole, split):
            (model(tokens) * upstream.double()).sum().backward()
        for (name, expected), (_, param) in zip(
            whole.named_parameters(), split.named_parameters(), strict=True
        ):
            grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
            # float64 sums in another order: ~1e-15 relative, ~1e-13 in the indexer's KL
            # gradient (a difference of two nearly equal distributions); a gradient part left
            # unsummed over the ranks is off by 1e-3 or more.
            error = relative_error(grad, expected.grad)
            assert error <= 1e-9, (sequence_parallel, name, error)
    # Not a bare destroy_process_group: gloo threads outliving it can abort the exit
    # (parallel/distributed.py exit_without_finalization says why).
    end_successful_run()


if __name__ == "__main__":
    check_tp2_gradients()
