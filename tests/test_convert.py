"""megatron-hybrid-convert: inspect, consolidated safetensors round trip, dtype, bad input."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors import safe_open
from test_checkpoint import TOKENS, save, trained_model

from megatron_hybrid.checkpointing.consolidated import read_model_state
from megatron_hybrid.checkpointing.convert import main
from megatron_hybrid.checkpointing.manager import load_checkpoint
from megatron_hybrid.model import HybridModel


def test_inspect_lists_iteration_pattern_config_keys_shapes_and_dtypes(tmp_path, capsys):
    model, optimizer = trained_model("[M-]*E")
    save(tmp_path, 4, model, optimizer)
    assert main(["--inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "iteration    4" in out and "[M-]*E" in out
    assert '"hidden_size": 32' in out
    assert "decoder.layers.0.mixer.in_proj.weight" in out and "float32" in out
    expert_row = r"decoder\.layers\.3\.mlp\.experts\.linear_fc1\.weight +\(4, 24, 32\) +float32"
    assert re.search(expert_row, out)
    assert "optimizer:" in out


def test_safetensors_round_trip_gives_a_loadable_checkpoint_with_equal_logits(tmp_path):
    model, _ = trained_model("[M-][*E]M-")
    save(tmp_path / "ckpt", 9, model)
    file = tmp_path / "model.safetensors"
    assert main(["to-safetensors", str(tmp_path / "ckpt"), str(file)]) == 0
    assert main(["from-safetensors", str(file), str(tmp_path / "back")]) == 0
    state, config, meta = read_model_state(tmp_path / "back")
    assert config.hybrid_layer_pattern == "[M-][*E]M-" and meta["iteration"] == 0
    fresh = HybridModel(config, seed=1)
    assert load_checkpoint(tmp_path / "back", fresh, None, config) is None  # model only
    torch.testing.assert_close(fresh(TOKENS), model(TOKENS), atol=0, rtol=0)


def test_dtype_option_casts_the_export(tmp_path):
    model, _ = trained_model("M-")
    save(tmp_path / "ckpt", 1, model)
    file = tmp_path / "model.safetensors"
    assert main(["to-safetensors", str(tmp_path / "ckpt"), str(file), "--dtype", "bf16"]) == 0
    with safe_open(str(file), framework="pt") as f:
        key = "decoder.layers.0.mixer.in_proj.weight"
        tensor = f.get_tensor(key)
    assert tensor.dtype == torch.bfloat16
    expected = model.state_dict()["decoder.layers.0.sequence_mixer.in_proj.weight"]
    assert torch.equal(tensor, expected.to(torch.bfloat16))


def test_bad_inputs_exit_2_with_a_message_naming_the_path(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    assert "nope does not exist" in capsys.readouterr().err
    (tmp_path / "x.safetensors").write_bytes(b"not a safetensors file")
    assert main(["from-safetensors", str(tmp_path / "x.safetensors"), str(tmp_path / "o")]) == 2
    assert "x.safetensors" in capsys.readouterr().err


def test_hf_export_and_import_through_the_command_line(tmp_path):
    transformers = pytest.importorskip("transformers")
    model, _ = trained_model(
        "[M-]*-[ME]",
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_shared_expert_intermediate_size=16,
    )
    save(tmp_path / "ckpt", 5, model)
    assert main(["to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    hf_model = transformers.NemotronHForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        hf_logits = hf_model(TOKENS, use_cache=False).logits
        torch.testing.assert_close(hf_logits, model(TOKENS), atol=1e-5, rtol=0)
    assert main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    state, config, _ = read_model_state(tmp_path / "back")
    fresh = HybridModel(config, seed=2)
    load_checkpoint(tmp_path / "back", fresh, None, config)
    torch.testing.assert_close(fresh(TOKENS), model(TOKENS), atol=0, rtol=0)


def test_hf_export_of_an_inexpressible_model_names_the_setting(tmp_path, capsys):
    pytest.importorskip("transformers")
    model, _ = trained_model("M*", position_embedding_type="rope")
    save(tmp_path / "ckpt", 1, model)
    assert main(["to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 2
    assert "rope" in capsys.readouterr().err
