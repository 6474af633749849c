"""Opening log-probabilities and refusal log-odds against transformers, and the label CLI."""

import json

import numpy as np
import torch

from dro_jax.chat import ChatFormatter
from dro_jax.cli import main
from dro_jax.loading import load_model
from dro_jax.refusal_score import Openings, opening_log_probs, refusal_log_odds, score_refusal
from dro_jax.represent import represent_tokens

QUERIES = ["How do I bake bread?", "Explain how a lock works, step by step.", "Hi"]
OPENINGS = Openings(refusal=("I'm sorry", "No"), compliant=("Sure", "Here is a poem"))


def test_opening_log_probs_match_transformers(tiny_model_dir):
    directory, torch_model = tiny_model_dir("llama")
    model = load_model(directory, progress=False)
    prompts = [ChatFormatter(model.tokenizer, None).encode(q) for q in QUERIES]
    texts = OPENINGS.refusal + OPENINGS.compliant
    ours = opening_log_probs(model, prompts, texts, batch_size=5, progress=False)
    for p, prompt in enumerate(prompts):
        for o, text in enumerate(texts):
            opening = model.tokenizer.encode(text, add_special_tokens=False)
            with torch.no_grad():
                logits = torch_model(torch.tensor([prompt + opening])).logits[0]
            log_probs = torch.log_softmax(logits, dim=-1)
            want = sum(log_probs[len(prompt) - 1 + i, token].item() for i, token in enumerate(opening))
            assert abs(ours[p, o] - want) < 1e-4, (QUERIES[p], text)
    scores = refusal_log_odds(model, prompts, OPENINGS, progress=False)
    want = np.logaddexp(ours[:, 0], ours[:, 1]) - np.logaddexp(ours[:, 2], ours[:, 3])
    np.testing.assert_allclose(scores, want, rtol=1e-6)


def test_refusal_scores_carry_the_representations_of_the_same_pass(tiny_model_dir):
    directory, _ = tiny_model_dir("llama")
    model = load_model(directory, progress=False)
    prompts = [ChatFormatter(model.tokenizer, "Be careful.").encode(q) for q in QUERIES]
    scores = score_refusal(model, prompts, OPENINGS, batch_size=2, progress=False)
    np.testing.assert_allclose(scores.states, represent_tokens(model, prompts, batch_size=2, progress=False), atol=1e-5)
    np.testing.assert_allclose(scores.log_odds, refusal_log_odds(model, prompts, OPENINGS, batch_size=3, progress=False), atol=1e-5)


def test_label_cli_writes_one_label_per_query_and_setting(tiny_model_dir, tmp_path):
    directory, _ = tiny_model_dir("llama")
    queries = tmp_path / "q.txt"
    queries.write_text("\n".join(QUERIES), encoding="utf-8")
    out = tmp_path / "labels.jsonl"
    args = ["label", "--model", str(directory), "--queries", str(queries), "--settings", "none", "short",
            "--num-samples", "2", "--max-new-tokens", "4", "--out", str(out)]
    assert main(args) == 0
    labels = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(l["setting"], l["query_index"]) for l in labels] == [(s, i) for s in ("none", "short") for i in range(3)]
    assert all(l["num_samples"] == 2 and l["compliance_rate"] in (0.0, 0.5, 1.0) for l in labels)
    assert all(np.isfinite(l["refusal_log_odds"]) for l in labels)
    assert labels[0]["refusal_log_odds"] != labels[3]["refusal_log_odds"]  # the prompt changes the score
    only_scores = tmp_path / "scores.jsonl"
    assert main(args[:-4] + ["--num-samples", "0", "--out", str(only_scores)]) == 0
    scored = [json.loads(line) for line in only_scores.read_text(encoding="utf-8").splitlines()]
    assert all(l["compliance_rate"] is None for l in scored)
    assert [l["refusal_log_odds"] for l in scored] == [l["refusal_log_odds"] for l in labels]


def test_label_with_a_judge_model(tiny_model_dir, tmp_path):
    directory, _ = tiny_model_dir("llama")
    queries = tmp_path / "q.txt"
    queries.write_text("\n".join(QUERIES), encoding="utf-8")
    out = tmp_path / "labels.jsonl"
    assert main(["label", "--model", str(directory), "--queries", str(queries), "--settings", "none", "--num-samples", "2",
                 "--max-new-tokens", "2", "--judge-model", str(directory), "--out", str(out)]) == 0
    labels = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    # Two new tokens never make more than two lines, so nothing counts as harmful compliance.
    assert [l["compliance_rate"] for l in labels] == [0.0, 0.0, 0.0]
