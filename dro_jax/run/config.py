"""What `dro-jax run` does, in one dataclass: the quick default for 2 CPU cores and the paper's preset."""

from __future__ import annotations

import dataclasses
from typing import Any

from dro_jax.anchors.collect import AnchorConfig
from dro_jax.anchors.space import FitConfig
from dro_jax.common.errors import DroJaxError
from dro_jax.data.queries import QueryPairs, read_queries
from dro_jax.data.suffixes import QuerySuffix
from dro_jax.dro.loss import LossWeights, check_refusal_score
from dro_jax.dro.train import TrainConfig
from dro_jax.evaluation.evaluate import EvalConfig
from dro_jax.inference.refusal_score import Openings
from dro_jax.inference.sampling import REFERENCE_SAMPLING, SamplingConfig, SetSampling
from dro_jax.inference.settings import NO_PROMPT, PROMPT_SETTINGS
from dro_jax.judging.judges import RefusalJudge, StringJudge, check_judge_template
from dro_jax.loading.registry import DEFAULT_MODEL
from dro_jax.run.stages import text_digest

PAPER_TRAINING = TrainConfig()  # the reference's schedule, written once in TrainConfig's defaults

HARMFUL_SET = "harmful"  # the held-out set (of `QuerySets.test`) that the judge model judges


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Every input of the main job; `config.json` in a run directory is this, as JSON.

    The defaults make the whole job fit in minutes on 2 CPU cores with
    SmolLM2-135M: the generation-free log-odds label, the `openings` refusal
    score (the loss reads the refusal log-odds of the reply openings instead
    of the anchor-space probe, which does not move this model's behaviour;
    the objective chosen on the validation sets by `experiments/objectives.py`),
    8 epochs at batch 25 (64 steps) with a 5x larger learning rate than the
    paper, greedy evaluation with 64 new tokens on the test sets, the
    `dro-jax` string judge beside the decline judge's counts.
    `paper()` gives the paper's protocol for machines with accelerators.

    The generation rules (`max_new_tokens_*`, `min_new_tokens`,
    `trim_incomplete_lines`) apply to both stages that generate: the sampled
    label of the anchor stage and the evaluation; `refusal_phrases` (`decline`,
    `paper`, `dro-jax` or a JSON file) judges both.
    """

    model: str = DEFAULT_MODEL
    dtype: str = "float32"
    harmful_train: str = "harmful_train"
    harmless_train: str = "harmless_train"
    harmful_test: str = "harmful_test"
    harmless_test: str = "harmless_test"
    field: str | None = None
    settings: tuple[str, ...] = PROMPT_SETTINGS
    label: str = "logodds"
    label_samples: int = 5
    label_keep_longest: int | None = None  # the longest N sampled responses per anchor input, by words, are judged (None: all)
    # Reply openings of the log-odds score: a name of OPENING_SETS or a JSON file (None: `apologies`). The default,
    # whole short declines with the replies term weighted 1 (`loss_weights`), was chosen on the validation sets by
    # experiments/objectives.py (variant decline-replies+replies).
    openings: str | None = "decline-replies"
    num_components: int = 4
    folds: int = 10
    refusal_fit: str = "logistic"  # see dro_jax.anchors.space.REFUSAL_FITS
    init_prompt: str = "short"
    init_random: int | None = None  # start from this many random vocabulary embeddings instead (base states: no prompt)
    epochs: int = 8
    batch_size: int = 25
    learning_rate: float = 5e-3
    seed: int = 42
    loss_weights: tuple[float, ...] = LossWeights(replies=1.0).as_tuple()  # one per term, in the order of LossWeights.terms()
    refusal_score: str = "openings"  # see dro_jax.dro.loss.REFUSAL_SCORES
    checkpoint_every: int = 8
    eval_samples: int = 0  # 0: one greedy response per query
    eval_keep_longest: int | None = None  # the longest N responses per test query, by words, are judged (None: all)
    max_new_tokens_harmful: int = 64
    max_new_tokens_harmless: int = 64
    min_new_tokens: int = 0
    trim_incomplete_lines: bool = False  # see dro_jax.judging.responses.trim_incomplete_lines
    refusal_phrases: str = "dro-jax"  # see dro_jax.judging.judges.StringJudge.load
    eval_batch_size: int = 32
    remat: bool = False
    microbatch: int | None = None  # rows through the model at a time in training (see dro_jax.dro.microbatch)
    # A safety classifier (LlamaGuard style) for the paper's rule on harmful queries, in the sampled label and the
    # evaluation (see dro_jax.evaluation.measure); None: the string judge alone. The template is its prompt text.
    judge_model: str | None = None
    judge_template: str | None = None

    @classmethod
    def paper(cls, **overrides: Any) -> "RunConfig":
        """The reference protocol: sampled labels (25 per input, the 20 longest by words judged), the paper's loss (logistic refusal
        probe, its three terms and weights), default-prompt init, 40 epochs at batch 50, lr 1e-3, 25 sampled
        responses per test query of which the 20 longest by words are judged; both stages decode with the
        reference's sampling, 10 to 300 new tokens for harmful queries and 10 to 200 for harmless ones, incomplete
        last lines trimmed, and judge with its string rule (`paper`)."""
        preset = dict(
            label="sampled", label_samples=25, label_keep_longest=20, refusal_fit="logistic", refusal_score="probe", loss_weights=LossWeights().as_tuple(),
            init_prompt="default", epochs=PAPER_TRAINING.epochs, batch_size=PAPER_TRAINING.batch_size, learning_rate=PAPER_TRAINING.learning_rate,
            checkpoint_every=10, eval_samples=25, eval_keep_longest=20, max_new_tokens_harmful=300, max_new_tokens_harmless=200,
            min_new_tokens=10, trim_incomplete_lines=True, refusal_phrases="paper", openings=None,
        )
        return cls(**{**preset, **overrides})

    def __post_init__(self) -> None:
        for name in ("label_samples", "num_components", "folds", "epochs", "batch_size", "checkpoint_every", "max_new_tokens_harmful",
                     "max_new_tokens_harmless", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise DroJaxError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.init_random is not None and self.init_random < 1:
            raise DroJaxError(f"init-random must be at least 1 row, got {self.init_random}")
        if self.eval_samples < 0:
            raise DroJaxError(f"eval-samples must be 0 (greedy) or more, got {self.eval_samples}")
        if self.eval_keep_longest is not None and not 1 <= self.eval_keep_longest <= max(self.eval_samples, 1):
            raise DroJaxError(f"cannot keep the {self.eval_keep_longest} longest of {self.eval_samples} responses per query")
        if not self.learning_rate > 0:
            raise DroJaxError(f"the learning rate must be positive, got {self.learning_rate}")
        if self.judge_template is not None and self.judge_model is None:
            raise DroJaxError("a judge template needs a judge model")
        check_judge_template(self.judge_template)
        LossWeights.from_sequence(self.loss_weights)
        check_refusal_score(self.refusal_score)
        FitConfig(refusal_fit=self.refusal_fit)
        self.decoding(REFERENCE_SAMPLING)  # min-new-tokens against both lengths
        self.string_judge()
        self.anchor_config()  # its own checks, and the openings file read

    def anchor_config(self) -> AnchorConfig:
        """How the anchor stage labels the anchor inputs and fits the space (the probes' folds are always seeded 42)."""
        fit = FitConfig(num_components=self.num_components, folds=self.folds, refusal_fit=self.refusal_fit)
        return AnchorConfig(
            settings=self.settings, label=self.label, num_samples=self.label_samples, keep_longest=self.label_keep_longest,
            sampling=self.decoding(REFERENCE_SAMPLING),
            seed=self.seed, fit=fit, openings=self.reply_openings(),
        )

    def decoding(self, base: SamplingConfig) -> SetSampling:
        """`base` (how tokens are picked) with this run's generation rules, per kind of query."""
        rules = dict(min_new_tokens=self.min_new_tokens, trim_incomplete_lines=self.trim_incomplete_lines)
        return SetSampling(
            dataclasses.replace(base, max_new_tokens=self.max_new_tokens_harmful, **rules),
            dataclasses.replace(base, max_new_tokens=self.max_new_tokens_harmless, **rules),
        )

    def string_judge(self) -> RefusalJudge:
        """The judge of sampled labels and of the evaluation's responses."""
        return StringJudge.load(self.refusal_phrases)

    @property
    def judges_labels(self) -> bool:
        """Whether the judge model takes part in the anchor stage: it judges the sampled label only."""
        return self.judge_model is not None and self.label == "sampled"

    def judge_settings(self) -> dict:
        """The judge model and template, as stage inputs (empty without one, so that runs without a judge keep their keys)."""
        return {} if self.judge_model is None else {"judge_model": self.judge_model, "judge_template": self.judge_template}

    @property
    def base_prompt(self) -> str:
        """The setting whose states the refusal and harmfulness shifts start from: the init prompt's, or no prompt
        for random rows."""
        return NO_PROMPT if self.init_random else self.init_prompt

    def objective_name(self) -> str:
        """What the training stage optimised, in words for reports: "DRO, paper objective" for the paper's probe
        score, else the refusal score with its openings and any reply term ("DRO, openings objective (declines),
        reply preservation")."""
        if self.refusal_score == "probe":
            name = "DRO, paper objective"
        else:
            name = f"DRO, {self.refusal_score} objective"
            if self.refusal_score == "openings":
                name += f" ({self.openings or 'apologies'})"
        if LossWeights.from_sequence(self.loss_weights).replies > 0:
            name += ", reply preservation"
        return name

    def reply_openings(self) -> Openings:
        """The refusal and compliant reply openings of the log-odds score (labels and evaluation)."""
        return Openings.load(self.openings)

    def train_config(self, **overrides: Any) -> TrainConfig:
        """The training stage's schedule (an experiment may override e.g. `epochs`)."""
        settings = dict(
            epochs=self.epochs, batch_size=self.batch_size, learning_rate=self.learning_rate, seed=self.seed,
            loss_weights=LossWeights.from_sequence(self.loss_weights), refusal_score=self.refusal_score, openings=self.reply_openings(),
            checkpoint_every=self.checkpoint_every, remat=self.remat, microbatch=self.microbatch,
        )
        return TrainConfig(**{**settings, **overrides})

    def evaluation_sampling(self) -> tuple[SetSampling, int]:
        """(decoding per held-out set, responses per test query): one greedy response, or `eval_samples` with the
        reference's sampling."""
        if self.eval_samples == 0:
            return self.decoding(SamplingConfig()), 1
        return self.decoding(REFERENCE_SAMPLING), self.eval_samples

    def evaluation(self, suffix: QuerySuffix | None = None) -> EvalConfig:
        """How the held-out sets are measured (the main job's evaluation stage and `dro-jax evaluate`): their
        decoding and responses per query, the longest judged, the string judge and reply openings; a judge model
        judges the harmful set; `suffix`: every query read with it (`dro-jax evaluate --suffix-file`)."""
        sampling, num_samples = self.evaluation_sampling()
        return EvalConfig(
            sampling.by_name(), num_samples, self.eval_keep_longest, self.seed, self.string_judge(), self.reply_openings(),
            harmful_sets=(HARMFUL_SET,), suffix=suffix,
        )

    def resolved(self) -> dict:
        """What the run will do, as `--show-config` prints it: the settings, and the decoding and judging of each
        stage that generates, as they follow from them."""
        evaluation, samples = self.evaluation_sampling()
        label = self.anchor_config()
        return {
            "config": self.to_dict(),
            "anchor_label": {
                "label": self.label, "samples": label.num_samples if self.label == "sampled" else 0,
                "keep_longest": label.keep_longest if self.label == "sampled" else None, "longest_by": "words",
                "sampling": json_ready({k: dataclasses.asdict(v) for k, v in label.sampling.by_name().items()}),
            },
            "evaluation": {
                "samples": samples, "keep_longest": self.eval_keep_longest, "longest_by": "words",
                "sampling": json_ready({k: dataclasses.asdict(v) for k, v in evaluation.by_name().items()}),
            },
            "judge": {"refusal_phrases": self.refusal_phrases, "rule": type(self.string_judge()).__name__},
        }

    def to_dict(self) -> dict:
        return json_ready(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise DroJaxError(f"unknown run settings: {', '.join(unknown)}")
        tuples = {k: tuple(v) for k, v in data.items() if isinstance(v, list)}
        return cls(**{**data, **tuples})


def json_ready(value: Any) -> Any:
    """Tuples as lists, so a config compares equal to itself after a JSON round trip."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


@dataclasses.dataclass(frozen=True)
class QuerySets:
    """The queries a run reads: the paired training set and the two held-out sets."""

    train: QueryPairs
    harmful_test: list[str]
    harmless_test: list[str]

    @classmethod
    def read(cls, config: RunConfig) -> "QuerySets":
        return cls(
            QueryPairs.read(config.harmful_train, config.harmless_train, config.field),
            read_queries(config.harmful_test, config.field), read_queries(config.harmless_test, config.field),
        )

    @property
    def test(self) -> dict[str, list[str]]:
        """The held-out sets by the names the results use."""
        return {HARMFUL_SET: self.harmful_test, "harmless": self.harmless_test}

    def digests(self) -> dict[str, str]:
        """Content hashes of the four sets, so that an edited file counts as a new stage input."""
        sets = {"harmful_train": self.train.harmful, "harmless_train": self.train.harmless,
                "harmful_test": self.harmful_test, "harmless_test": self.harmless_test}
        return {name: text_digest(list(queries)) for name, queries in sets.items()}
