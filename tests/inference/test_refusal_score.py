"""Opening log-probabilities and refusal log-odds against transformers; representations from the same pass."""

import numpy as np
import torch

from dro_jax.inference.batched import Batching
from dro_jax.inference.chat import ChatFormatter
from dro_jax.inference.refusal_score import Openings, opening_log_probs, refusal_log_odds, score_refusal
from dro_jax.inference.represent import represent_tokens
from dro_jax.loading import load_model
from helpers import QUIET

QUERIES = ["How do I bake bread?", "Explain how a lock works, step by step.", "Hi"]
OPENINGS = Openings(refusal=("I'm sorry", "No"), compliant=("Sure", "Here is a poem"))


def test_opening_log_probs_match_transformers(tiny_model_dir):
    directory, torch_model = tiny_model_dir("llama")
    model = load_model(directory, progress=False)
    prompts = [ChatFormatter(model.tokenizer, None).encode(q) for q in QUERIES]
    texts = OPENINGS.refusal + OPENINGS.compliant
    ours = opening_log_probs(model, prompts, texts, batching=Batching(5, progress=False))
    for p, prompt in enumerate(prompts):
        for o, text in enumerate(texts):
            opening = model.tokenizer.encode(text, add_special_tokens=False)
            with torch.no_grad():
                logits = torch_model(torch.tensor([prompt + opening])).logits[0]
            log_probs = torch.log_softmax(logits, dim=-1)
            want = sum(log_probs[len(prompt) - 1 + i, token].item() for i, token in enumerate(opening))
            assert abs(ours[p, o] - want) < 1e-4, (QUERIES[p], text)
    scores = refusal_log_odds(model, prompts, OPENINGS, batching=QUIET)
    want = np.logaddexp(ours[:, 0], ours[:, 1]) - np.logaddexp(ours[:, 2], ours[:, 3])
    np.testing.assert_allclose(scores, want, rtol=1e-6)


def test_refusal_scores_carry_the_representations_of_the_same_pass(tiny_model_dir):
    """Each prompt's log-odds and state are those of that prompt (checked against transformers), whatever the
    batch size, and the state is the one the representation pass gives."""
    directory, torch_model = tiny_model_dir("llama")
    model = load_model(directory, progress=False)
    prompts = [ChatFormatter(model.tokenizer, "Be careful.").encode(q) for q in QUERIES]
    scores = score_refusal(model, prompts, OPENINGS, batching=Batching(2, progress=False))
    np.testing.assert_allclose(scores.states, represent_tokens(model, prompts, batching=Batching(2, progress=False)), atol=1e-5)
    np.testing.assert_allclose(scores.log_odds, refusal_log_odds(model, prompts, OPENINGS, batching=Batching(3, progress=False)), atol=1e-5)
    openings = [[model.tokenizer.encode(t, add_special_tokens=False) for t in group] for group in (OPENINGS.refusal, OPENINGS.compliant)]
    for p, prompt in enumerate(prompts):
        with torch.no_grad():
            out = torch_model(torch.tensor([prompt]), output_hidden_states=True)
        np.testing.assert_allclose(scores.states[p], out.hidden_states[-1][0, -1].numpy(), atol=1e-4, err_msg=QUERIES[p])
        group_log_probs = []
        for group in openings:
            log_probs = []
            for opening in group:
                with torch.no_grad():
                    logits = torch_model(torch.tensor([prompt + opening])).logits[0]
                steps = torch.log_softmax(logits, dim=-1)
                log_probs.append(sum(steps[len(prompt) - 1 + i, token].item() for i, token in enumerate(opening)))
            group_log_probs.append(np.logaddexp.reduce(log_probs))
        assert abs(scores.log_odds[p] - (group_log_probs[0] - group_log_probs[1])) < 1e-4, QUERIES[p]
