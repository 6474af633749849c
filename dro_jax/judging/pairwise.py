"""Pairwise helpfulness judges: which of two answers to an instruction is the more helpful.

A judge is anything with `first_preferred(instructions, first, second)`, the
probability that the first answer shown is the better one (the
`PairwiseJudge` protocol). `ModelPairwiseJudge` asks a chat model, with both
answers in one user message, and reads its verdict in one scoring pass, as
`dro_jax.judging.judges.ModelJudge` does: the probability of replying "A"
against "B", no generation. A judge may favour a position; callers that show
every pair in both orders (see `dro_jax.evaluation.helpfulness`) cancel that.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

import numpy as np

from dro_jax.common.errors import DroJaxError
from dro_jax.inference.batched import Batching
from dro_jax.inference.encoding import EncodedQueries
from dro_jax.inference.refusal_score import opening_log_probs
from dro_jax.judging.templates import JudgeTemplate
from dro_jax.loading import LoadedModel

FIELDS = ("instruction", "answer_a", "answer_b")
DEFAULT_TEMPLATE = (
    "Two assistants answered the same instruction. Decide which answer is more helpful: correct, complete, "
    "clear and on topic.\n\n"
    "Instruction:\n{instruction}\n\n"
    "Answer A:\n{answer_a}\n\n"
    "Answer B:\n{answer_b}\n\n"
    "Which answer is more helpful? Reply with one letter, A or B."
)


def check_template(template: str) -> str:
    """The template, if it follows `dro_jax.judging.templates` with every field (checked before a judge model
    is loaded for it)."""
    return JudgeTemplate(template, FIELDS, "a pairwise judge template").text


class PairwiseJudge(Protocol):
    """Compares two answers to each instruction."""

    def first_preferred(
        self, instructions: Sequence[str], first: Sequence[str], second: Sequence[str], progress: bool = False
    ) -> np.ndarray:
        """[n] probability that `first[i]` (shown as answer A) answers `instructions[i]` better than `second[i]`."""
        ...


@dataclasses.dataclass
class ModelPairwiseJudge:
    """A chat model as helpfulness judge: `template` (with {instruction}, {answer_a} and {answer_b}) is the
    user message, rendered through the judge's chat template with the generation prompt; the verdict is
    p(`first_word`) / (p(`first_word`) + p(`second_word`)) as the reply's opening."""

    model: LoadedModel
    template: str = DEFAULT_TEMPLATE
    first_word: str = "A"
    second_word: str = "B"
    batch_size: int = 16

    def __post_init__(self) -> None:
        check_template(self.template)

    def _encode(self, instruction: str, answer_a: str, answer_b: str) -> list[int]:
        values = {"instruction": instruction, "answer_a": answer_a, "answer_b": answer_b}
        text = JudgeTemplate(self.template, FIELDS).render(values)
        messages = [{"role": "user", "content": text}]
        encoded = self.model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(encoded["input_ids"])

    def first_preferred(
        self, instructions: Sequence[str], first: Sequence[str], second: Sequence[str], progress: bool = False
    ) -> np.ndarray:
        if not len(instructions) == len(first) == len(second):
            raise DroJaxError(f"{len(instructions)} instructions for {len(first)} and {len(second)} answers")
        prompts = [self._encode(i, a, b) for i, a, b in zip(instructions, first, second)]
        prompts = EncodedQueries(prompts, source=f"{self.model.source} as pairwise judge")
        log_probs = opening_log_probs(self.model, prompts, (self.first_word, self.second_word), Batching(self.batch_size, progress=progress))
        return 1.0 / (1.0 + np.exp(log_probs[:, 1] - log_probs[:, 0]))
