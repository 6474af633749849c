"""Tiny random Llama-family checkpoints, built locally with transformers, for tests.

Each is saved with `save_pretrained` (safetensors) together with a small
byte-level BPE tokenizer and a ChatML template, then loaded back through the
project's own loader, exactly like a real checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

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
    config = AutoConfig.for_model(
        model_type,
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        **settings,
    )
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
