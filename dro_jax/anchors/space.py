"""The anchor space: PCA of anchor representations, plus the refusal and harmfulness models.

Coordinates are z = (h - mean) @ basis, where the basis's first k columns are
the PCA axes and the rest complete them to an orthonormal basis of the hidden
space. Two linear models on z[:k] give the refusal direction (towards more
compliance) and the harmfulness direction (towards harmless).

Fitting follows the DRO reference: full-batch AdamW (lr 1e-4) with soft BCE
targets, early stopping when the held-out BCE has not improved by 1e-4 for 3
steps (at most 10,000), the best step's weights kept, and the weights of a
k-fold split (10 folds, shuffled from seed 42) averaged. Deliberate
differences: the weights start at zero rather than at a random init, so the
average over folds is not blurred by ten different starting points; and the
reference's gradient clipping is left out because it runs before the
gradients exist there, so it never acts.

`REFUSAL_FITS` names other ways to fit the refusal direction; each gives a
`LinearProbe` whose logit is a compliance logit, so the loss, the plots and
the movement tables use it unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dro_jax.common.errors import DroJaxError
from dro_jax.common.files import atomic_output, check_writable, write_text
from dro_jax.common.paths import as_path, local_file


@dataclasses.dataclass(frozen=True)
class LinearProbe:
    """logit = z[:k] @ weight + bias."""

    weight: np.ndarray
    bias: float

    def logits(self, coords: np.ndarray) -> np.ndarray:
        return coords[..., : len(self.weight)] @ self.weight + self.bias


REFUSAL_FITS = {
    "logistic": "the paper's: logistic regression on the soft compliance targets (AdamW, early stopping, k folds averaged)",
    "regression": "least squares of the refusal log-odds on z[:k], k folds averaged; the logit is minus the fitted log-odds. "
                  "The log-odds label's soft targets sigmoid(-log-odds) sit near 1 for almost every input of a model that "
                  "rarely refuses, which leaves the logistic fit little to follow; the log-odds themselves spread over nats",
    "contrast": "least squares, without intercept, of each query's log-odds change under a prompt against its coordinate "
                "change (that prompt minus no prompt), k folds averaged. A direction fitted across queries mostly encodes "
                "what the query is (harmful or not); within-query contrasts hold the query fixed and see only what prompts "
                "do to refusal, which is what a soft prompt can change",
}


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """How the anchor space is fitted; `refusal_fit` is one of `REFUSAL_FITS` (the harmfulness probe is always logistic)."""

    num_components: int = 4
    folds: int = 10
    seed: int = 42
    learning_rate: float = 1e-4
    weight_decay: float = 0.01  # torch.optim.AdamW's default, as in the reference
    min_improvement: float = 1e-4
    patience: int = 3
    max_steps: int = 10_000
    refusal_fit: str = "logistic"

    def __post_init__(self) -> None:
        if self.refusal_fit not in REFUSAL_FITS:
            raise DroJaxError(f"refusal fit must be one of {', '.join(REFUSAL_FITS)}, got {self.refusal_fit!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class AnchorSpace:
    mean: np.ndarray  # [hidden]
    basis: np.ndarray  # [hidden, hidden], orthonormal columns; the first k are the PCA axes
    num_components: int
    refusal: LinearProbe  # logit of compliance; its weight is the refusal direction (towards compliance)
    harmfulness: LinearProbe  # logit of harmlessness
    metadata: dict

    @property
    def components(self) -> np.ndarray:
        """[hidden, k] PCA axes."""
        return self.basis[:, : self.num_components]

    def check_hidden_size(self, hidden_size: int) -> None:
        """An anchor space fits only a model of its own width; a mismatch would fail deep inside the loss."""
        if self.mean.shape[0] != hidden_size:
            raise DroJaxError(f"the anchor space is {self.mean.shape[0]} wide but the model's hidden size is {hidden_size}")

    def leading(self, states: np.ndarray) -> np.ndarray:
        """The first k coordinates [n, k] (no full-basis product)."""
        return (np.asarray(states, np.float32) - self.mean) @ self.components

    def save(self, path: str | Path) -> Path:
        """One safetensors file: tensors, with the probes' biases and the metadata in its header."""
        from safetensors.numpy import save_file

        path = check_writable(path)
        tensors = {
            "mean": self.mean, "basis": self.basis,
            "refusal_weight": self.refusal.weight, "harmfulness_weight": self.harmfulness.weight,
        }
        header = {
            "num_components": str(self.num_components),
            "refusal_bias": repr(float(self.refusal.bias)),
            "harmfulness_bias": repr(float(self.harmfulness.bias)),
            "metadata": json.dumps(self.metadata),
        }
        with atomic_output(path) as tmp:
            save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(tmp), metadata=header)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "AnchorSpace":
        from safetensors import safe_open

        path = as_path(path)
        if not path.is_file():
            raise DroJaxError(f"{path}: no such anchor file")
        try:
            with local_file(path) as local, safe_open(str(local), framework="numpy") as handle:
                header = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
            return cls(
                tensors["mean"], tensors["basis"], int(header["num_components"]),
                LinearProbe(tensors["refusal_weight"], float(header["refusal_bias"])),
                LinearProbe(tensors["harmfulness_weight"], float(header["harmfulness_bias"])),
                json.loads(header["metadata"]),
            )
        except (KeyError, ValueError, OSError) as err:
            raise DroJaxError(f"{path}: not an anchor-space file written by dro-jax ({err})") from None


def fit_pca(states: np.ndarray, num_components: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean [h], components [h, k], explained variance ratio [k]) as sklearn computes them."""
    from sklearn.decomposition import PCA

    if not 1 <= num_components <= min(states.shape):
        raise DroJaxError(f"num-components must be between 1 and {min(states.shape)}, got {num_components}")
    pca = PCA(num_components, random_state=seed).fit(np.asarray(states, np.float64))
    return pca.mean_.astype(np.float32), pca.components_.T.astype(np.float32), pca.explained_variance_ratio_


def complete_basis(components: np.ndarray, seed: int) -> np.ndarray:
    """[h, h] orthonormal basis whose first k columns are `components` (one QR, float64)."""
    hidden, count = components.shape
    random = np.random.default_rng(seed).standard_normal((hidden, hidden - count))
    q, r = np.linalg.qr(np.concatenate([components.astype(np.float64), random], axis=1))
    q[:, :count] *= np.sign(np.diag(r)[:count])  # QR may flip a column; keep the PCA axes' signs
    return q.astype(np.float32)


def _bce(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
    losses = optax.sigmoid_binary_cross_entropy(logits, targets)
    return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


@functools.partial(jax.jit, static_argnames=("config",))
def _fit_folds(coords: jax.Array, targets: jax.Array, train_weights: jax.Array, held_out_weights: jax.Array, config: FitConfig):
    """Fits one probe per fold (vmapped); returns the best weights [F, k], biases [F] and steps [F]."""
    optimizer = optax.adamw(config.learning_rate, weight_decay=config.weight_decay)

    def loss(params, weights):
        weight, bias = params
        return _bce(coords @ weight + bias, targets, weights)

    def fit_one(train_w, held_out_w):
        params = (jnp.zeros(coords.shape[1], coords.dtype), jnp.zeros((), coords.dtype))

        def keep_going(state):
            step, _, _, _, _, misses = state
            return (step < config.max_steps) & (misses < config.patience)

        def update(state):
            step, params, opt_state, best, best_loss, misses = state
            grads = jax.grad(loss)(params, train_w)
            changes, opt_state = optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, changes)
            held_out = loss(params, held_out_w)
            improved = held_out < best_loss - config.min_improvement
            best = jax.tree.map(lambda new, old: jnp.where(improved, new, old), params, best)
            return (
                step + 1, params, opt_state, best,
                jnp.where(improved, held_out, best_loss), jnp.where(improved, 0, misses + 1),
            )

        state = (jnp.int32(0), params, optimizer.init(params), params, jnp.float32(jnp.inf), jnp.int32(0))
        step, _, _, best, _, _ = jax.lax.while_loop(keep_going, update, state)
        return best[0], best[1], step

    return jax.vmap(fit_one)(train_weights, held_out_weights)


@dataclasses.dataclass(frozen=True)
class ProbeFit:
    probe: LinearProbe  # the fold average
    held_out_logits: np.ndarray  # [n], each point scored by the fold model that did not see it
    steps: list[int]


def split_folds(count: int, config: FitConfig) -> list[np.ndarray]:
    """`config.folds` disjoint index sets covering 0 .. count - 1, shuffled from `config.seed`."""
    if config.folds < 1 or (config.folds > 1 and count < config.folds):
        raise DroJaxError(f"cannot split {count} points into {config.folds} folds")
    order = np.random.default_rng(config.seed).permutation(count)
    return [order[i * count // config.folds : (i + 1) * count // config.folds] for i in range(config.folds)]


def fit_probe(coords: np.ndarray, targets: np.ndarray, config: FitConfig = FitConfig()) -> ProbeFit:
    """Logistic regression with soft targets in [0, 1] on coords [n, k], k-fold averaged."""
    count = len(coords)
    folds = split_folds(count, config)
    train = np.ones((config.folds, count), np.float32)
    held_out = np.zeros((config.folds, count), np.float32)
    for number, rows in enumerate(folds):
        if config.folds > 1:
            train[number, rows] = 0
            held_out[number, rows] = 1
        else:  # no split: early stopping watches the training loss, as the reference does
            held_out[number] = 1
    weights, biases, steps = _fit_folds(
        jnp.asarray(coords, jnp.float32), jnp.asarray(targets, jnp.float32), jnp.asarray(train), jnp.asarray(held_out), config
    )
    weights, biases = np.asarray(weights), np.asarray(biases)
    held_out_logits = np.zeros(count, np.float32)
    for number, rows in enumerate(folds):
        held_out_logits[rows] = coords[rows] @ weights[number] + biases[number]
    probe = LinearProbe(weights.mean(axis=0), float(biases.mean()))
    return ProbeFit(probe, held_out_logits, [int(s) for s in np.asarray(steps)])


def fit_least_squares(
    inputs: np.ndarray, targets: np.ndarray, config: FitConfig, intercept: bool
) -> tuple[np.ndarray, float, np.ndarray]:
    """(weight [k], intercept, held-out predictions [n]) of targets ~ inputs @ weight (+ intercept), k-fold averaged
    (one fit on everything when `folds` is 1, whose predictions are then in-sample)."""
    inputs = np.asarray(inputs, np.float64)
    design = np.concatenate([inputs, np.ones((len(inputs), 1))], axis=1) if intercept else inputs
    folds = split_folds(len(inputs), config)
    solutions, held_out = [], np.zeros(len(inputs))
    for rows in folds:
        train = np.setdiff1d(np.arange(len(inputs)), rows) if config.folds > 1 else rows
        solution = np.linalg.lstsq(design[train], targets[train], rcond=None)[0]
        held_out[rows] = design[rows] @ solution
        solutions.append(solution)
    solution = np.mean(solutions, axis=0)
    return solution[: inputs.shape[1]], float(solution[-1]) if intercept else 0.0, held_out


def r_squared(predictions: np.ndarray, targets: np.ndarray) -> float:
    return float(1 - np.sum((targets - predictions) ** 2) / max(np.sum((targets - np.mean(targets)) ** 2), 1e-12))


def fit_refusal(
    coords: np.ndarray, compliance: np.ndarray, log_odds: np.ndarray | None, contrasts: tuple[np.ndarray, np.ndarray] | None,
    config: FitConfig,
) -> tuple[LinearProbe, dict]:
    """The refusal probe (compliance logit) by `config.refusal_fit`, and its report.

    `contrasts` = (rows under a prompt, the same queries' rows with no prompt), indices into `coords`.
    """
    if config.refusal_fit == "logistic":
        fit = fit_probe(coords, compliance, config)
        return fit.probe, {**probe_report(fit.held_out_logits, compliance), "steps": fit.steps}
    if log_odds is None:
        raise DroJaxError(f"the {config.refusal_fit} refusal fit needs the anchor inputs' refusal log-odds")
    log_odds = np.asarray(log_odds, np.float64)
    if config.refusal_fit == "regression":
        weight, intercept, held_out = fit_least_squares(coords, log_odds, config, intercept=True)
        probe = LinearProbe((-weight).astype(np.float32), -intercept)
        return probe, {**probe_report(-held_out, compliance), "r2": r_squared(held_out, log_odds)}
    if contrasts is None or not len(contrasts[0]):
        raise DroJaxError("the contrast refusal fit needs the anchor queries under 'none' and under at least one prompt")
    prompted, plain = contrasts
    change = coords[prompted] - coords[plain]
    weight, _, held_out = fit_least_squares(change, log_odds[prompted] - log_odds[plain], config, intercept=False)
    bias = float(np.mean(-log_odds) + np.mean(coords @ weight))  # puts the mean logit at the mean of -log-odds
    probe = LinearProbe((-weight).astype(np.float32), bias)
    in_sample = probe_report(probe.logits(coords), compliance)
    return probe, {**in_sample, "r2": r_squared(held_out, log_odds[prompted] - log_odds[plain]), "held_out": "r2 only"}


def probe_report(logits: np.ndarray, targets: np.ndarray) -> dict[str, float | None]:
    """Held-out BCE, accuracy and AUC (targets split at 0.5); AUC is None when one class is missing."""
    from sklearn.metrics import roc_auc_score

    positive = targets > 0.5
    probs = 1 / (1 + np.exp(-logits))
    bce = float(np.mean(np.logaddexp(0, logits) - targets * logits))
    both = 0 < positive.sum() < len(positive)
    return {
        "bce": bce,
        "accuracy": float(np.mean((probs > 0.5) == positive)),
        "auc": float(roc_auc_score(positive, logits)) if both else None,
    }


def check_label_variance(targets: np.ndarray, label: str) -> None:
    """A refusal model needs both refusals and compliance somewhere in the anchor data."""
    if np.ptp(targets) < 1e-6:
        hint = " (every query was complied with under every prompt); use the log-odds label instead (--label logodds)" if label == "sampled" else ""
        raise DroJaxError(f"the {label} refusal labels are all {float(targets[0]):.3g}: nothing to learn a refusal direction from{hint}")


def fit_anchor_space(
    states: np.ndarray,
    compliance: np.ndarray,
    harmless: np.ndarray,
    config: FitConfig = FitConfig(),
    label: str = "sampled",
    metadata: dict | None = None,
    log_odds: np.ndarray | None = None,
    contrasts: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[AnchorSpace, dict]:
    """The anchor space from anchor representations [n, h], compliance targets [n] and harmless flags [n]
    (and, for the refusal fits that need them, refusal log-odds [n] and within-query contrasts, see `fit_refusal`).

    Returns the space and a report: explained variance and held-out metrics of both probes.
    """
    states = np.asarray(states, np.float32)
    compliance = np.asarray(compliance, np.float32)
    harmless = np.asarray(harmless, np.float32)
    if not (len(states) == len(compliance) == len(harmless)):
        raise DroJaxError("states, compliance labels and harmless flags must have the same length")
    if not 0 < harmless.mean() < 1:
        raise DroJaxError("the anchor data needs both harmful and harmless queries")
    if config.refusal_fit == "logistic":
        check_label_variance(compliance, label)
    mean, components, explained = fit_pca(states, config.num_components, config.seed)
    basis = complete_basis(components, config.seed)
    coords = (states - mean) @ components
    refusal, refusal_report = fit_refusal(coords, compliance, log_odds, contrasts, config)
    harmfulness = fit_probe(coords, harmless, config)
    report = {
        "explained_variance_ratio": [float(v) for v in explained],
        "refusal": {"fit": config.refusal_fit, **refusal_report},
        "harmfulness": {**probe_report(harmfulness.held_out_logits, harmless), "steps": harmfulness.steps},
    }
    metadata = {**(metadata or {}), "label": label, "fit": dataclasses.asdict(config), "report": report}
    space = AnchorSpace(mean, basis, config.num_components, refusal, harmfulness.probe, metadata)
    return space, report


def report_path(anchor_file: str | Path) -> Path:
    """Where an anchor file's report goes: beside it, `NAME.report.json`."""
    return as_path(anchor_file).with_suffix(".report.json")


def save_anchor_space(space: AnchorSpace, report: dict, path: str | Path) -> Path:
    """Writes the anchor file and its report (explained variance, the probes' held-out metrics) beside it."""
    path = space.save(path)
    write_text(report_path(path), json.dumps(report, indent=2))
    return path
