#!/usr/bin/env bash
# A Nemotron-H-style hybrid (Mamba2 + MLP with a few attention layers, squared ReLU, no position
# embedding) on one CUDA GPU in bf16. On the embedded data this is a smoke test of the GPU path;
# real data arrives with --data-path.
# Several GPUs: LAUNCHER="torchrun --standalone --nproc-per-node 8" bash examples/nemotron_h_style_gpu.sh
set -euo pipefail
${LAUNCHER:-python} "$(dirname "$0")/../scripts/pretrain_hybrid.py" \
    --hybrid-layer-pattern "M-M-M-M*-M-M-M-M*-M-M-M-M-" \
    --hidden-size 1024 --ffn-hidden-size 4096 \
    --num-attention-heads 16 --num-query-groups 8 \
    --mamba-state-dim 128 --mamba-head-dim 64 --mamba-num-groups 8 --mamba-chunk-size 128 \
    --seq-length 1024 --micro-batch-size 4 --global-batch-size 32 \
    --train-iters 200 --lr 6e-4 --min-lr 6e-5 --lr-warmup-iters 20 --clip-grad 1.0 \
    --bf16 --log-interval 10 --eval-interval 100 "$@"
