#!/usr/bin/env bash
# A tiny hybrid model on the embedded default data: trains in well under a minute on a laptop.
# Every flag uses Megatron-LM's name; the pattern fuses Mamba+MLP and attention+MoE blocks.
set -euo pipefail
python "$(dirname "$0")/../scripts/pretrain_hybrid.py" \
    --hybrid-layer-pattern "[M-][*E]M-" \
    --hidden-size 64 --ffn-hidden-size 192 \
    --num-attention-heads 4 --num-query-groups 2 \
    --mamba-state-dim 16 --mamba-head-dim 16 --mamba-num-groups 2 \
    --num-experts 4 --moe-router-topk 2 --moe-ffn-hidden-size 128 \
    --seq-length 128 --micro-batch-size 8 --global-batch-size 16 \
    --train-iters 60 --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 10 \
    --log-interval 10 --eval-interval 30 --eval-iters 4 \
    --log-dir runs/debug_hybrid "$@"
