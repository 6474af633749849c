"""A query set encoded once: its texts travel with the tokens, and every pass reuses them; reply openings by name or file."""

import json

import pytest

from dro_jax.common.errors import DroJaxError

from dro_jax.inference.chat import ChatFormatter
from dro_jax.inference.encoding import EncodedQueries, encode_queries
from dro_jax.inference.refusal_score import OPENING_SETS, Openings
from dro_jax.inference.sampling import SamplingConfig
from dro_jax.inference.settings import PromptSetting
from dro_jax.judging.responses import generate_responses
from dro_jax.loading import load_model
from helpers import QUIET

QUERIES = ["How do I bake bread?", "Write a poem about the sea.", "Hi"]
# The query before the system slot, so that a soft prompt starts at a different offset in each row.
QUERY_FIRST = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ 'Q: ' + message['content'] + '\\n' }}{% endif %}{% endfor %}"
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ 'S: ' + message['content'] + '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'A:' }}{% endif %}"
)


def test_encoded_queries_keep_their_texts_and_slot(tiny_model_dir):
    model = load_model(tiny_model_dir("llama")[0], progress=False)
    encoded = encode_queries(model, QUERIES, "short", source="my set")
    assert encoded.queries == QUERIES and encoded.source == "my set"
    assert encoded.sequences[0] == ChatFormatter(model.tokenizer, PromptSetting.from_text("short").text).encode(QUERIES[0])
    picked = encoded.select([2, 0, 0])
    assert picked.queries == [QUERIES[2], QUERIES[0], QUERIES[0]] and picked.sequences[1] == encoded.sequences[0]
    model.tokenizer.chat_template = QUERY_FIRST
    soft = encode_queries(model, QUERIES, PromptSetting.soft("s", model.params["embed_tokens"]["weight"][:3]))
    assert len(set(soft.soft_starts)) == len(QUERIES)  # so only the right rows' starts match
    picked = soft.select([2, 0, 0])
    assert picked.soft_starts == [soft.soft_starts[2], soft.soft_starts[0], soft.soft_starts[0]]
    assert picked.soft_prompt is soft.soft_prompt


def test_an_empty_query_set_has_no_responses(tiny_model_dir):
    model = load_model(tiny_model_dir("llama")[0], progress=False)
    assert generate_responses(model, encode_queries(model, [], None), SamplingConfig(max_new_tokens=2), batching=QUIET) == []


def test_generation_needs_the_texts_it_answers(tiny_model_dir):
    model = load_model(tiny_model_dir("llama")[0], progress=False)
    tokens_only = EncodedQueries.of(encode_queries(model, QUERIES, None).sequences)
    with pytest.raises(ValueError, match="query texts"):
        generate_responses(model, tokens_only, SamplingConfig(max_new_tokens=2), batching=QUIET)


def test_openings_load_by_name_from_a_file_or_fail_in_one_line(tmp_path):
    assert Openings.load(None).refusal[0] == "I'm sorry" and Openings.load("decline-replies") is OPENING_SETS["decline-replies"]
    assert Openings.load("declines").refusal != Openings.load("apologies").refusal
    assert Openings.load("declines").compliant == Openings.load("apologies").compliant  # the same compliant side
    path = tmp_path / "openings.json"
    path.write_text(json.dumps({"refusal": ["No way"], "compliant": ["Sure", "Here"]}))
    assert Openings.load(path) == Openings(("No way",), ("Sure", "Here"))
    with pytest.raises(DroJaxError, match="neither one of apologies, declines, decline-replies nor a JSON file"):
        Openings.load(tmp_path / "missing.json")
    for bad, message in (({"refusal": []}, "not an openings file"), ({"refusal": [], "compliant": ["Sure"]}, "non-empty lists")):
        path.write_text(json.dumps(bad))
        with pytest.raises(DroJaxError, match=message):
            Openings.load(path)
