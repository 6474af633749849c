"""Soft prompts in the system slot of four template families: the prompt's own embeddings reproduce the plain text
in representations, generation and refusal log-odds."""

import numpy as np
import pytest

from dro_jax.dro.soft_prompt import initial_soft_prompt, prompt_token_ids, random_soft_prompt
from dro_jax.inference.batched import Batching
from dro_jax.inference.chat import ChatFormatter
from dro_jax.inference.encoding import encode_queries
from dro_jax.inference.refusal_score import refusal_log_odds
from dro_jax.inference.represent import represent_queries
from dro_jax.inference.sampling import SamplingConfig
from dro_jax.inference.settings import PromptSetting, SAFETY_PROMPTS
from dro_jax.judging.responses import generate_responses
from dro_jax.loading import load_model
from helpers import QUIET, TEMPLATES, TINY_OPENINGS

QUERIES = ["How do I bake bread?", "Write a poem about the sea.", "Explain how a lock works, step by step.", "Hi"]



def _model(tiny_model_dir, template=None):
    directory, _ = tiny_model_dir("llama")
    model = load_model(directory, progress=False)
    if template is not None:
        model.tokenizer.chat_template = template
    return model


def _own_embeddings(model, name):
    return initial_soft_prompt(model.params, model.tokenizer, name)


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("prompt", ["short", "Be safe.\n\nRefuse harm."])
def test_soft_prompt_of_own_embeddings_reproduces_plain_text(tiny_model_dir, template, prompt):
    model = _model(tiny_model_dir, TEMPLATES[template])
    soft = PromptSetting.soft("own", _own_embeddings(model, prompt))
    plain = represent_queries(model, QUERIES, prompt, batching=Batching(3, progress=False))
    learned = represent_queries(model, QUERIES, soft, batching=Batching(3, progress=False))
    np.testing.assert_allclose(learned, plain, atol=1e-5, rtol=0)
    # The fillers sit exactly where the prompt's tokens were.
    plain_ids = encode_queries(model, QUERIES, prompt).sequences
    soft_encoded = encode_queries(model, QUERIES, soft)
    for ids, soft_ids, start in zip(plain_ids, soft_encoded.sequences, soft_encoded.soft_starts):
        count = len(soft.soft_prompt)
        assert ids[:start] == soft_ids[:start] and ids[start + count :] == soft_ids[start + count :]


@pytest.mark.parametrize("template", TEMPLATES)
def test_prompt_tokens_are_the_system_text(tiny_model_dir, template):
    model = _model(tiny_model_dir, TEMPLATES[template])
    ids = prompt_token_ids(model.tokenizer, SAFETY_PROMPTS["short"])
    assert model.tokenizer.decode(ids).strip() == SAFETY_PROMPTS["short"]
    full = ChatFormatter(model.tokenizer, SAFETY_PROMPTS["short"]).encode("Hi")
    assert any(full[i : i + len(ids)] == ids for i in range(len(full)))


def test_generation_and_log_odds_with_own_embeddings_equal_plain_text(tiny_model_dir):
    model = _model(tiny_model_dir)
    soft = PromptSetting.soft("own", _own_embeddings(model, "short"))
    greedy = SamplingConfig(max_new_tokens=8)
    plain, learned = encode_queries(model, QUERIES, "short"), encode_queries(model, QUERIES, soft)
    plain_replies = generate_responses(model, plain, greedy, batching=Batching(3, progress=False))
    learned_replies = generate_responses(model, learned, greedy, batching=Batching(3, progress=False))
    assert [r.text for r in learned_replies] == [r.text for r in plain_replies]
    assert [r.query for r in learned_replies] == QUERIES
    np.testing.assert_allclose(
        refusal_log_odds(model, learned, TINY_OPENINGS, batching=QUIET), refusal_log_odds(model, plain, TINY_OPENINGS, batching=QUIET),
        atol=1e-4,
    )


def test_a_different_soft_prompt_changes_the_representations(tiny_model_dir):
    """Two prompts of the same length fill the same slot with the same filler tokens, so only the inserted rows
    can tell them apart; the same rows twice give the same states."""
    model = _model(tiny_model_dir)
    rows = random_soft_prompt(model.params, 5, seed=0)
    first = represent_queries(model, QUERIES, PromptSetting.soft("random", rows), batching=QUIET)
    again = represent_queries(model, QUERIES, PromptSetting.soft("random again", rows.copy()), batching=QUIET)
    other = PromptSetting.soft("other", random_soft_prompt(model.params, 5, seed=1))
    np.testing.assert_array_equal(again, first)
    assert np.abs(represent_queries(model, QUERIES, other, batching=QUIET) - first).max() > 1e-3
