"""What a training run trains: the starting prompt, the rows, the objective and the anchor space its loss reads.

`dro-jax run`, `dro-jax train` and the experiments build their task (DRO's
with `dro_jax.dro.training_set.dro_task`, the prompt-tuning baseline's from
`dro_jax.dro.prompt_tuning`) and hand it to `dro_jax.dro.train.train_soft_prompt`.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np

from dro_jax.anchors.space import AnchorSpace
from dro_jax.dro.loss import Objective
from dro_jax.models.inputs import SharedPrefix


class Batches(Protocol):
    """Training data: its size, the prefix all its inputs share, and the batch its objective's loss expects
    for given rows and row weights."""

    prefix: SharedPrefix | None

    def __len__(self) -> int: ...

    def rows(self, index: np.ndarray, weights: np.ndarray): ...


@dataclasses.dataclass(frozen=True, eq=False)
class TrainingTask:
    """`initial`: the soft prompt's starting values [rows, hidden]; `data`: the rows it learns from (a
    `TrainingSet` for DRO, a `ResponseSet` for the prompt-tuning baseline); `objective`: what is minimised (None:
    DRO as the training config weighs it, so that a DRO task follows the config it is trained with); `anchors`: the anchor space the DRO loss reads
    (None for the baseline)."""

    initial: np.ndarray
    data: Batches
    objective: Objective | None = None
    anchors: AnchorSpace | None = None

