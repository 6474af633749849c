"""The run's configuration (the quick default and the paper's preset), its report text and its plots."""

import argparse
import dataclasses
import json
import re

import matplotlib
import numpy as np
import pytest

from dro_jax.anchors.space import AnchorSpace, LinearProbe
from dro_jax.cli import run as run_command
from dro_jax.cli.main import main
from dro_jax.cli.run import add_commands, run_config
from dro_jax.common.errors import DroJaxError
from dro_jax.dro.loss import LossWeights
from dro_jax.evaluation.movement import movements
from dro_jax.evaluation.rows import EvalRow
from dro_jax.inference.sampling import REFERENCE_SAMPLING, SamplingConfig, SetSampling
from dro_jax.judging.judges import ReferenceStringJudge, StringJudge
from dro_jax.run import plots
from dro_jax.run.config import RunConfig
from dro_jax.run.report import LOSS_CURVES, results_text
from helpers import PNG_MAGIC

matplotlib.use("Agg")


def _cli_config(*argv):
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    return run_config(parser.parse_args(["run", *argv]))


def test_the_paper_preset_is_the_reference_protocol():
    paper = RunConfig.paper()
    assert (paper.label, paper.label_samples, paper.init_prompt) == ("sampled", 25, "default")
    assert (paper.epochs, paper.batch_size, paper.learning_rate, paper.checkpoint_every) == (40, 50, 1e-3, 10)
    assert (paper.eval_samples, paper.eval_keep_longest) == (25, 20)
    assert (paper.max_new_tokens_harmful, paper.max_new_tokens_harmless, paper.min_new_tokens) == (300, 200, 10)
    assert (paper.trim_incomplete_lines, paper.refusal_phrases) == (True, "paper")
    assert paper.loss_weights == (1.0, 1e-2, 1e-3, 0.0, 0.0) and paper.settings == ("none", "default", "short", "mistral")
    assert paper.label_keep_longest == 20  # the reference judges the 20 longest of its 25 samples per anchor input
    assert (paper.refusal_fit, paper.refusal_score) == ("logistic", "probe")
    train = paper.train_config()
    assert (train.epochs, train.batch_size, train.learning_rate, train.weight_decay, train.clip_norm) == (40, 50, 1e-3, 0.01, 1.0)
    assert train.loss_weights == LossWeights()
    reference = dict(greedy=False, temperature=1.0, top_p=0.9, top_k=50, min_new_tokens=10, trim_incomplete_lines=True)
    per_set = SetSampling(SamplingConfig(max_new_tokens=300, **reference), SamplingConfig(max_new_tokens=200, **reference))
    anchors = paper.anchor_config()
    assert (anchors.label, anchors.num_samples, anchors.sampling, anchors.fit.num_components, anchors.fit.folds) == (
        "sampled", 25, per_set, 4, 10)
    assert paper.evaluation_sampling() == (per_set, 25)
    assert isinstance(paper.string_judge(), ReferenceStringJudge)
    assert _cli_config("--paper") == paper
    assert _cli_config("--paper", "--epochs", "3", "--lr", "0.01") == RunConfig.paper(epochs=3, learning_rate=0.01)


def test_show_config_prints_the_references_numbers_without_a_model(monkeypatch, capsys):
    def no_model(*args, **kwargs):
        raise AssertionError("--show-config started the job")

    monkeypatch.setattr(run_command, "start_job", no_model)
    assert main(["run", "--paper", "--show-config"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["config"] == RunConfig.paper().to_dict()
    sampled = dict(greedy=False, temperature=1.0, top_k=50, top_p=0.9, min_new_tokens=10, trim_incomplete_lines=True)
    per_set = {"harmful": {**sampled, "max_new_tokens": 300}, "harmless": {**sampled, "max_new_tokens": 200}}
    assert shown["anchor_label"] == {"label": "sampled", "samples": 25, "keep_longest": 20, "longest_by": "words", "sampling": per_set}
    assert shown["evaluation"] == {"samples": 25, "keep_longest": 20, "longest_by": "words", "sampling": per_set}
    assert shown["judge"] == {"refusal_phrases": "paper", "rule": "ReferenceStringJudge"}
    assert main(["run", "--show-config", "--max-new-tokens", "32", "--max-new-tokens-harmless", "16"]) == 0
    quick = json.loads(capsys.readouterr().out)
    assert quick["evaluation"]["samples"] == 1 and quick["judge"]["refusal_phrases"] == "dro-jax"
    assert {k: v["max_new_tokens"] for k, v in quick["evaluation"]["sampling"].items()} == {"harmful": 32, "harmless": 16}
    assert quick["evaluation"]["sampling"]["harmful"]["greedy"] is True


def test_the_quick_default_and_its_overrides():
    quick = RunConfig()
    assert (quick.label, quick.epochs, quick.batch_size, quick.learning_rate, quick.eval_samples) == ("logodds", 8, 25, 5e-3, 0)
    assert (quick.refusal_fit, quick.refusal_score, quick.loss_weights) == ("logistic", "openings", (1.0, 1e-2, 1e-3, 0.0, 1.0))
    assert quick.train_config().refusal_score == "openings" and quick.train_config().openings == quick.reply_openings()
    assert quick.evaluation_sampling() == (SetSampling.same(SamplingConfig(max_new_tokens=64)), 1)
    assert (quick.min_new_tokens, quick.trim_incomplete_lines, quick.string_judge()) == (0, False, StringJudge.default())
    assert _cli_config("--refusal-phrases", "paper", "--min-new-tokens", "2", "--trim-incomplete-lines") == RunConfig(
        refusal_phrases="paper", min_new_tokens=2, trim_incomplete_lines=True)
    assert _cli_config("--paper", "--no-trim-incomplete-lines", "--refusal-phrases", "dro-jax") == RunConfig.paper(
        trim_incomplete_lines=False, refusal_phrases="dro-jax")
    with pytest.raises(DroJaxError, match="min-new-tokens must be between 0 and max-new-tokens \\(5\\), got 6"):
        RunConfig(max_new_tokens_harmless=5, min_new_tokens=6)
    with pytest.raises(DroJaxError, match="neither 'decline', 'paper', 'dro-jax' nor a phrase file"):
        RunConfig(refusal_phrases="no-such-file.json")
    assert _cli_config() == quick
    assert _cli_config("--settings", "none", "short", "--remat") == RunConfig(settings=("none", "short"), remat=True)
    assert _cli_config("--refusal-score", "head", "--refusal-fit", "contrast", "--loss-weights", "1", "0", "0", "2", "3") == RunConfig(
        refusal_score="head", refusal_fit="contrast", loss_weights=(1.0, 0.0, 0.0, 2.0, 3.0))
    assert _cli_config("--paper", "--refusal-score", "openings").refusal_score == "openings"  # an option overrides the preset
    assert RunConfig.from_dict(quick.to_dict()) == quick
    assert quick.train_config(epochs=7).epochs == 7 and quick.train_config().learning_rate == 5e-3
    assert REFERENCE_SAMPLING.greedy is False
    with pytest.raises(DroJaxError, match="one loss weight per term"):
        RunConfig(loss_weights=(1.0, 0.1))
    with pytest.raises(DroJaxError, match="refusal score must be one of"):
        RunConfig(refusal_score="logits")
    with pytest.raises(DroJaxError, match="refusal fit must be one of"):
        RunConfig(refusal_fit="svm")
    with pytest.raises(DroJaxError, match="unknown run settings: colour"):
        RunConfig.from_dict({**quick.to_dict(), "colour": "red"})


def _rows():
    def row(setting, dataset, refused, complied, log_odds, drift=0.0, degenerate=(0, 0, 0), declined=0, apologies=0, opening=0.0, surprise=0.0):
        return EvalRow(setting, dataset, 4, 4, refused, refused, complied, log_odds, 0.5, 0.0, drift, *degenerate, declined_responses=declined,
                       queries_any_decline=declined, apology_responses=apologies, reply_drift_opening=opening, reply_surprise=surprise)

    return [row("none", "harmful", 0, 4, -3.0), row("DRO", "harmful", 3, 1, 1.25, 0.5, (2, 1, 1), 2, 1, 0.9, 0.3), row("none", "harmless", 0, 4, -4.0)]


REPORT = {"explained_variance_ratio": [0.2, 0.1, 0.05, 0.01], "refusal": {"accuracy": 0.75, "auc": 0.9}, "harmfulness": {"accuracy": 0.5, "auc": None}}
METRICS = [{"step": 1, "loss": 0.7, "refusal": 0.69, "harmfulness": 0.69, "norm": 0.0}, {"step": 2, "loss": 0.5, "refusal": 0.49, "harmfulness": 0.6, "norm": 2.0}]


def test_results_text_says_what_was_run_and_shows_both_tables():
    text = results_text(RunConfig(), _rows(), [], REPORT, METRICS, {"anchors": {"seconds": 120.0, "compiles": 31, "compile_seconds": 40.4}, "train": {"seconds": 60.0}, "evaluate": {}})
    assert text.startswith("# DRO, openings objective (decline-replies), reply preservation on smollm2\n")
    assert RunConfig.paper().objective_name() == "DRO, paper objective"
    assert "PCA explained variance 0.200, 0.100, 0.050, 0.010" in text
    assert "refusal probe accuracy 0.750, auc 0.900; harmfulness probe accuracy 0.500." in text  # a missing AUC is left out
    assert ("init `short`, refusal score `openings`, refusal fit `logistic`, loss weights {'refusal': 1.0, 'harmfulness': 0.01, "
            "'norm': 0.001, 'preserve': 0.0, 'replies': 1.0}, 8 epochs at batch 25, lr 0.005, 2 steps; last step: loss 0.5000, refusal 0.4900, "
            "harmfulness 0.6000, norm 2.0000.") in text
    assert "greedy, one response per query, at most 64 new tokens, string judge `dro-jax`. " in text
    assert "| DRO | harmful (4) | 2/4 | 1/4 | 3/4 | 1/4 | n/a | n/a | +1.25 |" in text  # refusals: declines first
    assert "| DRO | harmful (4) | +0.500 | +0.900 | +0.300 | 2/4 (1 / 1) | +0.500 | +0.000 |" in text  # reply quality
    assert "Judged compliance: n/a, no judge model was given" in text
    assert "Stage times: anchors 2.0 min (31 XLA compiles, 40 s), train 1.0 min." in text
    assert "probe is nearly flat" not in text
    assert re.search(r"The decline judge, on \d+ held-out replies labelled by reading \(docs/judging.md\): precision 0\.\d\d "
                     r"\(\d+ of \d+\), recall 0\.\d\d", text)  # measured on the packaged labelled set, every run
    one_class = {**REPORT, "refusal": {"accuracy": 0.48, "auc": None}}  # every label on one side of 0.5
    flat = results_text(RunConfig(), _rows(), [], one_class, METRICS, {})
    assert flat.count("so the probe is nearly flat: its compliance logit, that logit's shift and the shifts along the refusal "
                      "direction read about 0 by construction") == 2  # beside both tables that show them
    judged_rows = [dataclasses.replace(r, harmful_compliant_responses=1, queries_any_harmful_compliance=1) if r.dataset == "harmful" else r
                   for r in _rows()]
    judged = results_text(RunConfig(judge_model="guard"), judged_rows, [], REPORT, METRICS, {})
    assert "| DRO | harmful (4) | 2/4 | 1/4 | 3/4 | 1/4 | 1/4 | 1/4 | +1.25 |" in judged
    assert "| none | harmless (4) | 0/4 | 0/4 | 0/4 | 4/4 | n/a | n/a |" in judged
    assert "string judge `dro-jax` and judge model guard (harmful set)" in judged and "the judge model guard calls it unsafe" in judged
    paper = results_text(RunConfig.paper(), _rows(), [], REPORT, METRICS, {})
    assert ("25 sampled responses per query, the 20 longest (by words) judged, at most 300 (harmful) / 200 (harmless) new tokens, "
            "at least 10, incomplete last lines trimmed, string judge `paper`") in paper and "Stage times: n/a." in paper


@pytest.fixture()
def figures(monkeypatch):
    """The figures the plot functions make, kept open for inspection (their files are still written)."""
    made = []
    save = plots._save

    def keep(figure, path):
        made.append(figure)
        return save(figure, path)

    monkeypatch.setattr(plots, "_save", keep)
    return made


def test_loss_plot_has_one_panel_per_named_curve(tmp_path, figures):
    path = plots.loss_plot(tmp_path / "loss.png", METRICS, LOSS_CURVES, "training")
    assert path.read_bytes().startswith(PNG_MAGIC)
    axes = figures[0].axes
    assert [a.get_title() for a in axes] == ["total loss", "refusal term", "harmfulness term", "norm term"]  # curves it recorded
    np.testing.assert_array_equal(axes[3].lines[0].get_ydata(), [0.0, 2.0])
    plots.loss_plot(tmp_path / "pt.png", [{"step": 1, "loss": 1.0, "likelihood": 1.0}], LOSS_CURVES, "baseline")
    assert [a.get_title() for a in figures[1].axes] == ["total loss"]  # curves a run did not record are left out


def test_refusal_plot_shows_declines_apologies_log_odds_and_reply_quality(tmp_path, figures):
    plots.refusal_plot(tmp_path / "refusals.png", _rows(), "held out")
    declines, log_odds, drift, degenerate = figures[0].axes
    harmful_declined, harmful_apologies, harmless_declined, _ = declines.containers
    np.testing.assert_allclose([bar.get_height() for bar in harmful_declined], [0.0, 0.5])  # declined: none 0/4, DRO 2/4
    np.testing.assert_allclose([bar.get_height() for bar in harmful_apologies], [0.0, 0.25])  # apology only: DRO 1/4 ...
    np.testing.assert_allclose([bar.get_y() for bar in harmful_apologies], [0.0, 0.5])  # ... stacked on its declines
    assert harmless_declined[0].get_height() == 0.0 and np.isnan(harmless_declined[1].get_height())  # DRO was not run on the harmless set
    assert [t.get_text() for t in declines.get_xticklabels()] == ["none", "DRO"]
    np.testing.assert_allclose([bar.get_height() for bar in log_odds.containers[0]], [-3.0, 1.25])
    np.testing.assert_allclose([bar.get_height() for bar in drift.containers[0]], [0.0, 0.9])  # first 8 tokens, harmful set
    np.testing.assert_allclose(drift.lines[0].get_ydata(), [0.0, 0.5])  # the whole reply, as dots
    np.testing.assert_allclose([bar.get_height() for bar in degenerate.containers[0]], [0.0, 0.5])  # 2 of 4 DRO replies
    legend = figures[0].legends[0]
    assert [t.get_text() for t in legend.get_texts()][0].startswith("harmful queries")  # one legend, above the panels


def test_tradeoff_plot_marks_each_seed_and_the_mean(tmp_path, figures):
    points = {"a": [(0.1, 2, 0), (0.3, 4, 2)], "b": [(0.5, 0, 1)]}
    plots.tradeoff_plot(tmp_path / "tradeoff.png", points, {"none": (0.0, 0, 0), "short": (0.05, 1, 0)}, "t")
    drift, refused = figures[0].axes
    for axis, expected in ((drift, {"a": [0.2, 3.0], "b": [0.5, 0.0]}), (refused, {"a": [1.0, 3.0], "b": [1.0, 0.0]})):
        means = {line.get_label(): line.get_xydata()[0].tolist() for line in axis.lines if line.get_label() in ("a", "b")}
        assert means == expected
        assert [len(c.get_offsets()) for c in axis.collections] == [2, 1]  # one small marker per seed


def test_anchor_space_and_movement_plots(tmp_path, figures):
    anchors = AnchorSpace(np.zeros(3, np.float32), np.eye(3, dtype=np.float32), 3,
                          LinearProbe(np.array([1.0, 0.5, 0.0], np.float32), 0.0), LinearProbe(np.array([0.0, 1.0, 0.0], np.float32), 0.0),
                          {"report": REPORT})
    rng = np.random.default_rng(0)
    coords = rng.normal(size=(8, 3)).astype(np.float32)
    held_out = {("none", "harmful"): coords[:2], ("DRO", "harmful"): coords[:2] + 1.0}
    plots.anchor_space_plot(tmp_path / "space.png", anchors, coords, ["none"] * 4 + ["short"] * 4, np.array([0, 1] * 4), held_out, "space")
    axis = figures[0].axes[0]
    assert axis.get_xlabel() == "PC 1 (20% of variance)"
    assert len(axis.collections) == 4  # harmful and harmless points of each setting
    arrows = [a for a in axis.texts if a.arrow_patch is not None]
    assert len(arrows) == 1  # one arrow: DRO against no prompt
    np.testing.assert_allclose(arrows[0].xy, (coords[:2] + 1.0).mean(axis=0)[:2])
    plots.movement_plot(tmp_path / "movement.png", {"held out": movements(anchors, held_out)}, "movement")
    assert (tmp_path / "movement.png").read_bytes().startswith(PNG_MAGIC)
    assert len([a for a in figures[1].axes[0].texts if a.arrow_patch is not None]) == 1


def test_the_report_is_written_from_a_source_tree_never_installed(monkeypatch):
    """`python -m dro_jax.cli run` from a checkout has no distribution metadata: the report says so and goes on."""
    import importlib.metadata

    from dro_jax.run.report import environment

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert environment()["dro_jax"] == "not installed"
