"""Tiled MLP: the `tiled` implementation of the `mlp` op, `linear_fc2(act(linear_fc1(x)))`
computed over shards of the tokens so that only one shard's hidden activations (F or 2F wide,
several times the residual stream) exist at a time.

Forward runs each shard without autograd and saves only x and the two weights. Backward
recomputes each shard under autograd with the weights as *detached* leaves, takes that shard's
gradients with `torch.autograd.grad`, writes its rows of dx and adds its weight gradients into
float32 buffers; the op then returns every gradient once. So each parameter's
AccumulateGrad, and any hook on it (DDP's bucket readiness, FSDP's reduce-scatter, a
post-accumulate-grad hook), fires once per backward, as for the plain MLP. (Implementations that
call `backward` per shard on the real parameters fire those hooks once per shard: DDP then
all-reduces the first shard's gradient and the rest is lost, without an error; FSDP can
reduce-scatter before the gradient is complete.)

Autocast: backward recomputes under the autocast state forward ran under, so the recomputed
shard is the one forward computed. Tensor parallelism is not supported: the op reads the layers'
weights and bypasses the hooks that redistribute their inputs and outputs, so DTensor weights are
an error (use the eager `mlp` there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support
    DTensor = ()


def tiled_mlp(
    x: Tensor, linear_fc1: nn.Module, linear_fc2: nn.Module, act, shards: int = 4
) -> Tensor:
    """`linear_fc2(act(linear_fc1(x)))` over `shards` slices of the tokens (all dims but the
    last, flattened); same values and gradients as the eager op up to summation order.

    Args:
        x: (..., hidden).
        linear_fc1, linear_fc2: bias-free linear layers; only their `weight` is read.
        act: the activation (the model's bound `activation.*` kernel).
        shards: how many slices; more than there are tokens is fine (empty slices are skipped).

    Raises:
        ValueError: a layer with a bias, DTensor (tensor-parallel) weights, or shards < 1.
    """
    if shards < 1:
        raise ValueError(f"mlp=tiled: shards must be at least 1, got {shards}")
    for name, layer in (("linear_fc1", linear_fc1), ("linear_fc2", linear_fc2)):
        if getattr(layer, "bias", None) is not None:
            raise ValueError(
                f"mlp=tiled: {name} has a bias; the tiled MLP supports bias-free "
                "layers only (use --kernel mlp=eager)"
            )
        if isinstance(layer.weight, DTensor):
            raise ValueError(
                f"mlp=tiled: {name}.weight is a DTensor (tensor parallelism); the "
                "tiled MLP bypasses the layers' sharding hooks (use --kernel "
                "mlp=eager with tensor parallelism)"
            )
    return _TiledMLP.apply(x, linear_fc1.weight, linear_fc2.weight, act, shards)


def _shard_bounds(rows: int, shards: int) -> list[tuple[int, int]]:
    bounds = [rows * i // shards for i in range(shards + 1)]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def _mlp(x: Tensor, w1: Tensor, w2: Tensor, act) -> Tensor:
    return F.linear(act(F.linear(x, w1)), w2)


class _TiledMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, w2: Tensor, act, shards: int) -> Tensor:
        device_type = x.device.type
        ctx.autocast = (
            device_type,
            torch.get_autocast_dtype(device_type),
            torch.is_autocast_enabled(device_type),
        )
        ctx.act, ctx.shards = act, shards
        ctx.save_for_backward(x, w1, w2)
        rows = x.reshape(-1, x.shape[-1])
        y = None
        for start, end in _shard_bounds(rows.shape[0], shards):
            out = _mlp(rows[start:end], w1, w2, act)
            if y is None:
                y = out.new_empty(rows.shape[0], out.shape[-1])
            y[start:end] = out
        if y is None:  # no tokens
            y = _mlp(rows, w1, w2, act)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, w1, w2 = ctx.saved_tensors
        need_x, need_w1, need_w2 = ctx.needs_input_grad[:3]
        rows = x.reshape(-1, x.shape[-1])
        dy_rows = dy.reshape(-1, dy.shape[-1])
        dx = torch.zeros(rows.shape, dtype=x.dtype, device=x.device) if need_x else None
        # Leaves of each shard's recomputation: gradients reach them, not the parameters.
        w1_leaf = w1.detach().requires_grad_(need_w1)
        w2_leaf = w2.detach().requires_grad_(need_w2)
        dw1 = (
            torch.zeros(w1.shape, dtype=_accumulation_dtype(w1), device=w1.device)
            if need_w1
            else None
        )
        dw2 = (
            torch.zeros(w2.shape, dtype=_accumulation_dtype(w2), device=w2.device)
            if need_w2
            else None
        )
        device_type, dtype, enabled = ctx.autocast
        with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
            for start, end in _shard_bounds(rows.shape[0], ctx.shards):
                x_leaf = rows[start:end].detach().requires_grad_(need_x)
                out = _mlp(x_leaf, w1_leaf, w2_leaf, ctx.act)
                wanted = [
                    (t, buffer)
                    for t, buffer in ((x_leaf, None), (w1_leaf, dw1), (w2_leaf, dw2))
                    if t.requires_grad
                ]
                grads = torch.autograd.grad(out, [t for t, _ in wanted], dy_rows[start:end])
                for (t, buffer), grad in zip(wanted, grads, strict=True):
                    if t is x_leaf:
                        dx[start:end] = grad
                    else:
                        buffer += grad
        return (
            dx.view(x.shape) if need_x else None,
            dw1.to(w1.dtype) if need_w1 else None,
            dw2.to(w2.dtype) if need_w2 else None,
            None,
            None,
        )


def _accumulation_dtype(weight: Tensor) -> torch.dtype:
    return torch.promote_types(weight.dtype, torch.float32)
