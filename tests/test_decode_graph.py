"""Decoding through a CUDA graph (megatron_hybrid/decode_graph.py): the fixed-shape attention a
graph needs (KV caches read whole, unwritten positions masked) gives the logits of the usual
step; where a graph cannot run, the reason is given; on a GPU, graphed greedy decoding gives
the eager tokens.

Float64 on CPU at 1e-10, as in test_decoding.py: reading the whole buffer only adds masked
positions whose softmax weight is exactly 0, so the logits differ by summation order alone
(~1e-15 relative); a wrong mask (a padding or future position let in) moves them by 1e-2 or
more at these weight scales.
"""

from __future__ import annotations

import pytest
import torch
from conftest import perturb_parameters, small_config

from megatron_hybrid.decode_graph import _kv_caches, graph_decoding_problem
from megatron_hybrid.generation import GREEDY, generate
from megatron_hybrid.model import HybridModel

F64 = dict(rtol=1e-10, atol=1e-10)
LENGTHS = [13, 5, 9]
NEW = 6
SPARE = 7  # cache positions beyond the last token: never written, always masked

ATTENTION_MODELS = {
    "*": ("[M-]M*-[*-]", dict(position_embedding_type="rope")),
    "+D": ("[G-]M+-[D-]", dict(rope_type="rope", dsa_indexer_topk=4)),
}


def prompts_and_continuations(vocab: int):
    generator = torch.Generator().manual_seed(4)
    rows = [torch.randint(0, vocab, (n + NEW,), generator=generator) for n in LENGTHS]
    prompt = torch.zeros(len(rows), max(LENGTHS), dtype=torch.long)
    for b, length in enumerate(LENGTHS):
        prompt[b, :length] = rows[b][:length]
    return rows, prompt


@pytest.mark.parametrize("pattern,overrides", ATTENTION_MODELS.values(), ids=ATTENTION_MODELS)
@torch.no_grad()
def test_kv_caches_read_whole_give_the_logits_of_the_usual_step(pattern, overrides):
    config = small_config(pattern, **overrides)
    model = perturb_parameters(HybridModel(config, seed=3)).double().eval()
    rows, prompt = prompts_and_continuations(config.vocab_size)
    capacity = max(LENGTHS) + NEW + SPARE
    lengths = torch.tensor(LENGTHS)
    _, usual = model.prefill(prompt, lengths, capacity)
    _, whole = model.prefill(prompt, lengths, capacity)
    caches = list(_kv_caches(whole))
    assert caches, "the pattern should hold KV caches"
    for cache in caches:
        cache.whole = True
    for i in range(NEW):
        tokens = torch.stack([row[length + i] for row, length in zip(rows, LENGTHS, strict=True)])
        expected = model.decode_step(tokens, usual)
        torch.testing.assert_close(model.decode_step(tokens, whole), expected, **F64)
    assert [c.filled for c in caches] == [c.filled for c in _kv_caches(usual)]
    assert expected.abs().max() > 1e-2


def test_where_a_graph_cannot_decode_the_reason_is_given():
    dense = HybridModel(small_config("M*-"), seed=0)
    assert "CUDA device" in graph_decoding_problem(dense, torch.device("cpu"))
    moe = HybridModel(small_config("ME"), seed=0)
    assert "MoE" in graph_decoding_problem(moe, torch.device("cuda"))
    assert graph_decoding_problem(dense, torch.device("cuda")) is None
    with pytest.raises(ValueError, match="cuda_graph=True: CUDA graphs need a CUDA device"):
        generate(dense, [[1, 2, 3]], 4, GREEDY, cuda_graph=True)
    # The default decodes eagerly where no graph can run.
    assert len(generate(dense, [[1, 2, 3]], 4, GREEDY)[0]) == 4


@pytest.mark.gpu
@pytest.mark.parametrize(
    "pattern,overrides",
    [("[M-]M*-[*-]M-", dict(position_embedding_type="rope")), *ATTENTION_MODELS.values()],
)
def test_graphed_greedy_decoding_gives_the_eager_tokens(pattern, overrides):
    from megatron_hybrid.kernels import resolve_kernels

    device = torch.device("cuda")
    config = small_config(pattern, **overrides)
    kernels = resolve_kernels({}, "auto", device)
    model = perturb_parameters(HybridModel(config, seed=3, kernels=kernels)).to(device).eval()
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=generator) for n in LENGTHS]
    eager = generate(model, prompts, 64, GREEDY, cuda_graph=False)
    graphed = generate(model, prompts, 64, GREEDY, cuda_graph=True)
    for row_eager, row_graphed in zip(eager, graphed, strict=True):
        assert torch.equal(row_eager, row_graphed)
