"""Command-line flags with Megatron-LM's names, and the one mapping of parsed flags onto the
typed settings (training/settings.py) and the ModelConfig.

Every flag's default is its settings field's default (model flags: ModelConfig's, except
DEFAULT_MODEL_OVERRIDES), so running the script with no flags trains the embedded default model on
the embedded default data in a few minutes on a laptop. Changing one flag (say the pattern) keeps
the other defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, TypeVar

from megatron_hybrid.config import ModelConfig
from megatron_hybrid.data.builder import DataSettings, add_data_args
from megatron_hybrid.data.tokenizer import TokenizerSettings
from megatron_hybrid.kernels.cli import KernelSettings, add_kernel_args, parse_kernel_requests
from megatron_hybrid.kernels.float8 import FP8_FORMATS, RECIPE_CHOICES
from megatron_hybrid.parallel.data_parallel import (
    DEFAULT_SHARDING_STRATEGY,
    SHARDING_STRATEGIES,
    sharding_strategy_problem,
)
from megatron_hybrid.parallel.fp8 import fp8_flag_problem
from megatron_hybrid.parallel.parallelize import ParallelSettings
from megatron_hybrid.training.metric_sinks import check_extras
from megatron_hybrid.training.profiling import (
    ProfilingSettings,
    add_profiling_args,
    profiling_flag_problem,
)
from megatron_hybrid.training.settings import (
    DEFAULT_MODEL_OVERRIDES,
    EMBEDDED_ONLY,
    CheckpointSettings,
    LoggingSettings,
    ModelSettings,
    Settings,
    TrainingSettings,
    default_model_value,
)
from megatron_hybrid.training.signals import EXIT_SIGNALS

DEFAULT_PATTERN = DEFAULT_MODEL_OVERRIDES["hybrid_layer_pattern"]

# Model flags whose dest is not the ModelConfig field they set. (--swiglu / --squared-relu set
# `activation`; --group-query-attention and --multi-latent-attention are accepted for Megatron
# compatibility and ignored.)
MODEL_FLAG_FIELDS = {
    "num_experts": "num_moe_experts",
    "norm_epsilon": "layernorm_epsilon",
    "yarn_original_max_position_embeddings": "original_max_position_embeddings",
    "yarn_beta_fast": "beta_fast",
    "yarn_beta_slow": "beta_slow",
}
# The ModelConfig fields a model flag may set: all but the vocabulary, which the tokenizer decides
# (--vocab-size is the NullTokenizer's).
_MODEL_CONFIG_FIELDS = {f.name for f in dataclasses.fields(ModelConfig) if f.init} - {"vocab_size"}


class DefaultsOnceFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with its default, once: not where the text already states it
    ("default 4 x hidden size"); switches read on/off and unset values none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if action.default is None:
            shown = "none"
        elif isinstance(action.default, bool):
            shown = "on" if action.default else "off"
        else:
            shown = "%(default)s"
        return f"{text} (default: {shown})"


def build_parser(prog: str = "pretrain_hybrid.py") -> argparse.ArgumentParser:
    """The training flags; `prog` names the program in help and errors (the command typed)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Pretrain a hybrid Mamba2/attention/MLP/MoE language model described by "
        "--hybrid-layer-pattern. With no flags, trains a small default model on text that "
        "ships with Python.",
        allow_abbrev=False,
        formatter_class=DefaultsOnceFormatter,
    )
    m = parser.add_argument_group("model")
    m.add_argument(
        "--hybrid-layer-pattern",
        "--hybrid-override-pattern",
        dest="hybrid_layer_pattern",
        help="decoder stack: M Mamba2, G Gated DeltaNet, * attention, + MLA, D DeepSeek "
        "sparse attention, - MLP, E MoE, [XY] fused block, | pipeline stage, / MTP depth",
    )
    m.add_argument("--hidden-size", type=int, help="width of the residual stream")
    m.add_argument("--ffn-hidden-size", type=int, help="MLP width (default 4 * hidden size)")
    m.add_argument(
        "--num-attention-heads",
        type=int,
        help="query heads of attention (also sizes Gated DeltaNet's key heads)",
    )
    m.add_argument(
        "--num-query-groups",
        type=int,
        help="key/value heads of attention (grouped-query attention); default: one per query head",
    )
    m.add_argument(
        "--group-query-attention",
        action="store_true",
        help="accepted for Megatron compatibility; --num-query-groups sets the groups",
    )
    m.add_argument(
        "--kv-channels", type=int, help="per-head width of attention; default: hidden size / heads"
    )
    m.add_argument(
        "--position-embedding-type",
        choices=["rope", "none"],
        help="rope: rotary embeddings in attention; none: no position embedding (Nemotron-H)",
    )
    m.add_argument("--rotary-base", type=float, help="rotary embedding base (theta)")
    m.add_argument("--mamba-state-dim", type=int, help="Mamba2 SSM state size N per group")
    m.add_argument("--mamba-head-dim", type=int, help="Mamba2 head width P")
    m.add_argument("--mamba-num-groups", type=int, help="Mamba2 groups of B/C shared by heads")
    mla = parser.add_argument_group(
        "multi-latent attention ('+'): sizes left out derive from d = --kv-channels, else "
        "hidden size / heads"
    )
    mla.add_argument(
        "--multi-latent-attention",
        action="store_true",
        help="accepted for Megatron compatibility; '+' in the pattern selects MLA",
    )
    mla.add_argument("--q-lora-rank", type=int, help="query latent (default: no query latent)")
    mla.add_argument("--kv-lora-rank", type=int, help="key/value latent (default 4 d)")
    mla.add_argument("--qk-head-dim", type=int, help="per-head q/k dims without rope (default d)")
    mla.add_argument(
        "--qk-pos-emb-head-dim", type=int, help="per-head rope dims (default d / 2, even)"
    )
    mla.add_argument("--v-head-dim", type=int, help="per-head value dims (default d)")
    mla.add_argument(
        "--qk-layernorm", action="store_true", help="RMSNorm on the query and key/value latents"
    )
    mla.add_argument(
        "--rope-type",
        choices=["rope", "yarn"],
        help="rope of MLA's rope dims (default yarn, which without --rotary-scaling-factor is "
        "plain rope)",
    )
    mla.add_argument("--rotary-scaling-factor", type=float, help="YaRN context extension factor")
    mla.add_argument("--mscale", type=float, help="YaRN attention-temperature coefficient")
    mla.add_argument("--mscale-all-dim", type=float, help="YaRN attention-temperature divisor")
    mla.add_argument(
        "--yarn-original-max-position-embeddings",
        type=int,
        help="YaRN: context length before extension",
    )
    mla.add_argument("--yarn-beta-fast", type=float, help="YaRN: rotations where the ramp ends")
    mla.add_argument("--yarn-beta-slow", type=float, help="YaRN: rotations where the ramp starts")
    dsa = parser.add_argument_group(
        "DeepSeek sparse attention ('D'): MLA (the flags above) with a lightning indexer"
    )
    dsa.add_argument("--dsa-indexer-n-heads", type=int, help="indexer heads (default heads / 2)")
    dsa.add_argument(
        "--dsa-indexer-head-dim", type=int, help="indexer head width (default --qk-head-dim)"
    )
    dsa.add_argument("--dsa-indexer-topk", type=int, help="keys each query attends to")
    dsa.add_argument(
        "--dsa-indexer-loss-coeff",
        type=float,
        help="weight of the KL loss that trains the indexer (0: off, the indexer stays as "
        "initialized)",
    )
    dsa.add_argument(
        "--dsa-indexer-use-sparse-loss",
        action="store_true",
        help="that loss over each query's selected keys only",
    )
    m.add_argument("--mamba-num-heads", type=int, help="default 2 * hidden size / head dim")
    m.add_argument("--mamba-chunk-size", type=int, help="SSD chunk length of the chunked scan")
    m.add_argument(
        "--mamba-dt-floor",
        type=float,
        help="clamp Mamba's dt = softplus(dt + dt_bias) >= this in forward (0: no "
        "floor, as Megatron; imports of Hugging Face nemotron_h set it)",
    )
    m.add_argument(
        "--mamba-dt-ceiling",
        type=float,
        help="clamp Mamba's dt <= this in forward (default and inf: no ceiling)",
    )
    gdn = "Gated DeltaNet (G): "
    m.add_argument(
        "--linear-conv-kernel-dim", type=int, help=gdn + "causal conv width over q, k, v"
    )
    m.add_argument("--linear-key-head-dim", type=int, help=gdn + "default hidden size / heads")
    m.add_argument("--linear-value-head-dim", type=int, help=gdn + "default its key head dim")
    m.add_argument("--linear-num-key-heads", type=int, help=gdn + "default --num-attention-heads")
    m.add_argument("--linear-num-value-heads", type=int, help=gdn + "default 2 x its key heads")
    m.add_argument("--num-experts", type=int, help="routed experts per MoE layer (needed by E)")
    m.add_argument("--moe-router-topk", type=int, help="experts each token is routed to")
    m.add_argument(
        "--moe-ffn-hidden-size", type=int, help="per-expert width (default --ffn-hidden-size)"
    )
    m.add_argument(
        "--moe-shared-expert-intermediate-size",
        type=int,
        help="width of the shared expert every token also passes through; default: none",
    )
    m.add_argument(
        "--moe-router-score-function",
        choices=["softmax", "sigmoid"],
        help="router scores: softmax or sigmoid (Nemotron-H, DeepSeek-V3)",
    )
    m.add_argument(
        "--moe-router-pre-softmax",
        action="store_true",
        help="softmax over all experts before top-k (no renormalization over the chosen)",
    )
    m.add_argument(
        "--moe-router-topk-scaling-factor",
        type=float,
        help="scale the routing weights by this (Nemotron-H); default: no scaling",
    )
    m.add_argument(
        "--moe-router-enable-expert-bias",
        action="store_true",
        help="aux-loss-free balancing: a per-expert bias on the choice (not the weights), "
        "nudged toward even load after each step",
    )
    m.add_argument(
        "--moe-router-bias-update-rate", type=float, help="step of the expert-bias nudge"
    )
    m.add_argument(
        "--moe-aux-loss-coeff", type=float, help="switch load-balancing loss coefficient (0: none)"
    )
    m.add_argument(
        "--moe-latent-size",
        type=int,
        help="latent MoE: routed experts run at this width between fc1_latent_proj and "
        "fc2_latent_proj (default: the hidden size, no projections)",
    )
    m.add_argument(
        "--moe-router-num-groups",
        type=int,
        help="group-limited routing: split the experts into this many groups (with "
        "--moe-router-group-topk)",
    )
    m.add_argument(
        "--moe-router-group-topk",
        type=int,
        help="group-limited routing: each token picks its top-k experts within this many "
        "groups, those with the largest sums of their top (topk / group-topk) scores",
    )
    m.add_argument(
        "--mtp-num-layers",
        type=int,
        help="multi-token-prediction depths (Megatron-LM's flag); the pattern's '/' parts set "
        "them, so a value must agree with the pattern (default: the pattern's count)",
    )
    m.add_argument(
        "--mtp-loss-scaling-factor",
        type=float,
        help="weight of the MTP loss (mean over the depths) added to the LM loss",
    )
    act = m.add_mutually_exclusive_group()
    act.add_argument("--swiglu", action="store_true", help="SwiGLU MLPs (default squared ReLU)")
    act.add_argument("--squared-relu", action="store_true", help="squared-ReLU MLPs (default)")
    m.add_argument("--norm-epsilon", type=float, help="RMSNorm epsilon")
    m.add_argument(
        "--init-method-std",
        type=float,
        help="standard deviation of the normal weight initialization",
    )
    m.add_argument(
        "--untie-embeddings-and-output-weights",
        action="store_true",
        help="a separate output layer instead of the input embedding's transpose",
    )
    m.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        help="pad the embedding rows to a multiple of this",
    )

    t = parser.add_argument_group("training")
    t.add_argument("--seq-length", type=int, help="tokens per sample")
    t.add_argument(
        "--micro-batch-size",
        type=int,
        help="samples per forward/backward on one data-parallel rank",
    )
    t.add_argument(
        "--global-batch-size",
        type=int,
        help="samples per optimizer step (default: micro batch size x data-parallel "
        "size); a multiple of it, the rest is gradient accumulation",
    )
    t.add_argument(
        "--train-iters",
        type=int,
        help="optimizer steps of the whole run (the learning-rate schedule follows it)",
    )
    t.add_argument("--lr", type=float, help="peak learning rate, reached at the end of warmup")
    t.add_argument("--min-lr", type=float, help="learning rate at the end of the decay")
    t.add_argument("--lr-warmup-iters", type=int, help="iterations of linear warmup from 0 to --lr")
    t.add_argument(
        "--lr-decay-iters",
        type=int,
        help="iterations of decay after which lr stays at --min-lr (default --train-iters)",
    )
    t.add_argument(
        "--lr-decay-style",
        choices=["constant", "linear", "cosine", "inverse-square-root"],
        help="decay from --lr to --min-lr after warmup",
    )
    t.add_argument(
        "--weight-decay", type=float, help="AdamW decoupled weight decay (matrices only)"
    )
    t.add_argument("--adam-beta1", type=float, help="AdamW first-moment decay")
    t.add_argument("--adam-beta2", type=float, help="AdamW second-moment decay")
    t.add_argument("--adam-eps", type=float, help="AdamW denominator epsilon")
    t.add_argument("--clip-grad", type=float, help="0 disables clipping")
    t.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    t.add_argument(
        "--check-for-nan-in-loss-and-grad",
        action=argparse.BooleanOptionalAction,
        help="stop the run, before the optimizer step and before anything is saved, "
        "at the first iteration whose loss or gradient norm is NaN or infinite",
    )
    t.add_argument(
        "--skip-nonfinite-iterations",
        type=int,
        metavar="N",
        help="with the check on: skip the update of up to N such iterations in all "
        "(their gradients are dropped; the iteration and its samples still "
        "count) and stop at the next one",
    )
    t.add_argument(
        "--exit-interval",
        type=int,
        help="stop (after saving, with --save) at the first iteration divisible by N; "
        "the schedule still follows --train-iters, so a resumed run continues it",
    )
    t.add_argument(
        "--exit-signal-handler",
        action=argparse.BooleanOptionalAction,
        help="on --exit-signal or Ctrl-C, save (with --save) at the next iteration "
        "boundary and exit with status 0; a second Ctrl-C stops without saving",
    )
    t.add_argument(
        "--exit-signal",
        choices=list(EXIT_SIGNALS),
        help="the signal a scheduler sends before it kills the job",
    )
    t.add_argument(
        "--seed", type=int, help="seeds the initial weights, the data order and the sample"
    )
    t.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], help="auto: CUDA when available, else the CPU"
    )

    par = parser.add_argument_group(
        "parallelism (launch with torchrun; data parallel over the remaining ranks)"
    )
    par.add_argument(
        "--tensor-model-parallel-size", type=int, help="ranks each layer's weights are split over"
    )
    par.add_argument(
        "--sequence-parallel",
        action="store_true",
        help="with tensor parallelism: split the residual stream and the norms "
        "along the sequence over the tensor-parallel ranks (all-gather into "
        "each mixer, reduce-scatter out of it instead of an all-reduce)",
    )
    par.add_argument(
        "--pipeline-model-parallel-size",
        type=int,
        help="ranks the layers are split over ('|' in the pattern places the cuts)",
    )
    par.add_argument(
        "--expert-model-parallel-size", type=int, help="ranks the experts are split over"
    )
    par.add_argument(
        "--pipeline-schedule",
        choices=["1f1b", "gpipe", "interleaved-1f1b", "looped-bfs", "interleaved-zero-bubble"],
        help="pipeline schedule (default: 1f1b with one stage per rank, "
        "interleaved-1f1b when the pattern's '|' segments give each rank "
        "several virtual stages)",
    )
    par.add_argument(
        "--data-parallel-sharding-strategy",
        choices=list(SHARDING_STRATEGIES),
        help="what the data-parallel ranks shard (Megatron-LM's flag): no_shard replicates "
        "everything and all-reduces gradients, overlapped with backward (DDP, ZeRO-0: the "
        "fewest collectives, for models whose weights, gradients and Adam state fit on each "
        "GPU); optim and optim_grads "
        "shard gradients and optimizer state, gathering parameters once per step (FSDP2 "
        "without resharding after forward, ZeRO-2: the communication of one all-reduce, less "
        "memory; optim runs as optim_grads); optim_grads_params also shards the parameters, "
        "gathering each block's for its forward and again for its backward (FSDP2, ZeRO-3: "
        f"the least memory); default {DEFAULT_SHARDING_STRATEGY} (Megatron-LM's), or optim "
        "with --use-distributed-optimizer",
    )
    par.add_argument(
        "--use-distributed-optimizer",
        action="store_true",
        help="shard the optimizer state over the data-parallel ranks (Megatron-LM's ZeRO-1 "
        "flag): without --data-parallel-sharding-strategy it selects optim, which runs as "
        "ZeRO-2 (same communication, less memory); every strategy but no_shard shards the "
        "optimizer state already",
    )
    par.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile every block (after tensor parallelism and activation "
        "checkpointing, before FSDP); the first iterations include compile "
        "time",
    )
    par.add_argument(
        "--compile-mode",
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        help="torch.compile mode for --compile; reduce-overhead adds CUDA graphs "
        "per block (one GPU, no MoE host syncs: the fastest for small "
        "models whose steps are launch-bound)",
    )
    par.add_argument(
        "--recompute-granularity",
        choices=["full", "selective"],
        help="activation checkpointing per block: full recomputes each block, "
        "selective keeps GEMM/attention outputs and recomputes the rest",
    )

    fp8 = parser.add_argument_group(
        "FP8 (torchao float8 training: CUDA with compute capability 8.9+, pip install torchao)"
    )
    fp8.add_argument(
        "--fp8-format",
        choices=FP8_FORMATS,
        help="run the blocks' dense GEMMs (linear layers with both dimensions multiples of 16) "
        "in FP8: e4m3 for every FP8 tensor, or hybrid: e4m3 activations and weights, e5m2 "
        "gradients; weights and checkpoints stay high precision (default: off)",
    )
    fp8.add_argument(
        "--fp8-recipe",
        choices=RECIPE_CHOICES,
        help="FP8 scaling with --fp8-format: tensorwise (one dynamic scale per tensor) or "
        "rowwise (one per row; e4m3 with --bf16 only); Megatron-LM's delayed, mxfp8, "
        "blockwise and custom are refused with the reason",
    )

    c = parser.add_argument_group("checkpointing")
    c.add_argument("--save", help="directory to save checkpoints to")
    c.add_argument(
        "--save-interval", type=int, help="save every N iterations (and at the end of training)"
    )
    c.add_argument(
        "--load",
        help="directory (or iter_* directory) to resume from; a directory without "
        "checkpoints starts from scratch, so --load and --save may be the same",
    )
    c.add_argument(
        "--async-save",
        action="store_true",
        help="write checkpoints in the background while training continues",
    )
    c.add_argument("--keep-last", type=int, help="keep only the newest N complete checkpoints")
    c.add_argument("--ckpt-step", type=int, help="load this iteration instead of the latest")
    c.add_argument(
        "--finetune",
        action="store_true",
        help="load model weights only; start at iteration 0 with a fresh optimizer",
    )
    c.add_argument("--no-load-optim", action="store_true", help="do not load the optimizer state")
    c.add_argument("--no-load-rng", action="store_true", help="do not restore RNG states")
    c.add_argument(
        "--use-checkpoint-args",
        action="store_true",
        help="build the model the --load checkpoint records (its pattern and sizes), "
        "whatever the model flags say",
    )
    c.add_argument(
        "--no-verify-checksums",
        action="store_true",
        help="skip the CRC32 check of checkpoint files on load (sizes still checked)",
    )

    add_data_args(parser)
    add_kernel_args(parser)

    lg = parser.add_argument_group("logging and evaluation")
    lg.add_argument("--log-interval", type=int, help="iterations per log line and metrics record")
    lg.add_argument(
        "--eval-interval",
        type=int,
        help="evaluate on the validation split every this many iterations (and at the end)",
    )
    lg.add_argument(
        "--eval-iters", type=int, help="global batches per evaluation (0: no evaluation)"
    )
    lg.add_argument("--log-dir", help="directory receiving metrics.jsonl")
    lg.add_argument(
        "--generate-tokens", type=int, help="length of the sample printed after training (0: none)"
    )
    lg.add_argument(
        "--no-progress-bar",
        action="store_true",
        help="log lines without the progress bar",
    )
    lg.add_argument(
        "--tensorboard-dir",
        help="write TensorBoard scalars here (loss, lr, grad norm, throughput, validation, "
        "memory; Megatron-LM's names); needs pip install 'megatron-hybrid[tensorboard]'",
    )
    lg.add_argument(
        "--wandb-project",
        help="log the same scalars to this Weights & Biases project; needs pip install "
        "'megatron-hybrid[wandb]'",
    )
    lg.add_argument("--wandb-exp-name", help="the W&B run's name (default: W&B picks one)")
    lg.add_argument("--wandb-save-dir", help="where W&B keeps its local files")
    add_profiling_args(parser)
    _set_defaults_from_settings(parser)
    return parser


def _set_defaults_from_settings(parser: argparse.ArgumentParser) -> None:
    """Give the model, training, parallelism, checkpointing and logging flags their settings
    fields' defaults (model flags: `default_model_value`); the data, tokenizer and kernel flags
    take theirs where those packages add them."""
    dests = {action.dest for action in parser._actions}
    defaults: dict[str, Any] = {}
    for group in (TrainingSettings(), ParallelSettings(), CheckpointSettings(), LoggingSettings()):
        defaults.update(dataclasses.asdict(group))
    defaults["make_vocab_size_divisible_by"] = ModelSettings().make_vocab_size_divisible_by
    for dest in dests:
        field = MODEL_FLAG_FIELDS.get(dest, dest)
        if field in EMBEDDED_ONLY:  # resolved after parsing (resolve_model_fields)
            defaults[dest] = None
        elif field in _MODEL_CONFIG_FIELDS:
            defaults[dest] = default_model_value(field)
    assert defaults.keys() <= dests, f"settings without a flag: {defaults.keys() - dests}"
    parser.set_defaults(**defaults)
    for action in parser._actions:
        field = MODEL_FLAG_FIELDS.get(action.dest, action.dest)
        if field == "hidden_size":
            action.help = (
                f"{action.help} (default {default_model_value(field)}: the small default model; "
                "given, every model flag left out takes Megatron-LM's default)"
            )
        elif field in EMBEDDED_ONLY:
            embedded = default_model_value(field, embedded=True)
            megatron = default_model_value(field, embedded=False)
            action.help = (
                f"{action.help} (default {embedded} for the small default model, i.e. without "
                f"--hidden-size; with it {'unset' if megatron is None else megatron}, as in "
                "Megatron-LM)"
            )


# The valid values of every numeric flag, in interval notation: "[" and "]" include a bound,
# "(" and ")" exclude it. A value must also be a number (never NaN), finite unless "inf]".
# Flags left at their default None ("derived from other flags") are not checked here.
FLAG_RANGES: dict[str, str] = {
    # model
    "hidden_size": "[1, inf)",
    "ffn_hidden_size": "[1, inf)",
    "num_attention_heads": "[1, inf)",
    "num_query_groups": "[1, inf)",
    "kv_channels": "[1, inf)",
    "rotary_base": "(0, inf)",
    "q_lora_rank": "[1, inf)",
    "kv_lora_rank": "[1, inf)",
    "qk_head_dim": "[1, inf)",
    "qk_pos_emb_head_dim": "[1, inf)",
    "v_head_dim": "[1, inf)",
    "rotary_scaling_factor": "(0, inf)",
    "mscale": "[0, inf)",
    "mscale_all_dim": "[0, inf)",
    "yarn_original_max_position_embeddings": "[1, inf)",
    "yarn_beta_fast": "(0, inf)",
    "yarn_beta_slow": "(0, inf)",
    "dsa_indexer_n_heads": "[1, inf)",
    "dsa_indexer_head_dim": "[1, inf)",
    "dsa_indexer_topk": "[1, inf)",
    "dsa_indexer_loss_coeff": "[0, inf)",
    "mamba_state_dim": "[1, inf)",
    "mamba_head_dim": "[1, inf)",
    "mamba_num_groups": "[1, inf)",
    "mamba_num_heads": "[1, inf)",
    "mamba_chunk_size": "[1, inf)",
    "mamba_dt_floor": "[0, inf)",
    "mamba_dt_ceiling": "(0, inf]",
    "linear_conv_kernel_dim": "[1, inf)",
    "linear_key_head_dim": "[1, inf)",
    "linear_value_head_dim": "[1, inf)",
    "linear_num_key_heads": "[1, inf)",
    "linear_num_value_heads": "[1, inf)",
    "num_experts": "[0, inf)",
    "moe_router_topk": "[1, inf)",
    "moe_ffn_hidden_size": "[1, inf)",
    "moe_shared_expert_intermediate_size": "[1, inf)",
    "moe_router_topk_scaling_factor": "(0, inf)",
    "moe_router_bias_update_rate": "[0, inf)",
    "moe_aux_loss_coeff": "[0, inf)",
    "moe_latent_size": "[1, inf)",
    "moe_router_num_groups": "[1, inf)",
    "moe_router_group_topk": "[1, inf)",
    "mtp_num_layers": "[0, inf)",
    "mtp_loss_scaling_factor": "[0, inf)",
    "norm_epsilon": "(0, inf)",
    "init_method_std": "(0, inf)",
    "make_vocab_size_divisible_by": "[1, inf)",
    # training
    "seq_length": "[1, inf)",
    "micro_batch_size": "[1, inf)",
    "global_batch_size": "[1, inf)",
    "train_iters": "[1, inf)",
    "lr": "(0, inf)",
    "min_lr": "[0, inf)",
    "lr_warmup_iters": "[0, inf)",
    "lr_decay_iters": "[1, inf)",
    "weight_decay": "[0, inf)",
    "adam_beta1": "[0, 1)",
    "adam_beta2": "[0, 1)",
    "adam_eps": "(0, inf)",
    "clip_grad": "[0, inf)",
    "exit_interval": "[1, inf)",
    "seed": "[0, inf)",
    "skip_nonfinite_iterations": "[0, inf)",
    # parallelism
    "tensor_model_parallel_size": "[1, inf)",
    "pipeline_model_parallel_size": "[1, inf)",
    "expert_model_parallel_size": "[1, inf)",
    # checkpointing
    "save_interval": "[1, inf)",
    "keep_last": "[1, inf)",
    "ckpt_step": "[0, inf)",
    # data, kernels
    "vocab_size": "[1, inf)",
    "tiled_mlp_shards": "[1, inf)",
    # logging and evaluation
    "log_interval": "[1, inf)",
    "eval_interval": "[1, inf)",
    "eval_iters": "[0, inf)",
    "generate_tokens": "[0, inf)",
    # profiling (--profile-ranks: each rank; the launch's size is checked once it is known)
    "profile_step_start": "[1, inf)",
    "profile_step_end": "[1, inf)",
    "profile_ranks": "[0, inf)",
}


@dataclass(frozen=True)
class Interval:
    """A range of valid values, read from interval notation such as "(0, inf)" or "[0, 1)"."""

    text: str
    low: float
    high: float
    low_closed: bool
    high_closed: bool

    @classmethod
    def parse(cls, text: str) -> Interval:
        low, high = (float(bound) for bound in text[1:-1].split(","))
        return cls(text, low, high, text[0] == "[", text[-1] == "]")

    def __contains__(self, value: float) -> bool:
        if math.isnan(value) or (math.isinf(value) and not self.high_closed):
            return False
        above = value >= self.low if self.low_closed else value > self.low
        below = value <= self.high if self.high_closed else value < self.high
        return above and below

    def describe(self) -> str:
        if (self.low, self.low_closed, self.high) == (1, True, math.inf):
            return "a whole number of at least 1"
        if (self.low, self.high, self.high_closed) == (0, math.inf, False):
            return (
                "a finite number of at least 0" if self.low_closed else "a positive finite number"
            )
        return f"a number in {self.text}"


def check_flag_ranges(args: argparse.Namespace) -> None:
    """Raise ValueError naming the first flag (in FLAG_RANGES order) outside its range (a flag
    taking several values: each of them)."""
    for dest, text in FLAG_RANGES.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        interval = Interval.parse(text)
        for item in value if isinstance(value, list) else [value]:
            if item not in interval:
                raise ValueError(
                    f"--{dest.replace('_', '-')} must be {interval.describe()}, got {item}"
                )


def check_training_args(args: argparse.Namespace) -> None:
    """Raise ValueError for a flag outside its range (FLAG_RANGES) or settings that do not fit
    together."""
    check_flag_ranges(args)
    check_extras(flags_to_settings(LoggingSettings, args))
    if args.global_batch_size is not None and args.global_batch_size % args.micro_batch_size:
        raise ValueError(
            f"--global-batch-size {args.global_batch_size} must be a multiple of "
            f"--micro-batch-size {args.micro_batch_size}"
        )
    if args.min_lr > args.lr:
        raise ValueError(f"--min-lr {args.min_lr} must not exceed --lr {args.lr}")
    if args.save_interval is not None and not args.save:
        raise ValueError("--save-interval needs --save DIR")
    if args.sequence_parallel:
        tp = args.tensor_model_parallel_size
        if tp < 2:
            raise ValueError(
                "--sequence-parallel splits the sequence over the tensor-parallel "
                "ranks: it needs --tensor-model-parallel-size 2 or more (drop the "
                "flag for tensor-parallel size 1)"
            )
        if args.seq_length % tp:
            raise ValueError(
                f"--sequence-parallel: --seq-length {args.seq_length} must be "
                f"divisible by --tensor-model-parallel-size {tp}"
            )
    problem = sharding_strategy_problem(
        args.data_parallel_sharding_strategy, args.use_distributed_optimizer
    )
    if problem is not None:
        raise ValueError(problem)
    problem = profiling_flag_problem(
        flags_to_settings(ProfilingSettings, args),
        args.train_iters,
        args.tensorboard_dir,
        args.log_dir,
    )
    if problem is not None:
        raise ValueError(problem)
    if args.bf16 and args.device == "cpu":
        raise ValueError("--bf16 needs a CUDA device; drop it for CPU runs")
    problem = fp8_flag_problem(
        args.fp8_format,
        args.fp8_recipe,
        args.tensor_model_parallel_size,
        args.micro_batch_size * args.seq_length,
        parse_kernel_requests(args.kernel),
        args.bf16,
    )
    if problem is not None:
        raise ValueError(problem)


def resolve_global_batch_size(training: TrainingSettings | argparse.Namespace, dp_size: int) -> int:
    """Micro-batches per rank and iteration; sets `global_batch_size` to its default (micro
    batch size x data-parallel size, as in Megatron-LM) when the flag was not given.

    Raises ValueError naming the nearest valid values when an explicit one does not fit."""
    per_micro_step = training.micro_batch_size * dp_size
    if training.global_batch_size is None:
        training.global_batch_size = per_micro_step
    if training.global_batch_size % per_micro_step:
        lower = training.global_batch_size // per_micro_step * per_micro_step
        fits = " or ".join(str(n) for n in (lower, lower + per_micro_step) if n > 0)
        raise ValueError(
            f"--global-batch-size {training.global_batch_size} must be a multiple of "
            f"--micro-batch-size x data-parallel size = {training.micro_batch_size} x {dp_size} "
            f"= {per_micro_step}: use {fits} (or leave the flag out for {per_micro_step})"
        )
    return training.global_batch_size // per_micro_step


SettingsGroup = TypeVar("SettingsGroup")


def flags_to_settings(cls: type[SettingsGroup], args: argparse.Namespace) -> SettingsGroup:
    """The `cls` settings (a dataclass of one flag group) that parsed flags describe: each field
    from the flag with the same dest."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def model_settings_from_args(args: argparse.Namespace) -> ModelSettings:
    """The model flags as ModelSettings: each ModelConfig field from its flag (MODEL_FLAG_FIELDS
    names those whose dest differs), the activation from --swiglu."""
    fields = {
        MODEL_FLAG_FIELDS.get(dest, dest): value
        for dest, value in vars(args).items()
        if MODEL_FLAG_FIELDS.get(dest, dest) in _MODEL_CONFIG_FIELDS
    }
    fields["activation"] = "swiglu" if args.swiglu else "squared_relu"
    return ModelSettings(fields, args.make_vocab_size_divisible_by)


def model_config_from_args(args: argparse.Namespace, vocab_size: int) -> ModelConfig:
    """The ModelConfig the flags describe, for a tokenizer of `vocab_size` tokens."""
    return model_settings_from_args(args).config(vocab_size)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Parsed flags (after `check_training_args`) as typed settings: the one place that maps
    flags onto them."""
    return Settings(
        model=model_settings_from_args(args),
        training=flags_to_settings(TrainingSettings, args),
        parallel=flags_to_settings(ParallelSettings, args),
        checkpoint=flags_to_settings(CheckpointSettings, args),
        logging=flags_to_settings(LoggingSettings, args),
        data=flags_to_settings(DataSettings, args),
        tokenizer=flags_to_settings(TokenizerSettings, args),
        kernels=flags_to_settings(KernelSettings, args),
        profiling=flags_to_settings(ProfilingSettings, args),
    )
