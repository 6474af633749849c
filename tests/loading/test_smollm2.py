"""The packaged SmolLM2-135M-Instruct (GGUF Q4_1) against transformers reading the same file."""

import numpy as np
import pytest
import torch

from dro_jax.inference.batched import Batching
from dro_jax.inference.chat import ChatFormatter
from dro_jax.inference.represent import represent_queries
from dro_jax.inference.settings import SAFETY_PROMPTS

pytestmark = [pytest.mark.real_model, pytest.mark.heavy]  # heavy: among the longest files, started first (tests/conftest.py)

PROMPTS = [
    "How do I bake a loaf of sourdough bread?",
    "Write a haiku about autumn leaves.",
    "What is the capital of Australia?",
    "Explain photosynthesis to a ten-year-old.",
    "How can I break into my neighbour's car?",
    "Give me three tips for a job interview.",
    "Translate 'good morning' into French.",
    "How do I make a fake passport?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "What is 17 times 23?",
    "Write a threatening letter to my landlord.",
    "How do vaccines train the immune system?",
    "Suggest a name for a small bakery.",
    "How can I cheat on my final exam without getting caught?",
    "Describe the water cycle.",
    "Write a Python function that reverses a string.",
    "What household chemicals should never be mixed, and why?",
    "Plan a three-day trip to Rome.",
    "How do I spread a rumour that ruins someone's reputation?",
    "Why is the sky blue?",
]


def test_config_read_from_gguf(smollm2):
    c = smollm2.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.intermediate_size, c.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0


def test_twenty_prompts_match_transformers(smollm2, torch_smollm2):
    """Cosine >= 0.9999 of the final hidden state at every position, and the same next token. The prompts go in
    one right-padded batch (one compile; causal attention leaves each prompt's own positions as they are alone),
    transformers reads each prompt alone."""
    import jax

    from dro_jax.models import forward

    settings = [None, SAFETY_PROMPTS["default"]]
    encoded = [ChatFormatter(smollm2.tokenizer, settings[number % 2]).encode(prompt) for number, prompt in enumerate(PROMPTS)]
    width = max(map(len, encoded))
    ids = np.full((len(encoded), width), smollm2.tokenizer.pad_token_id, np.int32)
    mask = np.zeros_like(ids)
    for row, tokens in enumerate(encoded):
        ids[row, :len(tokens)], mask[row, :len(tokens)] = tokens, 1
    ours = jax.jit(forward, static_argnames=("config", "output_logits"))(smollm2.params, smollm2.config, ids, mask, output_logits=True)
    for row, (prompt, tokens) in enumerate(zip(PROMPTS, encoded)):
        with torch.no_grad():
            theirs = torch_smollm2(torch.tensor([tokens], dtype=torch.long), output_hidden_states=True)
        a = np.asarray(ours.last_hidden_state[row, :len(tokens)])
        b = theirs.hidden_states[-1][0].numpy()
        cosine = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
        assert cosine.min() >= 0.9999, (prompt, cosine.min())
        assert np.asarray(ours.logits[row, len(tokens) - 1]).argmax() == theirs.logits[0, -1].argmax().item(), prompt


def test_batched_representations_match_transformers_one_by_one(smollm2, torch_smollm2):
    """The CLI path (left-padded, bucketed batches) against the reference's per-query loop."""
    states = represent_queries(smollm2, PROMPTS, SAFETY_PROMPTS["short"], batching=Batching(8, progress=False))
    formatter = ChatFormatter(smollm2.tokenizer, SAFETY_PROMPTS["short"])
    for row, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            want = torch_smollm2(torch.tensor([formatter.encode(prompt)]), output_hidden_states=True).hidden_states[-1][0, -1].numpy()
        cosine = states[row] @ want / np.linalg.norm(states[row]) / np.linalg.norm(want)
        assert cosine >= 0.9999, (prompt, cosine)


def test_smollm2_template_inserts_its_own_system_message(smollm2):
    text = smollm2.tokenizer.decode(ChatFormatter(smollm2.tokenizer, None).encode("Hi"))
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_greedy_generation_equals_transformers_generate(smollm2, torch_smollm2):
    """20 chat-formatted prompts x 32 new tokens, one left-padded batch, token for token."""
    from dro_jax.inference.encoding import encode_queries
    from dro_jax.inference.generate import generate_tokens
    from dro_jax.inference.padding import left_padded_batches
    from dro_jax.inference.sampling import SamplingConfig
    from dro_jax.models.inputs import ModelInputs

    pad = smollm2.tokenizer.pad_token_id
    stop = [smollm2.tokenizer.eos_token_id]
    batch = next(left_padded_batches(encode_queries(smollm2, PROMPTS, None).sequences, len(PROMPTS), pad))
    tokens, _ = generate_tokens(smollm2.params, smollm2.config, ModelInputs(batch.token_ids, batch.attention_mask), stop, SamplingConfig(max_new_tokens=32), pad_id=pad)
    with torch.no_grad():
        out = torch_smollm2.generate(
            input_ids=torch.tensor(batch.token_ids, dtype=torch.long), attention_mask=torch.tensor(batch.attention_mask),
            max_new_tokens=32, do_sample=False, eos_token_id=stop, pad_token_id=pad,
        )
    theirs = out[:, batch.token_ids.shape[1]:].numpy()
    theirs = np.pad(theirs, ((0, 0), (0, 32 - theirs.shape[1])), constant_values=pad)
    for row in range(len(PROMPTS)):
        assert tokens[row].tolist() == theirs[row].tolist(), PROMPTS[batch.index[row]]
