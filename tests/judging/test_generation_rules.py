"""The reference's generation rules: stop at the template's end-of-turn tokens, trim incomplete last lines."""

import pytest

from dro_jax.common.errors import DroJaxError
from dro_jax.inference.chat import end_of_turn_ids, stop_token_ids
from dro_jax.inference.encoding import encode_queries
from dro_jax.inference.sampling import SamplingConfig
from dro_jax.judging import responses as respond
from dro_jax.judging.responses import ends_a_sentence, generate_responses, trim_incomplete_lines
from dro_jax.loading import load_model
from helpers import HARMFUL, QUIET, TEMPLATES, tiny_tokenizer

# An openchat-style template: its turns end in a special token that is not EOS.
OPENCHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ 'GPT4 Correct ' + message['role'].title() + ': ' + message['content'] + '<|end_of_turn|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'GPT4 Correct Assistant:' }}{% endif %}"
)


def _ids(tokenizer, *tokens):
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def test_chatml_stops_at_im_end():
    tokenizer = tiny_tokenizer()
    assert end_of_turn_ids(tokenizer) == _ids(tokenizer, "<|im_end|>")  # the "\n" after it is not special
    assert stop_token_ids(tokenizer) == _ids(tokenizer, "<|im_end|>")  # EOS and the turn end are one token here


def test_an_end_of_turn_other_than_eos_is_added_to_it():
    tokenizer = tiny_tokenizer()
    tokenizer.eos_token = "<|endoftext|>"
    assert stop_token_ids(tokenizer) == _ids(tokenizer, "<|endoftext|>", "<|im_end|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|end_of_turn|>"]})
    tokenizer.chat_template = OPENCHAT_TEMPLATE
    assert end_of_turn_ids(tokenizer) == _ids(tokenizer, "<|end_of_turn|>")
    assert stop_token_ids(tokenizer) == _ids(tokenizer, "<|endoftext|>", "<|end_of_turn|>")


@pytest.mark.parametrize("family", ["llama2", "mistral", "vicuna"])
def test_templates_that_end_a_turn_with_eos(family):
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = TEMPLATES[family]
    assert stop_token_ids(tokenizer) == [tokenizer.eos_token_id]


def test_a_template_that_cannot_render_a_turn_falls_back_to_eos_and_none_at_all_is_an_error():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{{ raise_exception('no assistant turns') }}"
    assert end_of_turn_ids(tokenizer) == [] and stop_token_ids(tokenizer) == [tokenizer.eos_token_id]
    tokenizer.eos_token = None
    with pytest.raises(DroJaxError, match="tiny: the tokenizer defines no end-of-sequence token"):
        stop_token_ids(tokenizer, "tiny")


def test_generation_uses_the_templates_stop_ids(tiny_model_dir, monkeypatch):
    model = load_model(tiny_model_dir("llama")[0], progress=False)
    model.tokenizer.eos_token = "<|endoftext|>"
    seen = []
    generate = respond.generate_tokens

    def spy(params, config, inputs, stop_ids, *rest):
        seen.append(list(stop_ids))
        return generate(params, config, inputs, stop_ids, *rest)

    monkeypatch.setattr(respond, "generate_tokens", spy)
    generate_responses(model, encode_queries(model, HARMFUL[:1], "none"), SamplingConfig(max_new_tokens=2), batching=QUIET)
    assert seen == [_ids(model.tokenizer, "<|endoftext|>", "<|im_end|>")]


@pytest.mark.parametrize(
    "text, trimmed",
    [
        ("Sure.\nStep one is done.\nStep two is", "Sure.\nStep one is done."),  # cut mid-sentence by the length limit
        ("Sure.\nOne.\n\nTwo and\nthree and", "Sure.\nOne."),  # every unfinished last line goes
        ("Here is a list:\n1.", "Here is a list:"),  # "1." numbers a list item, it ends no sentence
        ("Why?\nBecause!", "Why?\nBecause!"),
        ("A single unfinished line", "A single unfinished line"),  # the first line always stays
        ("  Done.  \n", "Done."),
    ],
)
def test_trim_incomplete_lines(text, trimmed):
    assert trim_incomplete_lines(text) == trimmed


def test_sentence_ends():
    assert ends_a_sentence("Done.") and ends_a_sentence("Really?") and ends_a_sentence("Stop!")
    assert not ends_a_sentence("Item 2.") and not ends_a_sentence("and so") and not ends_a_sentence("")


def test_generation_trims_when_its_sampling_says_so(tiny_model_dir, monkeypatch):
    model = load_model(tiny_model_dir("llama")[0], progress=False)
    monkeypatch.setattr(model.tokenizer, "decode", lambda ids, **options: "Sure.\nHalf a")  # a reply cut mid-line
    encoded = encode_queries(model, HARMFUL[:2], "none")
    plain = generate_responses(model, encoded, SamplingConfig(max_new_tokens=6), batching=QUIET)
    trimmed = generate_responses(model, encoded, SamplingConfig(max_new_tokens=6, trim_incomplete_lines=True), batching=QUIET)
    assert [r.text for r in plain] == ["Sure.\nHalf a"] * 2 and [r.text for r in trimmed] == ["Sure."] * 2
    assert [r.token_ids for r in trimmed] == [r.token_ids for r in plain]  # the tokens stay as generated
