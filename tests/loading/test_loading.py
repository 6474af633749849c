"""Loaders: sharded safetensors, GGUF, dtypes, config parsing, and clear errors on bad checkpoints."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dro_jax.common.errors import DroJaxError
from dro_jax.loading import load_model
from dro_jax.models import ModelConfig, RopeScaling, forward
from helpers import tiny_torch_model, write_tiny_gguf

IDS = np.random.default_rng(1).integers(0, 320, size=(2, 9)).astype(np.int32)


def _logits(model):
    return np.asarray(jax.jit(forward, static_argnames=("config", "output_logits"))(model.params, model.config, IDS, np.ones_like(IDS), output_logits=True).logits)


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path):
    torch_model = tiny_torch_model("llama")
    torch_model.save_pretrained(tmp_path / "single")
    torch_model.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    single = load_model(tmp_path / "single", with_tokenizer=False, progress=False)
    sharded = load_model(tmp_path / "sharded", with_tokenizer=False, progress=False)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), single.params, sharded.params)


def test_bfloat16_checkpoint_to_float32_and_back(tmp_path):
    torch_model = tiny_torch_model("qwen2").to(torch.bfloat16)
    torch_model.save_pretrained(tmp_path)
    as_f32 = load_model(tmp_path, dtype="float32", with_tokenizer=False, progress=False)
    as_bf16 = load_model(tmp_path, dtype="bfloat16", with_tokenizer=False, progress=False)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(as_f32.params))
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(as_bf16.params))
    want = torch_model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(as_f32.params["layers"]["self_attn"]["q_proj"]["weight"][1]), want)


def test_gguf_matches_transformers_reading_the_same_file(tmp_path):
    """A tiny llama written as llama.cpp does (q/k rows permuted, Q8_0), read by both loaders."""
    from transformers import AutoModelForCausalLM

    write_tiny_gguf(tiny_torch_model("llama"), tmp_path / "tiny.gguf")
    ours = load_model(tmp_path / "tiny.gguf", with_tokenizer=False, progress=False)
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        want = theirs(torch.tensor(IDS, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(_logits(ours), want, atol=1e-4, rtol=0)


def test_gguf_without_unpermuting_would_be_wrong(tmp_path, monkeypatch):
    """Guards the test above: the same file loaded with the loader's q/k unpermuting turned off gives different logits."""
    from dro_jax.loading import gguf as gguf_loader

    torch_model = tiny_torch_model("llama")
    write_tiny_gguf(torch_model, tmp_path / "tiny.gguf", quantize_q8=False)
    ours = load_model(tmp_path / "tiny.gguf", with_tokenizer=False, progress=False)
    with torch.no_grad():
        want = torch_model(torch.tensor(IDS, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(_logits(ours), want, atol=1e-4, rtol=0)
    monkeypatch.setattr(gguf_loader, "undo_rotary_permutation", lambda weight, num_heads: weight)
    permuted = load_model(tmp_path / "tiny.gguf", with_tokenizer=False, progress=False)
    assert np.abs(_logits(permuted) - want).max() > 1e-3


def test_config_reads_old_and_new_rope_fields():
    base = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    old = ModelConfig.from_hf_dict(dict(base, rope_theta=5e5, rope_scaling={"type": "linear", "factor": 2.0}))
    new = ModelConfig.from_hf_dict(dict(base, rope_parameters={"rope_type": "linear", "rope_theta": 5e5, "factor": 2.0}))
    assert old == new
    assert old.rope_theta == 5e5 and old.rope_scaling == RopeScaling("linear", factor=2.0)
    assert old.num_kv_heads == 2 and old.head_dim == 4
    qwen = ModelConfig.from_hf_dict(dict(base, model_type="qwen2"))
    assert qwen.qkv_bias and not qwen.o_bias


# ---- bad checkpoints: one clear error each ----


def _expect_error(spec, *fragments, **kwargs):
    with pytest.raises(DroJaxError) as info:
        load_model(spec, progress=False, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    return message


def test_missing_path(tmp_path):
    _expect_error(tmp_path / "nope", "nope", "no such file or directory")


def test_directory_without_config(tmp_path):
    _expect_error(tmp_path, str(tmp_path), "no config.json")


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    _expect_error(tmp_path, "config.json", "unsupported model_type 'gpt2'")


def test_missing_config_field(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    _expect_error(tmp_path, "config.json", "missing required field")


def test_unsupported_rope_type(tmp_path):
    cfg = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, rope_scaling={"type": "yarn", "factor": 2.0})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    _expect_error(tmp_path, "unsupported rope type 'yarn'")


def test_truncated_safetensors(tmp_path):
    tiny_torch_model("llama").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    _expect_error(tmp_path, "model.safetensors", "not a readable safetensors file", with_tokenizer=False)


def test_missing_tensor(tmp_path):
    from safetensors.torch import save_file

    model = tiny_torch_model("llama")
    model.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(state, tmp_path / "model.safetensors")
    _expect_error(tmp_path, "model.layers.1.mlp.up_proj.weight", "missing", with_tokenizer=False)


def test_wrong_tensor_shape(tmp_path):
    model = tiny_torch_model("llama")
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    _expect_error(tmp_path, "has shape", "config implies", with_tokenizer=False)


def test_directory_without_tokenizer(tmp_path):
    tiny_torch_model("llama").save_pretrained(tmp_path)
    _expect_error(tmp_path, "cannot load its tokenizer")


def test_pytorch_bin_only_directory(tmp_path):
    tiny_torch_model("llama").save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    _expect_error(tmp_path, "no *.safetensors weights", with_tokenizer=False)


def test_unsupported_gguf_architecture(tmp_path):
    write_tiny_gguf(tiny_torch_model("llama"), tmp_path / "tiny.gguf", architecture="gpt2")
    _expect_error(tmp_path / "tiny.gguf", "tiny.gguf", "unsupported GGUF architecture 'gpt2'", with_tokenizer=False)


def test_truncated_gguf(tmp_path):
    write_tiny_gguf(tiny_torch_model("llama"), tmp_path / "tiny.gguf")
    path = tmp_path / "tiny.gguf"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    _expect_error(path, "tiny.gguf", "not a readable GGUF file", with_tokenizer=False)


def test_not_a_model_file(tmp_path):
    path = tmp_path / "weights.txt"
    path.write_text("hello")
    _expect_error(path, "expected a Hugging Face model directory or a .gguf file")


def test_unknown_dtype(tmp_path):
    _expect_error(tmp_path, "unsupported dtype 'float16'", dtype="float16")
