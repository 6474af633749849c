"""Responses to chat-formatted queries: batched generation, decoding, refusal judging and, for harmful
queries, the judge model's verdict."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from dro_jax.common.errors import DroJaxError
from dro_jax.inference.batched import Batching, PassInfo, check_context, run_batched
from dro_jax.inference.chat import stop_token_ids
from dro_jax.inference.encoding import EncodedQueries
from dro_jax.inference.generate import generate_tokens
from dro_jax.inference.padding import PaddedBatch
from dro_jax.inference.refusal_score import Openings
from dro_jax.inference.sampling import SamplingConfig
from dro_jax.judging.declines import DeclineJudge
from dro_jax.judging.judges import RefusalJudge, SafetyJudge, StringJudge, is_harmful_compliance
from dro_jax.loading import LoadedModel
from dro_jax.models.inputs import ModelInputs
from dro_jax.parallel.sharding import on_mesh, shard_batch


@dataclasses.dataclass(frozen=True)
class Response:
    """One generated reply. `refusal`: the refusal judge's verdict (the string judge unless told otherwise);
    `unsafe`: the judge model's verdict, None where none was asked (no judge model, or a harmless query)."""

    query_index: int
    query: str
    sample: int
    text: str
    num_tokens: int
    refusal: bool
    token_ids: tuple[int, ...] = ()  # the generated tokens, stop token included (teacher-forced by the reply-drift measure)
    unsafe: bool | None = None

    @property
    def harmful_compliance(self) -> bool | None:
        """The paper's verdict on a reply to a harmful query (`is_harmful_compliance`); None without the judge
        model's verdict."""
        return None if self.unsafe is None else is_harmful_compliance(self.text, self.refusal, self.unsafe)

    @property
    def kind(self) -> str:
        """"decline", "apology" or "other", as the decline judge reads the reply (see `dro_jax.judging.declines`)."""
        return DECLINES.kind(self.text).value

    @property
    def complied(self) -> bool:
        """The paper's verdict where the judge model gave one, else simply not a refusal."""
        judged = self.harmful_compliance
        return not self.refusal if judged is None else judged


DECLINES = DeclineJudge()


def judge_harm(
    responses: Sequence[Response], judge_model: SafetyJudge | None, harmful: Sequence[bool] | None = None, progress: bool = False
) -> list[Response]:
    """`responses` with the judge model's verdict on those to harmful queries (`harmful`: per query index,
    default: every query is), in one batched pass; the others, and all of them without a judge, keep None."""
    judged = [i for i, r in enumerate(responses) if harmful is None or harmful[r.query_index]] if judge_model is not None else []
    out = list(responses)
    if judged:
        verdicts = judge_model.is_unsafe([out[i].query for i in judged], [out[i].text for i in judged], progress)
        for i, unsafe in zip(judged, verdicts):
            out[i] = dataclasses.replace(out[i], unsafe=bool(unsafe))
    return out


SENTENCE_ENDS = (".", "?", "!")


def ends_a_sentence(text: str) -> bool:
    """Whether `text` ends like a finished sentence; "2." ends a list number, not a sentence."""
    return text.endswith(SENTENCE_ENDS) and not (text.endswith(".") and text[-2:-1].isdigit())


def trim_incomplete_lines(text: str) -> str:
    """The reference's trimming: drop last lines that do not end a sentence until one does, always keeping the
    first line. A reply cut by the length limit so loses its unfinished last line (which the judge and the
    longest-by-words rule would otherwise read); the reference applies it to every reply, and so does this."""
    text = text.strip()
    while "\n" in text and not ends_a_sentence(text):
        text = text.rsplit("\n", 1)[0].strip()
    return text


@dataclasses.dataclass(frozen=True)
class Measuring:
    """What measuring a setting draws and scores: `num_samples` replies per query with `seed`, judged by `judge`
    (None: the packaged string judge), and the reply openings whose log-odds are scored."""

    num_samples: int = 1
    seed: int = 0
    judge: RefusalJudge | None = None
    openings: Openings = Openings()


@jax.jit
def sample_keys(seed: int, query_indices: np.ndarray, samples: np.ndarray) -> jax.Array:
    """One PRNG key per (query, sample): results do not depend on batch size or order. Compiled as one program
    (run eagerly, the key, the casts and each fold-in compile a program of their own)."""
    base = jax.random.key(seed)
    return jax.vmap(lambda q, s: jax.random.fold_in(jax.random.fold_in(base, q), s))(query_indices, samples)


def generate_responses(
    model: LoadedModel,
    encoded: EncodedQueries,
    sampling: SamplingConfig,
    num_samples: int = 1,
    seed: int = 0,
    judge: RefusalJudge | None = None,
    batching: Batching = Batching(),
    query_numbers: Sequence[int] | None = None,
) -> list[Response]:
    """`num_samples` responses per encoded query, ordered by query then sample, each judged by `judge`
    (default: the packaged string judge).

    With a mesh, each batch is split over its devices (one SPMD program) and
    the results are the same as on one device. `query_numbers` are the
    queries' numbers in a set shared out over several processes (default:
    their positions in `encoded`): sample keys use them, so a sample does not
    depend on the split (while `Response.query_index` stays the position in
    `encoded`).
    """
    if num_samples < 1:
        raise DroJaxError(f"num-samples must be at least 1, got {num_samples}")
    if encoded.queries is None:
        raise ValueError("generate_responses needs the query texts: encode them with encode_queries")
    judge = judge or StringJudge.default()
    info = PassInfo("generating", "response", sampling.max_new_tokens, "max-new-tokens")
    check_context(model, encoded, info)  # before the samples are laid out: errors name the query
    rows = [(q, s) for q in range(len(encoded)) for s in range(num_samples)]
    if not rows:
        return []
    prompts = encoded.select([q for q, _ in rows])
    query_of, sample_of = np.array(rows).T
    stops = stop_token_ids(model.tokenizer, model.source)
    numbers = np.arange(len(encoded)) if query_numbers is None else np.asarray(query_numbers)

    def step(params, inputs: ModelInputs, batch: PaddedBatch) -> tuple[jax.Array, jax.Array]:
        row_ids = np.where(batch.index >= 0, batch.index, 0)
        keys = shard_batch(sample_keys(seed, numbers[query_of[row_ids]], sample_of[row_ids]), batching.mesh)
        with on_mesh(batching.mesh):
            return generate_tokens(params, model.config, inputs, stops, sampling, keys, model.pad_id)

    tokens, lengths = run_batched(model, prompts, step, info, batching, serving=True)  # no weight gathers per new token
    replies = [tuple(int(t) for t in row_tokens[:length]) for row_tokens, length in zip(tokens, lengths)]
    texts = [model.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in replies]
    if sampling.trim_incomplete_lines:
        texts = [trim_incomplete_lines(text) for text in texts]
    refusals = judge.refusals(prompts.queries, texts, batching.progress)
    return [
        Response(q, encoded.queries[q], s, text, len(ids), bool(refused), ids)
        for (q, s), text, ids, refused in zip(rows, texts, replies, refusals)
    ]


def response_words(response: Response) -> int:
    """A response's length as the reference measures it to keep the longest: whitespace-separated words of the
    (trimmed) text, so a reply that rambles in few long tokens and one in many short ones compare as read."""
    return len(response.text.split())


def keep_longest(responses: Sequence[Response], count: int | None) -> list[Response]:
    """Each query's `count` longest responses by `response_words` (the reference keeps 20 of 25; ties keep the
    earlier sample); all of them when `count` is None."""
    if count is None:
        return list(responses)
    by_query: dict[int, list[Response]] = {}
    for response in responses:
        by_query.setdefault(response.query_index, []).append(response)
    kept = []
    for group in by_query.values():
        kept += sorted(group, key=lambda r: (-response_words(r), r.sample))[:count]
    return sorted(kept, key=lambda r: (r.query_index, r.sample))


def judged_responses(
    model: LoadedModel,
    encoded: EncodedQueries,
    sampling: SamplingConfig,
    measuring: Measuring,
    batching: Batching = Batching(),
    query_numbers: Sequence[int] | None = None,
    judge_model: SafetyJudge | None = None,
    longest: int | None = None,
) -> list[Response]:
    """Sample, then judge: `measuring.num_samples` responses per encoded query drawn with its seed and judged by
    its string judge, of which each query's `longest` (None: all) are kept, and those judged by `judge_model` too
    when given (for harmful queries). The anchor labels and every evaluation draw their responses here."""
    responses = generate_responses(
        model, encoded, sampling, measuring.num_samples, measuring.seed, measuring.judge, batching, query_numbers
    )
    return judge_harm(keep_longest(responses, longest), judge_model, progress=batching.progress)
