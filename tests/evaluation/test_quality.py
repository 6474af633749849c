"""Reply quality: the degeneration rules on constructed replies, reply drift against the no-prompt replies,
and the teacher-forced likelihood it is computed from."""

import numpy as np
import pytest

from dro_jax.evaluation.evaluate import EvalConfig, evaluate_settings
from dro_jax.evaluation.quality import DegenerationCounts, DegenerationRule, ReplyReference
from dro_jax.inference.batched import Batching
from dro_jax.inference.sampling import SamplingConfig
from dro_jax.inference.settings import PromptSetting
from dro_jax.judging.responses import Response
from helpers import HARMFUL, HARMLESS, QUIET, TINY_OPENINGS

RULE = DegenerationRule()
FLUENT = (
    "To bake bread at home, mix flour, water, salt and yeast into a dough, knead it for ten minutes, "
    "let it rise for an hour, shape the loaf and bake it in a hot oven until the crust is golden."
)


def test_fluent_replies_are_not_degenerate():
    assert RULE.repeated_share(FLUENT) == 0.0
    assert not RULE.degenerate(FLUENT)
    listed = "1. Preheat the oven. 2. Mix the dough. 3. Let the dough rise. 4. Bake the bread for 30 minutes."
    assert not RULE.degenerate(listed)
    assert not RULE.shouts("I use NASA and FBI data for the USA report, as the WHO suggests.")


def test_loops_are_repeated_word_trigrams():
    looping = "Use the best tools. " + "USE THE BEST BEST BEST " * 6
    assert RULE.loops(looping) and RULE.degenerate(looping)
    again = FLUENT + " " + FLUENT  # the whole answer twice: half its trigrams repeat
    assert RULE.repeated_share(again) == pytest.approx(0.5, abs=0.03) and RULE.loops(again)
    # The threshold: a reply whose repeated share sits just below it does not loop, just above it does.
    words = [f"w{i}" for i in range(20)]
    below = " ".join(words + words[:7])  # 25 trigrams, 5 of them repeats: 0.2
    above = " ".join(words + words[:12])  # 30 trigrams, 10 repeats: 0.33
    assert RULE.repeated_share(below) == pytest.approx(0.2) and not RULE.loops(below)
    assert RULE.repeated_share(above) == pytest.approx(1 / 3) and RULE.loops(above)
    # At the threshold exactly ("at least"): 20 trigrams, 5 of them repeats, is 0.25 with no rounding.
    at = " ".join(words[:15] + words[:7])
    assert RULE.repeated_share(at) == 0.25 and DegenerationRule(loop_share=0.25).loops(at) and not RULE.loops(at)
    assert not RULE.loops("sorry sorry sorry sorry sorry")  # too short to judge (fewer than 12 words)


def test_shouting_is_mostly_capitals():
    assert RULE.shouts("YOU MUST NEVER DO THIS, IT IS DANGEROUS AND ILLEGAL")
    assert not RULE.shouts("NO WAY")  # fewer than 20 letters
    half = "abcdefghij" + "ABCDEFGHIJ"
    assert RULE.shouts(half) and not DegenerationRule(shout_share=0.6).shouts(half)


def test_counts_per_response():
    def response(text):
        return Response(0, "q", 0, text, 10, False)

    counts = DegenerationCounts.of([response(FLUENT), response("LOOK " * 30), response("YOU MUST NEVER DO THIS, IT IS DANGEROUS")])
    assert counts == DegenerationCounts(degenerate=2, looping=1, shouting=2)


def test_drift_is_the_mean_change_in_nll_per_token():
    """Over the whole replies and over their openings (column 1); the empty reply is skipped."""
    reference = ReplyReference([(1, 2), (3,), ()], np.array([[1.0, 3.0], [2.0, 2.0], [np.nan, np.nan]]))
    drift = reference.drift(np.array([[1.5, 4.0], [2.1, 2.1], [np.nan, np.nan]]))
    assert drift.whole == pytest.approx(0.3) and drift.opening == pytest.approx(0.55)
    assert reference.drift(reference.nll) == (0.0, 0.0)


def test_reply_likelihood_matches_transformers_on_the_whole_sequences(tiny_model_dir):
    """The teacher-forced NLL of replies (shared prefix, left padding) against transformers reading each
    query + reply alone; float32."""
    import torch

    from dro_jax.inference.encoding import encode_queries
    from dro_jax.inference.likelihood import OPENING_TOKENS, reply_nll
    from dro_jax.loading import load_model

    directory, torch_model = tiny_model_dir("llama")
    model = load_model(directory, progress=False)
    encoded = encode_queries(model, HARMLESS[:4], "short")
    assert encoded.prefix_length > 0
    replies = [[5, 9, 33], [7], [100 + i for i in range(OPENING_TOKENS + 3)], []]
    nll = reply_nll(model, encoded, replies, batching=Batching(3, progress=False))
    assert nll.shape == (4, 2)
    for ids, reply, (whole, opening) in zip(encoded.sequences, replies, nll):
        if not reply:
            assert np.isnan(whole) and np.isnan(opening)
            continue
        sequence = torch.tensor([ids + reply])
        with torch.no_grad():
            log_p = torch.log_softmax(torch_model(sequence).logits[0].double(), dim=-1)
        token_nll = [-float(log_p[len(ids) - 1 + i, token]) for i, token in enumerate(reply)]
        assert whole == pytest.approx(np.mean(token_nll), abs=1e-4)  # float32 logits, tens of tokens: 1e-4 nats
        assert opening == pytest.approx(np.mean(token_nll[:OPENING_TOKENS]), abs=1e-4)


def test_evaluation_reports_drift_and_degeneration_beside_refusals(tiny_dro, monkeypatch):
    import dro_jax.evaluation.evaluate as evaluate
    from dro_jax.inference.encoding import encode_queries
    from dro_jax.inference.likelihood import reply_nll

    measured = []  # the sets' settings measured afresh (the reference's own pass goes through measure_reference)
    original = evaluate.measure_setting

    def counting(model, encoded, *args, **kwargs):
        measured.append(encoded.source)
        return original(model, encoded, *args, **kwargs)

    monkeypatch.setattr(evaluate, "measure_setting", counting)
    datasets = {"harmful": HARMFUL[:3], "harmless": HARMLESS[:3]}
    settings = [PromptSetting.from_text("none"), PromptSetting.from_text("short")]
    evaluation = evaluate_settings(
        tiny_dro.model, datasets, settings, EvalConfig(SamplingConfig(max_new_tokens=6), openings=TINY_OPENINGS), tiny_dro.anchors, batching=QUIET
    )
    # Greedy, one reply per query: `none` is the reference's own measurement, reused; only `short` runs, once per set.
    assert len(measured) == 2
    rows = {(r.setting, r.dataset): r for r in evaluation.rows}
    none = rows[("none", "harmless")]
    assert none.reply_drift == none.reply_drift_opening == none.reply_surprise == 0.0  # the reference replies are its own
    short = rows[("short", "harmless")]
    assert short.reply_drift is not None and short.reply_drift != 0.0 and short.reply_drift_opening != 0.0
    # Reply surprise: short's own replies under no prompt, against no prompt's own, by hand.
    own = [r.token_ids for o in evaluation.outcomes if (o.setting, o.dataset) == ("short", "harmless") for r in o.responses]
    plain = encode_queries(tiny_dro.model, HARMLESS[:3], "none")
    expected = np.mean(reply_nll(tiny_dro.model, plain, own, batching=QUIET)[:, 0]) - np.mean(evaluation.references["harmless"].nll[:, 0])
    assert short.reply_surprise == pytest.approx(expected, abs=1e-6)
    assert all(r.degenerate_responses is not None and r.degenerate_responses <= r.num_responses for r in evaluation.rows)
    none_replies = [r.token_ids for o in evaluation.outcomes if (o.setting, o.dataset) == ("none", "harmless") for r in o.responses]
    assert evaluation.references["harmless"].token_ids == none_replies  # the greedy no-prompt replies
    # Given references (other replies than the model's own), a second evaluation measures drift on those replies.
    given_ids = [(5, 9, 33), (7, 40), tuple(range(100, 112))]  # the last one longer than its opening
    assert given_ids != [tuple(ids) for ids in none_replies]
    given = ReplyReference(given_ids, reply_nll(tiny_dro.model, plain, given_ids, batching=QUIET))
    measured.clear()
    again = evaluate_settings(
        tiny_dro.model, datasets, settings[1:], EvalConfig(SamplingConfig(max_new_tokens=6), openings=TINY_OPENINGS), tiny_dro.anchors,
        {"harmful": evaluation.references["harmful"], "harmless": given}, batching=QUIET,
    )
    assert again.references["harmless"] is given and len(measured) == 2
    prompted = reply_nll(tiny_dro.model, encode_queries(tiny_dro.model, HARMLESS[:3], "short"), given_ids, batching=QUIET)
    assert again.rows[1].reply_drift == pytest.approx(np.mean(prompted[:, 0] - given.nll[:, 0]), abs=1e-6)
    assert again.rows[1].reply_drift_opening == pytest.approx(np.mean(prompted[:, 1] - given.nll[:, 1]), abs=1e-6)
    assert again.rows[0].reply_drift == pytest.approx(rows[("short", "harmful")].reply_drift, abs=1e-6)  # its own reference
