"""Tensor parallelism with DTensor (`parallelize_module`), applied per mixer type.

Implemented: attention (`linear_qkv` column-parallel, `linear_proj` row-parallel) and the
squared-ReLU MLP (`linear_fc1` column, `linear_fc2` row). Megatron's grouped qkv layout keeps a
query group's q heads, k and v in consecutive rows, so a contiguous row split hands every rank
whole groups. Norms, embedding and output layer stay replicated (no sequence parallelism yet).
Mamba2 (packed in_proj), MoE experts and SwiGLU's packed [gate; up] need per-part sharding and
are refused by `check_tensor_parallel` until they land.
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)

from megatron_hybrid.config import ModelConfig
from megatron_hybrid.model import HybridModel

TP_SYMBOLS = frozenset("*-")


def tensor_parallel_problems(config: ModelConfig, tp: int) -> list[str]:
    """What keeps `config` from running with tensor-parallel size `tp` (empty: it fits)."""
    problems = []
    unsupported = sorted(s for s, n in config.pattern.layer_counts().items()
                         if n and s not in TP_SYMBOLS)
    if unsupported:
        problems.append(f"layer symbols {' '.join(unsupported)} have no tensor-parallel plan yet "
                        "(implemented: * attention, - MLP)")
    if "-" in str(config.pattern) and config.activation != "squared_relu":
        problems.append("SwiGLU MLPs have no tensor-parallel plan yet (use --squared-relu)")
    if config.pattern.layer_counts()["*"]:
        for name in ("num_attention_heads", "num_query_groups"):
            if getattr(config, name) % tp:
                problems.append(f"{name}={getattr(config, name)} is not divisible by tp={tp}")
    if config.ffn_hidden_size % tp:
        problems.append(f"ffn_hidden_size={config.ffn_hidden_size} is not divisible by tp={tp}")
    return problems


def apply_tensor_parallel(model: HybridModel, tp_mesh: DeviceMesh, log=print) -> None:
    """Shard every attention and MLP of `model` over `tp_mesh` in place."""
    tp = tp_mesh.size()
    for block in model.decoder.layers.values():
        if block.sequence_symbol == "*":
            attention = block.self_attention
            parallelize_module(attention, tp_mesh, {
                "linear_qkv": ColwiseParallel(),
                "linear_proj": RowwiseParallel(),
            })
            # The local shard holds heads/tp query heads in groups/tp whole groups.
            attention.num_heads //= tp
            attention.num_groups //= tp
        if block.channel_symbol == "-":
            parallelize_module(block.mlp, tp_mesh, {
                "linear_fc1": ColwiseParallel(),
                "linear_fc2": RowwiseParallel(),
            })
    log(f"tensor parallel: attention and MLP sharded over {tp} ranks")
