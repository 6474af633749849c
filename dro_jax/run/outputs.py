"""A run directory's files: where each output lives, and the outputs of a finished run loaded back."""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from dro_jax.anchors.collect import AnchorData
from dro_jax.anchors.space import AnchorSpace, report_path
from dro_jax.common.files import write_jsonl, write_text
from dro_jax.dro.train import TrainingFiles
from dro_jax.evaluation.evaluate import Evaluation
from dro_jax.evaluation.quality import ReplyReference
from dro_jax.evaluation.rows import EvalRow
from dro_jax.run.config import RunConfig


@dataclasses.dataclass(frozen=True)
class RunPaths(TrainingFiles):
    """Where each output of a run lives (the training files as `dro-jax train` writes them, plus the rest)."""

    config = property(lambda self: self.root / "config.json")
    anchors = property(lambda self: self.root / "anchors.safetensors")
    anchor_report = property(lambda self: report_path(self.anchors))
    anchor_data = property(lambda self: self.root / "anchor_data.npz")
    evaluation = property(lambda self: self.root / "evaluation.json")
    responses = property(lambda self: self.root / "responses.jsonl")


def write_evaluation(paths: RunPaths, evaluation: Evaluation) -> None:
    """responses.jsonl (one judged response per line) and evaluation.json (rows; per-query log-odds, coordinates
    and reference-reply NLLs; the reference replies)."""
    write_jsonl(paths.responses, (
        {"setting": outcome.setting, "dataset": outcome.dataset, **dataclasses.asdict(response), "kind": response.kind}
        for outcome in evaluation.outcomes for response in outcome.responses
    ))
    summary = {
        "rows": [dataclasses.asdict(row) for row in evaluation.rows],
        "outcomes": [
            {"setting": o.setting, "dataset": o.dataset, "log_odds": o.log_odds.tolist(),
             "coords": None if o.coords is None else o.coords.tolist(), "reply_nll": o.reply_nll.tolist()}
            for o in evaluation.outcomes
        ],
        "references": {
            name: {"token_ids": [list(ids) for ids in ref.token_ids], "nll": ref.nll.tolist()}
            for name, ref in evaluation.references.items()
        },
    }
    write_text(paths.evaluation, json.dumps(summary))


@dataclasses.dataclass(frozen=True, eq=False)
class RunOutputs:
    """What the stages of a finished run left on disk, loaded."""

    config: RunConfig
    paths: RunPaths
    anchors: AnchorSpace
    anchor_data: AnchorData
    rows: list[EvalRow]
    held_out: dict[tuple[str, str], np.ndarray]  # (setting, dataset) -> anchor coordinates of the held-out queries
    held_out_log_odds: dict[tuple[str, str], np.ndarray]  # (setting, dataset) -> their refusal log-odds
    references: dict[str, ReplyReference]  # dataset -> the replies its reply drift was measured on
    metrics: list[dict]

    @classmethod
    def load(cls, config: RunConfig, paths: RunPaths) -> "RunOutputs":
        evaluation = json.loads(paths.evaluation.read_text())
        return cls(
            config, paths, AnchorSpace.load(paths.anchors), AnchorData.load(paths.anchor_data),
            [EvalRow(**row) for row in evaluation["rows"]],
            {(o["setting"], o["dataset"]): np.asarray(o["coords"], np.float32) for o in evaluation["outcomes"]},
            {(o["setting"], o["dataset"]): np.asarray(o["log_odds"]) for o in evaluation["outcomes"]},
            {name: ReplyReference([tuple(ids) for ids in ref["token_ids"]], np.asarray(ref["nll"], np.float64))
             for name, ref in evaluation.get("references", {}).items()},
            [json.loads(line) for line in paths.metrics.read_text().splitlines() if line.strip()],
        )
