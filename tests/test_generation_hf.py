"""Greedy generation from a Hugging Face `nemotron_h` model imported with the converter gives the
tokens of transformers' own `generate()` with its cache (CPU, float32)."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import torch  # noqa: E402
from test_hf_nemotron_h import load_canonical, random_hf_model  # noqa: E402

from megatron_hybrid.checkpointing.hf_nemotron_h import load_hf_checkpoint  # noqa: E402
from megatron_hybrid.generation import GREEDY, generate  # noqa: E402
from megatron_hybrid.model import HybridModel  # noqa: E402

NEW_TOKENS = 32


@pytest.mark.parametrize("layout", [None, "[M-][*E]M"], ids=["as-saved", "fused"])
def test_greedy_tokens_match_transformers_generate_with_cache(tmp_path, layout):
    hf_model = random_hf_model(
        ["linear_attention", "mlp", "full_attention", "moe", "linear_attention"]
    )
    hf_model.save_pretrained(tmp_path)
    state, config = load_hf_checkpoint(tmp_path, hybrid_layer_pattern=layout)
    model = HybridModel(config).eval()
    load_canonical(model, state)

    generator = torch.Generator().manual_seed(0)
    # Across HF's SSD chunks of 8; in one batch on our side, one by one on theirs.
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=generator) for n in (19, 4, 11)]
    ours = generate(model, prompts, NEW_TOKENS, GREEDY)
    for prompt, tokens in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = hf_model.generate(
                prompt.unsqueeze(0),
                # Explicit: without a mask generate() takes every pad_token_id (0) in the prompt
                # for padding and masks it.
                attention_mask=torch.ones(1, prompt.numel(), dtype=torch.long),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                use_cache=True,
                eos_token_id=None,
                pad_token_id=0,
            )
        torch.testing.assert_close(tokens, out[0, prompt.numel() :])
