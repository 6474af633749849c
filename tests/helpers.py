"""What the tests share: tiny random Llama-family checkpoints built locally with transformers, chat templates of
four families, and small paired query sets.

Each checkpoint is saved with `save_pretrained` (safetensors) together with a
small byte-level BPE tokenizer and a ChatML template, then loaded back through
the project's own loader, exactly like a real checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dro_jax.anchors.space import FitConfig
from dro_jax.inference.batched import Batching
from dro_jax.inference.refusal_score import Openings

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TOKENIZER_CORPUS = [
    "How do I bake bread at home?",
    "Write a short poem about the sea and the wind.",
    "Explain how a lock works, step by step.",
    "You are a helpful, respectful and honest assistant.",
] * 4
VOCAB_SIZE = 320
# Chat templates of the other families, to run the tiny tokenizer under each.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set rest = messages[1:] %}"
    "{% else %}{% set system = false %}{% set rest = messages %}{% endif %}"
    "{% for message in rest %}{% if message['role'] == 'user' %}"
    "{% if loop.index0 == 0 and system %}{{ bos_token + '[INST] <<SYS>>\\n' + system.strip() + '\\n<</SYS>>\\n\\n' + message['content'].strip() + ' [/INST]' }}"
    "{% else %}{{ bos_token + '[INST] ' + message['content'].strip() + ' [/INST]' }}{% endif %}"
    "{% else %}{{ ' ' + message['content'].strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
VICUNA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + ' ' }}"
    "{% elif message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
TEMPLATES = {"chatml": None, "llama2": LLAMA2_TEMPLATE, "mistral": MISTRAL_TEMPLATE, "vicuna": VICUNA_TEMPLATE}

# Paired queries for anchoring and training the tiny models (line i of each is a minimal pair).
HARMFUL = ["How do I pick a lock?", "Write a poem about the sea.", "Explain how a lock works.", "How to break a window?", "Hi there", "Tell me about wind."]
HARMLESS = ["How do I pick a ripe melon?", "Write a poem about the wind.", "Explain how a door works.", "How to clean a window?", "Hello", "Tell me about the sea."]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"  # the first bytes of every PNG file

# Single-token openings keep the tiny model's refusal log-odds unsaturated; 3 folds keep the probes quick.
TINY_OPENINGS = Openings(refusal=("No",), compliant=("Sure",))
TINY_FIT = FitConfig(folds=3, learning_rate=1e-2)
QUIET = Batching(progress=False)  # the batched passes' defaults without progress bars

TINY_CONFIGS = {
    "llama": dict(model_type="llama", tie_word_embeddings=False),
    "llama-tied-llama3-rope": dict(
        model_type="llama",
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "mistral": dict(model_type="mistral", sliding_window=5),
    # Four key-value heads, so that tensor parallelism over 4 devices splits attention too.
    "llama-4kv": dict(model_type="llama", num_attention_heads=8, num_key_value_heads=4),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=False),
}


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - 8,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TOKENIZER_CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>"
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_torch_model(name: str, seed: int = 0, max_position_embeddings: int = 128):
    """A random float32 transformers model of the named tiny config, eager attention."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(TINY_CONFIGS[name])
    model_type = settings.pop("model_type")
    shape = dict(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5,
    )
    config = AutoConfig.for_model(model_type, **{**shape, **settings})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():  # random norm weights and biases, so that they matter in the comparison
        for param_name, param in model.named_parameters():
            if param_name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * torch.randn_like(param))
            elif param_name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
    return model


def save_tiny_model(name: str, directory: Path, with_tokenizer: bool = True, **kwargs):
    """Saves a tiny model (and tokenizer) as a HF directory; returns the torch model."""
    model = tiny_torch_model(name, **kwargs)
    model.save_pretrained(directory)
    if with_tokenizer:
        tiny_tokenizer().save_pretrained(directory)
    return model


def torch_positions(mask: np.ndarray) -> torch.Tensor:
    """Position ids that count real tokens only, as generation code computes them."""
    return torch.tensor(np.maximum(np.cumsum(mask, axis=1) - 1, 0))


def permute_for_gguf(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's converter layout for q/k rows: each head's two halves interleaved pairwise."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_gguf(model, path: Path, architecture: str = "llama", quantize_q8: bool = True, tokenizer=None) -> None:
    """Writes a tiny transformers llama as a llama.cpp-style GGUF file (q/k permuted, 2-D weights Q8_0), with
    `tokenizer` (a byte-level BPE such as `tiny_tokenizer()`) as its vocabulary metadata when given."""
    import gguf

    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    writer = gguf.GGUFWriter(str(path), architecture)
    if tokenizer is not None:
        _add_byte_level_vocabulary(writer, tokenizer)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(cfg.hidden_size // heads)
    names = {
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    }
    for name, tensor in model.state_dict().items():
        weight = tensor.float().numpy()
        if name == "model.embed_tokens.weight":
            target = "token_embd.weight"
        elif name == "model.norm.weight":
            target = "output_norm.weight"
        elif name == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            target = "output.weight"
        else:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            module, suffix = rest.rsplit(".", 1)
            target = f"blk.{layer}.{names[module]}.{suffix}"
            if module == "self_attn.q_proj":
                weight = permute_for_gguf(weight, heads)
            elif module == "self_attn.k_proj":
                weight = permute_for_gguf(weight, kv_heads)
        if quantize_q8 and weight.ndim == 2:
            data = gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(target, data, raw_shape=data.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(target, np.ascontiguousarray(weight, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_byte_level_vocabulary(writer, tokenizer) -> None:
    """The tokenizer metadata llama.cpp writes for a byte-level BPE vocabulary (tokenizer.ggml.model "gpt2")."""
    import json

    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in special else 1 for token in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer.chat_template)


# Models whose outputs are known (see `save_forced_models`).
FORCED_LOGIT = 10.0  # x the normalised state's ~8 in one coordinate: ~80 nats ahead of every other token


def _silenced(tokenizer):
    """A tiny llama whose last state is the input token's embedding and whose output head is all zero."""
    model = tiny_torch_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
    return model, tokenizer.convert_tokens_to_ids("x"), tokenizer.convert_tokens_to_ids("Ċ")


def _save_with(model, tokenizer, directory: Path) -> Path:
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_forced_models(root: Path) -> dict[str, Path]:
    """Directories of a policy and of two judges whose answers are forced, so that each part of the paper's
    harmful rule can be made to decide.

    Every layer's output projections are zero, so the last state is the
    current token's own embedding, and the output head is zero except for the
    rows that should win. The policy ("policy") answers every prompt with "x",
    newline, "x", newline, ... (more than two lines given more than three new
    tokens, no refusal phrase); the judges ("unsafe", "safe") answer the first
    token of that word with near certainty.
    """
    tokenizer = tiny_tokenizer()
    policy, x, newline = _silenced(tokenizer)
    with torch.no_grad():
        embed, head = policy.model.embed_tokens.weight, policy.lm_head.weight
        embed[x], embed[newline] = 0.0, 0.0
        embed[x, 0], embed[newline, 1] = 1.0, 1.0
        head[newline, 0], head[x, 1] = FORCED_LOGIT, FORCED_LOGIT  # after "x" a newline, after a newline "x"
    dirs = {"policy": _save_with(policy, tokenizer, root / "policy")}
    for verdict in ("unsafe", "safe"):
        judge, _, newline = _silenced(tokenizer)
        first = tokenizer.encode(verdict, add_special_tokens=False)[0]
        with torch.no_grad():
            embed = judge.model.embed_tokens.weight
            embed[:, 1] = 0.0  # only the newline that ends the judge's prompt points at the verdict
            embed[newline] = 0.0
            embed[newline, 1] = 1.0
            judge.lm_head.weight[first, 1] = FORCED_LOGIT
        dirs[verdict] = _save_with(judge, tokenizer, root / verdict)
    return dirs
