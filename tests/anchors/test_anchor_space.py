"""The anchor space: PCA axes completed to a basis, the probes, the anchor file and its report."""

import json

import numpy as np
import pytest

from dro_jax.anchors.collect import AnchorData
from dro_jax.anchors.space import AnchorSpace, FitConfig, check_label_variance, complete_basis, fit_pca, fit_probe, report_path, save_anchor_space
from dro_jax.common.errors import DroJaxError
from helpers import TINY_FIT


def test_basis_is_orthonormal_and_starts_with_the_pca_axes():
    states = np.random.default_rng(0).normal(size=(40, 16)).astype(np.float32) @ np.diag(np.linspace(3, 0.1, 16)).astype(np.float32)
    mean, components, explained = fit_pca(states, 4, seed=42)
    basis = complete_basis(components, seed=42)
    np.testing.assert_allclose(basis.T @ basis, np.eye(16), atol=1e-5)
    np.testing.assert_allclose(basis[:, :4], components, atol=1e-6)
    np.testing.assert_allclose(mean, states.mean(axis=0), atol=1e-5)
    centred = states.astype(np.float64) - states.mean(axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh(centred.T @ centred)
    np.testing.assert_allclose(np.abs(eigenvectors[:, ::-1][:, :4].T @ components), np.eye(4), atol=1e-4)  # the top axes, in order
    share = (centred @ components.astype(np.float64)).var(axis=0) / centred.var(axis=0).sum()  # each axis's share of the variance
    np.testing.assert_allclose(explained, share, rtol=1e-5)


def test_probe_recovers_a_known_direction():
    coords = np.random.default_rng(1).normal(size=(400, 4)).astype(np.float32)
    truth = np.array([2.0, 0.0, -1.0, 0.0], np.float32)
    targets = 1 / (1 + np.exp(-(coords @ truth)))
    fit = fit_probe(coords, targets, FitConfig(folds=5, learning_rate=1e-2))
    cosine = fit.probe.weight @ truth / np.linalg.norm(fit.probe.weight) / np.linalg.norm(truth)
    assert cosine > 0.99, cosine
    assert all(steps < TINY_FIT.max_steps for steps in fit.steps)  # early stopping ended every fold
    held_out_pred = fit.held_out_logits > 0
    assert np.mean(held_out_pred == (targets > 0.5)) > 0.9


def test_labels_without_variance_point_to_the_log_odds_label():
    with pytest.raises(DroJaxError, match="--label logodds"):
        check_label_variance(np.ones(10, np.float32), "sampled")


def test_anchor_file_and_report_round_trip(tiny_dro, tmp_path):
    anchors, report = tiny_dro.anchors, tiny_dro.report
    path = save_anchor_space(anchors, report, tmp_path / "a.safetensors")
    loaded = AnchorSpace.load(path)
    for name in ("mean", "basis"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(anchors, name), err_msg=name)
    for probe in ("refusal", "harmfulness"):
        np.testing.assert_array_equal(getattr(loaded, probe).weight, getattr(anchors, probe).weight, err_msg=probe)
        assert getattr(loaded, probe).bias == getattr(anchors, probe).bias, probe
    assert loaded.num_components == anchors.num_components == 4
    assert loaded.metadata == json.loads(json.dumps(anchors.metadata))
    assert loaded.metadata["report"] == json.loads(json.dumps(report))
    assert loaded.metadata["num_harmful"] == len(tiny_dro.pairs.harmful) and loaded.metadata["settings"] == ["none", "short"]
    assert set(report["refusal"]) >= {"accuracy", "auc", "bce"}
    assert report_path(path) == tmp_path / "a.report.json"
    assert json.loads(report_path(path).read_text()) == json.loads(json.dumps(report))


def test_anchor_data_file_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    data = AnchorData(rng.normal(size=(4, 3)).astype(np.float32), np.array([0.1, 0.9, 0.2, 0.8], np.float32),
                      np.array([1.0, -2.0, 0.5, -1.5], np.float32), np.array([0, 1, 0, 1], np.float32), ["none", "none", "short", "short"])
    data.save(tmp_path / "d.npz")
    loaded = AnchorData.load(tmp_path / "d.npz")
    for name in ("states", "compliance", "refusal_log_odds", "harmless"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(data, name), err_msg=name)
    assert loaded.settings == data.settings
    np.testing.assert_array_equal(loaded.rows_of("short"), [2, 3])
    assert len(loaded.rows_of("default")) == 0


def test_anchor_space_refuses_a_model_of_another_width(tiny_dro):
    with pytest.raises(DroJaxError, match="64 wide but the model's hidden size is 32"):
        tiny_dro.anchors.check_hidden_size(32)


def _anchor_data(seed: int = 0, queries: int = 60):
    """Synthetic anchor data: per query a random position; each prompt moves the queries by its own offset plus
    a per-query part, and the log-odds are a linear function of the coordinates plus a per-query term that no
    direction explains."""
    rng = np.random.default_rng(seed)
    hidden = 8
    base = rng.normal(size=(queries, hidden)) * np.linspace(3, 1, hidden)
    offsets = {"none": np.zeros(hidden), "a": rng.normal(size=hidden) + 0.5 * rng.normal(size=(queries, hidden)),
               "b": rng.normal(size=hidden) + 0.5 * rng.normal(size=(queries, hidden))}
    truth = rng.normal(size=hidden)
    query_term = 3 * rng.normal(size=queries)
    states, log_odds, names = [], [], []
    for name, offset in offsets.items():
        states.append(base + offset)
        log_odds.append((base + offset) @ truth + query_term)
        names += [name] * queries
    states, log_odds = np.concatenate(states).astype(np.float32), np.concatenate(log_odds).astype(np.float32)
    harmless = np.tile(np.arange(queries) % 2, 3).astype(np.float32)
    return AnchorData(states, 1 / (1 + np.exp(log_odds)), log_odds, harmless, names), truth


def test_contrasts_pair_each_prompted_row_with_the_same_query_without_a_prompt():
    data, _ = _anchor_data(queries=4)
    prompted, plain = data.contrasts()
    np.testing.assert_array_equal(prompted, np.arange(4, 12))
    np.testing.assert_array_equal(plain, np.tile(np.arange(4), 2))
    no_plain = AnchorData(data.states[4:], data.compliance[4:], data.refusal_log_odds[4:], data.harmless[4:], data.settings[4:])
    assert len(no_plain.contrasts()[0]) == 0
    with pytest.raises(DroJaxError, match="needs the anchor queries under 'none'"):
        no_plain.fit(FitConfig(num_components=4, folds=3, refusal_fit="contrast"), "logodds")


@pytest.mark.parametrize("refusal_fit", ["regression", "contrast"])
def test_least_squares_fits_recover_the_log_odds_direction(refusal_fit):
    """In the full space (k = hidden) both fits find the true direction of the log-odds: regression against
    the per-query term's noise, the contrast fit exactly, since the per-query term cancels in a contrast."""
    data, truth = _anchor_data()
    space, report = data.fit(FitConfig(num_components=8, folds=5, refusal_fit=refusal_fit), "logodds")
    direction = space.components @ space.refusal.weight  # back in the hidden space; points towards compliance
    cosine = -direction @ truth / np.linalg.norm(direction) / np.linalg.norm(truth)
    assert cosine > (0.999999 if refusal_fit == "contrast" else 0.9), cosine
    assert report["refusal"]["fit"] == refusal_fit and report["refusal"]["r2"] > (0.99 if refusal_fit == "contrast" else 0.5)
    logits = space.refusal.logits(space.leading(data.states))
    assert np.mean(logits) == pytest.approx(np.mean(-data.refusal_log_odds), abs=1e-2)  # the logit is in nats of compliance
    assert space.metadata["fit"]["refusal_fit"] == refusal_fit


def test_an_unknown_refusal_fit_is_an_error():
    with pytest.raises(DroJaxError, match="refusal fit must be one of logistic, regression, contrast"):
        FitConfig(refusal_fit="svm")
