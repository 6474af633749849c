"""The shared-prefix path gives what running every input whole gives: representations, refusal log-odds,
greedy tokens, the DRO loss and its soft-prompt gradient, for every model family, several prefix lengths,
a soft prompt in the prefix or in the rows, and on 1 and 4 devices."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import HARMFUL, HARMLESS, QUIET, TINY_OPENINGS
from processes import device_env

from dro_jax.data.queries import QueryPairs
from dro_jax.dro.loss import dro_loss
from dro_jax.dro.soft_prompt import initial_soft_prompt
from dro_jax.dro.train import frozen_inputs
from dro_jax.dro.training_set import prepare_training_set
import dro_jax.inference.batched as batched
from dro_jax.inference.batched import Batching
from dro_jax.inference.encoding import encode_queries
from dro_jax.inference.padding import shared_prefix_length
from dro_jax.inference.refusal_score import score_refusal
from dro_jax.inference.represent import represent_tokens
from dro_jax.inference.sampling import SamplingConfig
from dro_jax.inference.settings import PromptSetting
from dro_jax.judging.responses import generate_responses
from dro_jax.loading import load_model
from dro_jax.parity.torch_dro import whole_sequences

pytestmark = pytest.mark.heavy  # among the longest files: started first (tests/conftest.py)

QUERIES = HARMFUL[:4] + HARMLESS[:3]  # lengths differ: left padding in the batch
BATCH = 8  # one batch, one compiled shape per pass
GREEDY = SamplingConfig(max_new_tokens=6)
# The families whose attention the shared prefix meets differently: llama3 rope scaling (positions go on after the
# prefix), a sliding window shorter than the prefix, biased key/value projections (the cached keys hold the bias).
# Grouped-query attention is in all three; the other tiny configs differ only in ways the prefix never sees.
PREFIX_FAMILIES = ("llama-tied-llama3-rope", "mistral", "qwen2")
# A template that puts the query before the system text: the soft prompt then lands in each row's own part.
QUERY_FIRST = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ 'Q: ' + message['content'] + '\\n' }}{% endif %}{% endfor %}"
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ 'S: ' + message['content'] + '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'A:' }}{% endif %}"
)


def _passes(model, encoded, generate=True):
    scores = score_refusal(model, encoded, TINY_OPENINGS, batching=Batching(BATCH, progress=False))
    passes = {
        "states": represent_tokens(model, encoded, batching=Batching(BATCH, progress=False)),
        "score_states": scores.states,
        "log_odds": scores.log_odds,
    }
    if generate:
        passes["tokens"] = [r.text for r in generate_responses(model, encoded, GREEDY, batching=Batching(BATCH, progress=False))]
    return passes


def _assert_same(shared, whole):
    np.testing.assert_allclose(shared["states"], whole["states"], atol=2e-5, rtol=0)
    np.testing.assert_allclose(shared["score_states"], whole["score_states"], atol=2e-5, rtol=0)
    np.testing.assert_allclose(shared["log_odds"], whole["log_odds"], atol=1e-4, rtol=0)
    if "tokens" in shared:
        assert shared["tokens"] == whole["tokens"]


@pytest.mark.parametrize("name", PREFIX_FAMILIES)
def test_every_pass_equals_the_whole_inputs(tiny_model_dir, name):
    model = load_model(tiny_model_dir(name)[0], progress=False)
    soft = PromptSetting.soft("soft", initial_soft_prompt(model.params, model.tokenizer, "short") + 0.01)
    for setting in ("short", soft):
        encoded = encode_queries(model, QUERIES, setting)
        assert encoded.prefix_length == shared_prefix_length(encoded.sequences) > 10
        assert encoded.soft_in_prefix == (setting is soft)
        whole = _passes(model, dataclasses.replace(encoded, prefix_length=0))
        _assert_same(_passes(model, encoded), whole)
        # A shorter shared part (for the soft prompt: one that ends before it, which leaves it in the rows).
        shorter = encoded.soft_starts[0] if setting is soft else encoded.prefix_length // 2
        _assert_same(_passes(model, dataclasses.replace(encoded, prefix_length=shorter), generate=False), whole)


def test_a_soft_prompt_in_the_rows(tiny_model_dir):
    """When per-query text comes before the system slot, the shared part ends there and the soft prompt is
    spliced into each row at its own offset."""
    model = load_model(tiny_model_dir("llama")[0], progress=False)
    model.tokenizer.chat_template = QUERY_FIRST
    soft = PromptSetting.soft("soft", initial_soft_prompt(model.params, model.tokenizer, "short") + 0.01)
    encoded = encode_queries(model, QUERIES, soft)
    assert 0 < encoded.prefix_length < min(encoded.soft_starts) and not encoded.soft_in_prefix
    assert len(set(encoded.soft_starts)) > 1  # a different offset in each row
    _assert_same(_passes(model, encoded), _passes(model, dataclasses.replace(encoded, prefix_length=0)))


def test_the_prefix_runs_once_for_every_batch_of_a_pass(tiny_model_dir, monkeypatch):
    """Four batches of a pass attend to one computation of the prefix, and give what the whole inputs give."""
    model = load_model(tiny_model_dir("llama")[0], progress=False)
    encoded = encode_queries(model, QUERIES, "short")
    calls = []
    real = batched._prefix_cache
    monkeypatch.setattr(batched, "_prefix_cache", lambda *args, **kwargs: calls.append(args[2]) or real(*args, **kwargs))
    small = Batching(2, progress=False)
    states = represent_tokens(model, encoded, small)
    assert len(calls) == 1 and int(calls[0].length) == encoded.prefix_length
    whole = represent_tokens(model, dataclasses.replace(encoded, prefix_length=0), small)
    assert len(calls) == 1  # nothing shared: nothing run ahead
    np.testing.assert_allclose(states, whole, atol=2e-5, rtol=0)


def _loss_and_gradient(model, data, anchors, prompt, shared: bool):
    rows = data.rows(np.arange(len(data)), np.ones(len(data), np.float32))
    if shared:
        batch, prefix = rows, data.prefix
    else:  # the same inputs whole, [prefix][padding][row], with no shared part
        ids, mask, offsets = whole_sequences(rows, data.prefix)
        batch, prefix = rows._replace(token_ids=ids, attention_mask=mask, soft_offsets=offsets), None
    batch = jax.tree.map(jnp.asarray, batch)
    frozen = frozen_inputs(model, anchors, prefix)
    (loss, metrics), grad = jax.value_and_grad(lambda p: dro_loss(p, batch, frozen, model.config), has_aux=True)(prompt)
    return float(loss), {k: float(v) for k, v in metrics.items()}, np.asarray(grad)


@pytest.mark.parametrize("name", PREFIX_FAMILIES)
def test_dro_loss_and_gradient_equal_the_whole_inputs(tiny_model_dir, tiny_dro, name):
    model = load_model(tiny_model_dir(name)[0], progress=False)
    initial = initial_soft_prompt(model.params, model.tokenizer, "short")
    data = prepare_training_set(model, QueryPairs(HARMFUL, HARMLESS), "short", len(initial), batching=QUIET)
    assert data.prefix is not None and int(data.prefix.soft_offset) >= 0
    prompt = jnp.asarray(initial) + 0.05 * jax.random.normal(jax.random.key(0), initial.shape)
    shared = _loss_and_gradient(model, data, tiny_dro.anchors, prompt, shared=True)
    whole = _loss_and_gradient(model, data, tiny_dro.anchors, prompt, shared=False)
    assert shared[0] == pytest.approx(whole[0], rel=1e-5)
    for term in ("refusal", "harmfulness", "norm"):
        assert shared[1][term] == pytest.approx(whole[1][term], rel=1e-4, abs=1e-7)
    if name == "mistral":  # its 5-token window keeps the soft prompt out of the last position's reach: no gradient
        assert not np.any(shared[2]) and not np.any(whole[2])
        return
    cosine = float((shared[2] * whole[2]).sum() / np.linalg.norm(shared[2]) / np.linalg.norm(whole[2]))
    assert cosine > 0.99999 and np.linalg.norm(shared[2] - whole[2]) <= 1e-4 * np.linalg.norm(whole[2])


FOUR_DEVICES = """
import dataclasses, json, sys
import jax, numpy as np
sys.path[:0] = [{tests!r}, {helpers!r}]
from test_shared_prefix import QUERIES, _passes
from dro_jax.inference.encoding import EncodedQueries, encode_queries
from dro_jax.loading import load_model
from dro_jax.parallel.mesh import data_mesh
import dro_jax.inference.represent as represent
assert len(jax.devices()) == 4
splits = []  # per batch: the devices its token ids are on, the rows on each, the rows in all
def recording(model_inputs):
    def recorded(self, batch, mesh=None, prefilled=None):
        inputs = model_inputs(self, batch, mesh, prefilled)
        ids = inputs.token_ids
        if isinstance(ids, jax.Array):
            splits.append([len(ids.sharding.device_set), ids.sharding.shard_shape(ids.shape)[0], ids.shape[0]])
        else:  # left on the host: one device takes it whole
            splits.append([1, ids.shape[0], ids.shape[0]])
        return inputs
    return recorded
EncodedQueries.model_inputs = recording(EncodedQueries.model_inputs)
model = load_model({model!r}, progress=False)
mesh = data_mesh()
def on_mesh(fn):
    def placed(*args, batching, **kwargs):
        return fn(*args, batching=dataclasses.replace(batching, mesh=mesh), **kwargs)
    return placed
import test_shared_prefix as t
t.score_refusal, t.represent_tokens, t.generate_responses = map(on_mesh, (t.score_refusal, t.represent_tokens, t.generate_responses))
encoded = encode_queries(model, QUERIES, "short")
out = {{"shared": _passes(model, encoded), "whole": _passes(model, dataclasses.replace(encoded, prefix_length=0)), "splits": splits}}
print(json.dumps(jax.tree.map(lambda x: x.tolist() if hasattr(x, "tolist") else x, out)))
"""


def test_four_devices_give_the_single_device_result(tiny_model_dir):
    directory = tiny_model_dir("llama")[0]
    here = os.path.dirname(os.path.abspath(__file__))
    script = FOUR_DEVICES.format(tests=here, helpers=os.path.dirname(here), model=str(directory))
    done = subprocess.run([sys.executable, "-c", script], env=device_env(4), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    four = json.loads(done.stdout.strip().splitlines()[-1])
    # Every batch of every pass had its rows split over the four devices, a quarter on each.
    assert four["splits"] and all(devices == 4 and rows == 4 * each for devices, each, rows in four["splits"]), four["splits"]
    model = load_model(directory, progress=False)
    one = _passes(model, dataclasses.replace(encode_queries(model, QUERIES, "short"), prefix_length=0))
    for path in ("shared", "whole"):
        _assert_same({k: np.asarray(v) if k != "tokens" else v for k, v in four[path].items()}, one)


@pytest.mark.real_model
def test_smollm2_shared_prefix_equals_the_whole_inputs(smollm2):
    model = smollm2
    # The default prompt, the longest human one (the tiny models' tests cover the other settings).
    encoded = encode_queries(model, HARMFUL[:3] + HARMLESS[:3], "default")
    assert encoded.prefix_length > 15
    shared = _passes(model, encoded)
    whole = _passes(model, dataclasses.replace(encoded, prefix_length=0))
    # SmolLM2's states are two orders larger than the tiny models': compare relative to their scale.
    scale = np.abs(whole["states"]).max()
    np.testing.assert_allclose(shared["states"], whole["states"], atol=1e-5 * scale, rtol=0)
    np.testing.assert_allclose(shared["log_odds"], whole["log_odds"], atol=1e-3, rtol=0)
    assert shared["tokens"] == whole["tokens"]
