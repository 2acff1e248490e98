"""Multi-token prediction (megatron_hybrid/mtp.py): the '/' parts of the pattern against the
DeepSeek-V3 equations in float64, fused == unfused, Megatron-Core's checkpoint keys, flags,
FLOPs and parameters, training, resume, and the Hugging Face export that drops it."""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from conftest import perturb_parameters, small_config
from test_checkpoint import save
from test_training import TINY, short_default_run

from megatron_hybrid.canonical import CanonicalKeyError, canonical_key, physical_name
from megatron_hybrid.checkpointing.manager import load_checkpoint
from megatron_hybrid.config import ConfigError
from megatron_hybrid.flops import (
    forward_flops_per_token,
    layer_forward_flops_per_token,
    parameter_count,
)
from megatron_hybrid.kernels.registry import REGISTRY, resolve_kernels
from megatron_hybrid.model import HybridModel, StageSpec
from megatron_hybrid.mtp import depth_tokens_and_targets
from megatron_hybrid.training.arguments import (
    build_parser,
    check_training_args,
    model_config_from_args,
)
from megatron_hybrid.training.trainer import run_training

# Two depths of a fused Mamba + MLP and an attention layer, after a main decoder of all kinds.
PATTERN = "M[*-]E/[M-]*/[M-]*"
UNFUSED = "M*-E/M-*/M-*"


def tokens(config, batch: int = 2, length: int = 13, seed: int = 0) -> torch.Tensor:
    """`length` ids per row, t_0 .. t_{length-1}: the inputs are all but the last, the labels
    all but the first."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, length), generator=gen)


def mtp_model(pattern: str = PATTERN, dtype=torch.float64, **overrides) -> HybridModel:
    """A model with every parameter off its structured initial value (norm weights at one would
    hide a norm applied with the wrong weight)."""
    model = HybridModel(small_config(pattern, **overrides), seed=7).to(dtype)
    return perturb_parameters(model, seed=3)


# -- the DeepSeek-V3 equations ------------------------------------------------------------------
def reference_losses(
    model: HybridModel, t: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(main loss, [L_1 .. L_D]) written from the DeepSeek-V3 report (section 2.2), on `model`'s
    parameters. For position i of depth k (1-based):

        h'_i^k = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h_i^{k-1})]     (eq. 21)
        h_i^k  = TRM_k(h'_i^k), then the depth's final RMSNorm        (eq. 22)
        L_k    = mean of -log P_{i+1+k}^k[t_{i+1+k}] over i with a target     (eq. 24)

    with h^0 the main decoder's output after its final norm and the output head shared. Two
    choices are Megatron-Core's, which checkpoints depend on: the concatenation puts the
    embedding first (the report writes h first), and L_k averages over the T - k positions that
    have a target (the report divides by T). TRM_k is the MTP part's blocks, whose math
    tests/test_layers.py checks against references of their own."""
    inputs, labels = t[:, :-1], t[:, 1:]
    T = inputs.shape[1]
    eps = model.config.layernorm_epsilon
    emb = model.embedding.word_embeddings.weight
    head = emb if model.output_layer is None else model.output_layer.weight

    def rms_norm(x, weight):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def cross_entropy(h, targets):
        logits = h @ head.T
        picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return (torch.logsumexp(logits, -1) - picked).mean()

    h = model.hidden_states(inputs)
    main = cross_entropy(h, labels)
    losses = []
    for k, depth in enumerate(model.mtp.layers, start=1):
        shifted = torch.zeros_like(inputs)  # t_{i+k}; id 0 where it lies past the inputs
        shifted[:, : T - k] = t[:, k:T]
        joined = torch.cat(
            (rms_norm(emb[shifted], depth.enorm.weight), rms_norm(h, depth.hnorm.weight)), -1
        )
        h = rms_norm(
            depth.mtp_model_layer(joined @ depth.eh_proj.weight.T), depth.final_layernorm.weight
        )
        losses.append(cross_entropy(h[:, : T - k], t[:, k + 1 :]))
    return main, losses


@pytest.mark.parametrize("untie", [False, True], ids=["tied", "untied"])
def test_loss_and_gradients_match_the_deepseek_v3_equations_in_float64(untie):
    factor = 0.3
    model = mtp_model(untie_embeddings_and_output_weights=untie, mtp_loss_scaling_factor=factor)
    reference = copy.deepcopy(model)
    t = tokens(model.config)

    loss = model(t[:, :-1], t[:, 1:])
    loss.backward()
    main, losses = reference_losses(reference, t)
    (main + factor * torch.stack(losses).mean()).backward()

    # Both sides run in float64 and differ only in the order of sums (~1e-15 relative): 1e-6
    # is far above that noise and far below any mistake (a wrong shift, concatenation order,
    # norm weight or scale moves these values by 1e-3 or more).
    close = dict(rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(loss, main, **close)  # the reported loss is the main one
    logged = model.mtp.take_logged_losses()
    torch.testing.assert_close(logged[:-1], torch.stack(losses).detach(), **close)
    assert logged[-1] == 1  # one forward
    grads = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        torch.testing.assert_close(param.grad, grads[name].grad, **close, msg=name)
    assert model.mtp.layers[1].eh_proj.weight.grad.abs().sum() > 0


def test_depth_k_embeds_the_token_k_ahead_and_predicts_the_one_after():
    labels = torch.tensor([[11, 12, 13, 14, 15]])  # t_1 .. t_5
    tokens_2, targets_2 = depth_tokens_and_targets(labels, 2)
    assert tokens_2.tolist() == [[12, 13, 14, 0, 0]]  # t_{i+2}, then Megatron's fill
    assert targets_2.tolist() == [[13, 14, 15, -100, -100]]  # t_{i+3}, then ignored


def test_evaluation_and_generation_use_the_main_head_only():
    model = mtp_model().eval()
    t = tokens(model.config)
    main, _ = reference_losses(model, t)
    with torch.no_grad():
        torch.testing.assert_close(model(t[:, :-1], t[:, 1:]), main, rtol=1e-12, atol=0)
        assert model(t[:, :-1]).shape == (*t[:, :-1].shape, model.config.vocab_size)
    assert model.mtp.take_logged_losses().abs().sum() == 0  # no MTP forward ran


def test_a_sequence_without_a_target_for_the_last_depth_is_refused():
    model = mtp_model()
    t = tokens(model.config, length=3)  # 2 inputs: depth 2 would predict 3 ahead
    with pytest.raises(ValueError, match="depth 2 no position to predict"):
        model(t[:, :-1], t[:, 1:])


def test_triton_linear_cross_entropy_trains_mtp_as_the_eager_kernel():
    if REGISTRY.implementations("linear_cross_entropy")["triton"].unavailable_reason(
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ):
        pytest.skip("the Triton linear_cross_entropy kernel cannot run here")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = small_config("M*-/M-")
    triton = resolve_kernels({"linear_cross_entropy": "triton"}, "eager", device)
    fused = perturb_parameters(HybridModel(config, seed=7, kernels=triton).to(device), seed=3)
    eager = perturb_parameters(HybridModel(config, seed=7).to(device), seed=3)
    t = tokens(config).to(device)
    losses = []
    for model in (fused, eager):
        loss = model(t[:, :-1], t[:, 1:])
        loss.backward()
        losses.append((loss, model.mtp.take_logged_losses()))
    # float32 sums in another order (tests/test_triton_linear_ce.py measures the kernel within
    # 4e-7 of each gradient's largest entry): 1e-5 leaves >10x margin.
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    grads = dict(eager.named_parameters())
    for name, param in fused.named_parameters():
        scale = grads[name].grad.abs().max().item()
        torch.testing.assert_close(
            param.grad, grads[name].grad, rtol=1e-5, atol=1e-5 * scale, msg=name
        )


# -- fusion and checkpoints ----------------------------------------------------------------------
def test_fused_and_unfused_mtp_parts_have_the_same_canonical_parameters_and_losses():
    fused, unfused = mtp_model(PATTERN, torch.float32), mtp_model(UNFUSED, torch.float32)
    fused_state = {canonical_key(n, fused.config.pattern): p for n, p in fused.state_dict().items()}
    unfused_state = {
        canonical_key(n, unfused.config.pattern): p for n, p in unfused.state_dict().items()
    }
    assert fused_state.keys() == unfused_state.keys()
    assert all(torch.equal(fused_state[k], unfused_state[k]) for k in fused_state)
    t = tokens(fused.config)
    results = []
    for model in (fused, unfused):
        with torch.no_grad():
            logits = model(t[:, :-1])
        loss = model(t[:, :-1], t[:, 1:])
        loss.backward()
        results.append((logits, loss, model.mtp.take_logged_losses()))
    # The same float32 ops on the same operands, grouped into other modules: 1e-6 as in the
    # foundation's fused == unfused tests (in practice bitwise).
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-6)
    unfused_grads = {
        canonical_key(n, unfused.config.pattern): p.grad for n, p in unfused.named_parameters()
    }
    for name, param in fused.named_parameters():
        key = canonical_key(name, fused.config.pattern)
        torch.testing.assert_close(param.grad, unfused_grads[key], rtol=1e-6, atol=1e-6, msg=key)


def test_mtp_checkpoint_keys_are_megatron_cores():
    config = small_config("M-/[*-]")
    keys = {canonical_key(n, config.pattern) for n in HybridModel(config).state_dict()}
    depth = "mtp.layers.0."
    stack = depth + "mtp_model_layer.layers."
    expected = {
        depth + "enorm.weight",
        depth + "hnorm.weight",
        depth + "eh_proj.weight",
        depth + "final_layernorm.weight",
        stack + "0.input_layernorm.weight",
        stack + "0.self_attention.linear_qkv.weight",
        stack + "0.self_attention.linear_proj.weight",
        stack + "1.pre_mlp_layernorm.weight",
        stack + "1.mlp.linear_fc1.weight",
        stack + "1.mlp.linear_fc2.weight",
    }
    assert {k for k in keys if k.startswith("mtp.")} == expected
    for key in expected:
        assert canonical_key(physical_name(key, config.pattern), config.pattern) == key
    assert physical_name(stack + "1.mlp.linear_fc1.weight", config.pattern) == (
        stack + "0.channel_mixer.linear_fc1.weight"
    )
    shape = HybridModel(config).mtp.layers[0].eh_proj.weight.shape
    assert tuple(shape) == (32, 64)  # Megatron's [hidden, 2 x hidden]: cat(embedding, hidden)
    with pytest.raises(CanonicalKeyError, match="MTP depth 1 does not exist"):
        physical_name(
            "mtp.layers.1.mtp_model_layer.layers.0.input_layernorm.weight", config.pattern
        )
    with pytest.raises(CanonicalKeyError, match="canonical layer 2 does not exist in MTP depth 0"):
        physical_name("mtp.layers.0.mtp_model_layer.layers.2.mlp.linear_fc1.weight", config.pattern)


def test_an_unfused_mtp_checkpoint_loads_into_a_fused_model(tmp_path):
    unfused = mtp_model(UNFUSED, torch.float32)
    save(tmp_path, 1, unfused)
    fused = HybridModel(small_config(PATTERN), seed=99)  # other weights: the load must set all
    load_checkpoint(tmp_path, fused, None, fused.config)
    t = tokens(fused.config)
    for model in (unfused, fused):
        model(t[:, :-1], t[:, 1:])
    torch.testing.assert_close(
        fused.mtp.take_logged_losses(), unfused.mtp.take_logged_losses(), rtol=1e-6, atol=1e-6
    )


def test_mtp_sits_on_the_last_pipeline_stage_with_its_copy_of_the_embedding():
    config = small_config("M*|-E/M-", untie_embeddings_and_output_weights=True)
    first = HybridModel(config, stage=StageSpec((0, 1), first=True, last=False))
    last = HybridModel(config, stage=StageSpec((2, 3), first=False, last=True))
    assert first.mtp is None and last.mtp is not None
    assert last.embedding is not None and last.output_layer is not None  # untied: both
    assert last.holds_embedding_copy and not first.holds_embedding_copy
    assert [len(s.layers) for s in last.block_stacks()] == [2, 2]
    torch.testing.assert_close(
        first.embedding.word_embeddings.weight, last.embedding.word_embeddings.weight
    )


def test_activation_checkpointing_and_compile_wrap_the_mtp_blocks_too():
    from megatron_hybrid.parallel.activation_checkpoint import apply_activation_checkpointing
    from megatron_hybrid.parallel.compile import apply_compile

    model = mtp_model(dtype=torch.float32)
    plain = copy.deepcopy(model)
    lines = []
    apply_activation_checkpointing(model, "full", log=lines.append)
    apply_compile(copy.deepcopy(plain), log=lines.append)  # compiles on first use: not run
    # 3 blocks in the decoder (M, [*-], E) and 2 in each of the 2 depths ([M-], *).
    assert lines == [
        "activation checkpointing (full) on 7 blocks",
        "torch.compile: 7 blocks compiled (on first use)",
    ]
    t = tokens(model.config)
    for m in (model, plain):
        m(t[:, :-1], t[:, 1:]).backward()
    # Recomputation reruns the same float32 ops: the gradients are those of the plain model.
    grads = dict(plain.named_parameters())
    for name, param in model.named_parameters():
        key = name.replace("._checkpoint_wrapped_module", "")
        torch.testing.assert_close(param.grad, grads[key].grad, rtol=1e-6, atol=1e-6, msg=key)


# -- flags and config ----------------------------------------------------------------------------
def parse(*flags: str):
    args = build_parser().parse_args([*TINY, *flags])
    check_training_args(args)
    return model_config_from_args(args, 257)


def test_megatron_mtp_flags_set_the_config():
    config = parse("--hybrid-layer-pattern", "M*/M-/M-", "--mtp-loss-scaling-factor", "0.25")
    assert (config.mtp_num_layers, config.mtp_loss_scaling_factor) == (2, 0.25)
    agreeing = parse("--hybrid-layer-pattern", "M*/M-/M-", "--mtp-num-layers", "2")
    assert agreeing.to_dict() == parse("--hybrid-layer-pattern", "M*/M-/M-").to_dict()
    assert parse("--hybrid-layer-pattern", "M*").mtp_num_layers is None
    assert small_config("M-").mtp_loss_scaling_factor == 0.1  # Megatron-LM's default


def test_mtp_num_layers_that_disagrees_with_the_pattern_is_refused():
    with pytest.raises(
        ConfigError,
        match=r"--mtp-num-layers\) 3 disagrees with the 2 .*"
        r"give --mtp-num-layers 2 or leave the flag out",
    ):
        parse("--hybrid-layer-pattern", "M*/M-/M-", "--mtp-num-layers", "3")
    with pytest.raises(ConfigError, match=r"append one '/'-part per depth.*'M\*/M-/M-'"):
        parse("--hybrid-layer-pattern", "M*", "--mtp-num-layers", "2")
    with pytest.raises(ValueError, match="--mtp-loss-scaling-factor must be a finite number"):
        parse("--hybrid-layer-pattern", "M*/M-", "--mtp-loss-scaling-factor", "-1")
    with pytest.raises(ConfigError, match="mtp_loss_scaling_factor"):
        small_config("M*/M-", mtp_loss_scaling_factor=math.nan)


# -- FLOPs and parameters ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "pattern,overrides",
    [
        ("M-/M-", {}),
        (PATTERN, {"untie_embeddings_and_output_weights": True}),
        ("[*E]M/[ME]/[ME]/[ME]", {"moe_shared_expert_intermediate_size": 16}),
    ],
)
def test_parameter_count_includes_mtp_and_equals_the_built_model(pattern, overrides):
    config = small_config(pattern, **overrides)
    assert parameter_count(config) == HybridModel(config).num_parameters()
    without = small_config(pattern.split("/")[0], **overrides)
    assert parameter_count(config) > parameter_count(without)


def test_flops_count_each_depth_its_layers_eh_proj_and_logits():
    config, main_only = small_config("-/*/*"), small_config("-")
    H, V, T = 32, 64, 16
    depth = layer_forward_flops_per_token(config, "*", T) + 2 * (2 * H) * H + 2 * H * V
    assert forward_flops_per_token(config, T) == forward_flops_per_token(main_only, T) + 2 * depth


# -- training ------------------------------------------------------------------------------------
def train(tmp_path, *flags: str):
    log_dir = tmp_path / "log"
    result = run_training(build_parser().parse_args([*TINY, "--log-dir", str(log_dir), *flags]))
    records = [json.loads(x) for x in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return result, [r for r in records if "loss" in r]


RESUME = [
    "--hybrid-layer-pattern",
    "[M-]*E/[M-]*/[M-]*",
    "--moe-router-enable-expert-bias",
    "--train-iters",
    "6",
    "--log-interval",
    "1",
]


def test_a_run_with_mtp_resumes_bitwise(tmp_path):
    straight, records = train(tmp_path / "a", *RESUME)
    train(tmp_path / "b", *RESUME, "--save", str(tmp_path / "ckpt"), "--exit-interval", "3")
    resumed, resumed_records = train(tmp_path / "c", *RESUME, "--load", str(tmp_path / "ckpt"))
    assert resumed.losses == straight.losses[3:]  # float32 on CPU: identical, not just close
    mtp = [(r["mtp_loss"], r["mtp_1_loss"], r["mtp_2_loss"]) for r in records]
    assert [(r["mtp_loss"], r["mtp_1_loss"], r["mtp_2_loss"]) for r in resumed_records] == mtp[3:]


def test_the_embedded_default_run_trains_an_mtp_pattern_and_logs_its_loss(tmp_path, capsys):
    log_dir = tmp_path / "log"
    short_default_run("M*-M*-/M-/M-", "--log-interval", "5", "--log-dir", str(log_dir))
    records = [json.loads(x) for x in (log_dir / "metrics.jsonl").read_text().splitlines()]
    mtp = [r["mtp_loss"] for r in records]
    assert len(mtp) == 6 and mtp[-1] < mtp[0] - 1.0, mtp
    assert all(r["mtp_loss"] == (r["mtp_1_loss"] + r["mtp_2_loss"]) / 2 for r in records)
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("iteration 30/")]
    assert f"mtp {mtp[-1]:.4f}" in line[0]


def test_mtp_losses_reach_tensorboard_and_wandb_under_megatrons_names():
    from megatron_hybrid.training.metric_sinks import scalars

    record = {"iteration": 5, "loss": 3.0, "mtp_loss": 3.5, "mtp_1_loss": 3.25, "mtp_2_loss": 3.75}
    assert scalars(record) == {
        "lm loss": 3.0,
        "mtp loss": 3.5,
        "mtp_1 loss": 3.25,
        "mtp_2 loss": 3.75,
    }


# -- Hugging Face export -------------------------------------------------------------------------
def test_hf_export_drops_mtp_with_a_warning_and_writes_no_mtp_tensor(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    from test_hf_nemotron_h import HF_COMPATIBLE, assert_logits_close, canonical_state, perturb

    from megatron_hybrid.checkpointing.hf_nemotron_h import load_hf_checkpoint, save_hf_checkpoint

    config = small_config("[M-]*E/[M-]/[M-]", **HF_COMPATIBLE)
    model = HybridModel(config, seed=3).eval()
    perturb(model, seed=4)
    with pytest.warns(UserWarning, match=r"2 multi-token-prediction depth\(s\).*not exported"):
        save_hf_checkpoint(tmp_path, canonical_state(model), config)

    hf_model, info = transformers.NemotronHForCausalLM.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert {k: v for k, v in info.items() if v} == {}, info  # nothing missing or unexpected
    ids = tokens(config)
    with torch.no_grad():
        assert_logits_close(model(ids), hf_model.eval()(ids, use_cache=False).logits)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no mtp.* tensor in the files to skip
        state, imported = load_hf_checkpoint(tmp_path)
    assert imported.hybrid_layer_pattern == "[M-]*E" and imported.mtp_num_layers is None
    assert not any(key.startswith("mtp.") for key in state)
