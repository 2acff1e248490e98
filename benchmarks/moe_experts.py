#!/usr/bin/env python3
"""MoE experts (the `moe.experts` op): Triton grouped GEMM against batched-matmul baselines,
forward + backward time per config, on CUDA.

For each config (experts E, hidden H, expert width F, tokens, top-k, activation): tokens * top-k
rows are routed to experts uniformly at random and sorted (counts stay on the device); then,
for each implementation, forward and backward of `experts(x_sorted, counts, fc1, fc2)` with
bf16 inputs are timed between CUDA events (median of --iters after --warmup):

- triton:    kernels/moe_experts/triton.py (no host sync);
- bmm-bf16:  the capacity-padded batched matmul in bf16 that GroupedExperts used before the op
             (one host sync for the capacity; pack, two bmm, unpack);
- eager:     kernels/moe_experts/eager.py, the reference: the same bmm in float32 math (slower by
             design; TF32 off, as torch defaults).

TFLOP/s counts the six GEMMs (forward fc1, fc2; backward two input and two weight gradients):
3 * 2 * rows * H * (F' + F), F' = 2F for SwiGLU. `err` is the Triton output's largest deviation
from the float32 reference, relative to the reference's largest magnitude.

    python benchmarks/moe_experts.py [--iters 5] [--warmup 2]
"""

from __future__ import annotations

import argparse

import torch
from timing import median_ms  # benchmarks/timing.py, beside this script

from megatron_hybrid.kernels.activations.eager import activation_fn, fc1_width
from megatron_hybrid.kernels.moe_experts import eager as moe_eager
from megatron_hybrid.kernels.moe_experts import triton as triton_grouped_gemm

# (experts, hidden, ffn, tokens, topk, activation)
CONFIGS = [
    (8, 2048, 1024, 16384, 2, "squared_relu"),
    (8, 2048, 4096, 16384, 2, "swiglu"),
    (16, 2048, 2048, 16384, 4, "squared_relu"),
    (32, 2048, 1024, 16384, 6, "squared_relu"),
    (64, 2048, 1024, 16384, 6, "swiglu"),
    (64, 2048, 4096, 16384, 4, "squared_relu"),
]


def bmm_bf16(x, counts, fc1, fc2, activation):
    """GroupedExperts' former computation: capacity-padded bmm in the inputs' dtype."""
    num_experts = counts.shape[0]
    ends = counts.cumsum(0)
    capacity = int(counts.max())  # host sync
    rows = torch.arange(x.shape[0], device=x.device)
    expert = torch.searchsorted(ends, rows, right=True)
    slot = rows - (ends - counts)[expert]
    packed = x.new_zeros(num_experts, capacity, x.shape[1])
    packed[expert, slot] = x
    hidden = activation_fn(activation)(torch.bmm(packed, fc1.transpose(1, 2)))
    return torch.bmm(hidden, fc2.transpose(1, 2))[expert, slot]


IMPLEMENTATIONS = {
    "triton": triton_grouped_gemm.experts,
    "bmm-bf16": bmm_bf16,
    "eager": moe_eager.experts,
}


def routed_inputs(experts, hidden, ffn, tokens, topk, activation, seed=0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    choice = torch.rand(tokens, experts, device="cuda", generator=generator).topk(topk).indices
    counts = torch.bincount(choice.flatten(), minlength=experts)
    rows = tokens * topk
    x = torch.randn(rows, hidden, device="cuda", generator=generator, dtype=torch.bfloat16)
    fc1 = (
        torch.randn(experts, fc1_width(ffn, activation), hidden, device="cuda", generator=generator)
        * hidden**-0.5
    )
    fc2 = torch.randn(experts, hidden, ffn, device="cuda", generator=generator) * ffn**-0.5
    return x, counts, fc1.bfloat16(), fc2.bfloat16()


def time_ms(fn, inputs, activation, warmup, iters) -> float:
    x, counts, fc1, fc2 = (t.detach().requires_grad_(t.is_floating_point()) for t in inputs)
    dy = torch.randn_like(x)

    def step() -> None:
        y = fn(x, counts, fc1, fc2, activation)
        torch.autograd.grad(y, (x, fc1, fc2), dy.to(y.dtype))

    return median_ms(step, warmup=warmup, repeat=iters, device=x.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(
        f"{'E':>3} {'H':>5} {'F':>5} {'rows':>6} {'act':>12} | "
        + " | ".join(f"{name:>17}" for name in IMPLEMENTATIONS)
        + " | err"
    )
    for experts, hidden, ffn, tokens, topk, activation in CONFIGS:
        inputs = routed_inputs(experts, hidden, ffn, tokens, topk, activation)
        rows = tokens * topk
        flops = 3 * 2 * rows * hidden * (fc1_width(ffn, activation) + ffn)
        cells = []
        for name, fn in IMPLEMENTATIONS.items():
            try:
                iters = args.iters if name != "eager" else max(1, args.iters // 2)
                ms = time_ms(fn, inputs, activation, args.warmup, iters)
                cells.append(f"{ms:7.2f} ms {flops / ms / 1e9:4.0f} TF")
            except torch.OutOfMemoryError:
                cells.append(f"{'OOM':>17}")
            torch.cuda.empty_cache()
        with torch.no_grad():
            got = triton_grouped_gemm.experts(*inputs, activation).float()
            want = moe_eager.experts(
                *(t.float() if t.is_floating_point() else t for t in inputs), activation
            )
            err = ((got - want).abs().max() / want.abs().max()).item()
        print(
            f"{experts:>3} {hidden:>5} {ffn:>5} {rows:>6} {activation:>12} | "
            + " | ".join(cells)
            + f" | {err:.1e}",
            flush=True,
        )
        del inputs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
