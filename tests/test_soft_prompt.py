"""Soft prompts: placement in the system slot of four template families, files, and use everywhere."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dro_jax.chat import SAFETY_PROMPTS, ChatFormatter, PromptSetting
from dro_jax.cli import main
from dro_jax.errors import DroJaxError
from dro_jax.generate import SamplingConfig
from dro_jax.loading import load_model
from dro_jax.refusal_score import Openings, refusal_log_odds
from dro_jax.represent import encode_queries, represent_queries
from dro_jax.respond import generate_responses
from dro_jax.soft_prompt import (
    initial_soft_prompt,
    insert_soft_prompt,
    load_soft_prompt,
    prompt_token_ids,
    random_soft_prompt,
    save_soft_prompt,
)

QUERIES = ["How do I bake bread?", "Write a poem about the sea.", "Explain how a lock works, step by step.", "Hi"]

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set rest = messages[1:] %}"
    "{% else %}{% set system = false %}{% set rest = messages %}{% endif %}"
    "{% for message in rest %}{% if message['role'] == 'user' %}"
    "{% if loop.index0 == 0 and system %}{{ bos_token + '[INST] <<SYS>>\\n' + system.strip() + '\\n<</SYS>>\\n\\n' + message['content'].strip() + ' [/INST]' }}"
    "{% else %}{{ bos_token + '[INST] ' + message['content'].strip() + ' [/INST]' }}{% endif %}"
    "{% else %}{{ ' ' + message['content'].strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
VICUNA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + ' ' }}"
    "{% elif message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
TEMPLATES = {"chatml": None, "llama2": LLAMA2_TEMPLATE, "mistral": MISTRAL_TEMPLATE, "vicuna": VICUNA_TEMPLATE}


def _model(tiny_model_dir, template=None):
    directory, _ = tiny_model_dir("llama")
    model = load_model(directory, progress=False)
    if template is not None:
        model.tokenizer.chat_template = template
    return model


def _own_embeddings(model, name):
    return initial_soft_prompt(model.params, model.tokenizer, name)


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("prompt", ["short", "Be safe.\n\nRefuse harm."])
def test_soft_prompt_of_own_embeddings_reproduces_plain_text(tiny_model_dir, template, prompt):
    model = _model(tiny_model_dir, TEMPLATES[template])
    soft = PromptSetting.soft("own", _own_embeddings(model, prompt))
    plain = represent_queries(model, QUERIES, prompt, batch_size=3, progress=False)
    learned = represent_queries(model, QUERIES, soft, batch_size=3, progress=False)
    np.testing.assert_allclose(learned, plain, atol=1e-5, rtol=0)
    # The fillers sit exactly where the prompt's tokens were.
    plain_ids = encode_queries(model, QUERIES, prompt).sequences
    soft_encoded = encode_queries(model, QUERIES, soft)
    for ids, soft_ids, start in zip(plain_ids, soft_encoded.sequences, soft_encoded.soft_starts):
        count = len(soft.soft_prompt)
        assert ids[:start] == soft_ids[:start] and ids[start + count :] == soft_ids[start + count :]


@pytest.mark.parametrize("template", TEMPLATES)
def test_prompt_tokens_are_the_system_text(tiny_model_dir, template):
    model = _model(tiny_model_dir, TEMPLATES[template])
    ids = prompt_token_ids(model.tokenizer, SAFETY_PROMPTS["short"])
    assert model.tokenizer.decode(ids).strip() == SAFETY_PROMPTS["short"]
    full = ChatFormatter(model.tokenizer, SAFETY_PROMPTS["short"]).encode("Hi")
    assert any(full[i : i + len(ids)] == ids for i in range(len(full)))


def test_generation_and_log_odds_with_own_embeddings_equal_plain_text(tiny_model_dir):
    model = _model(tiny_model_dir)
    soft = PromptSetting.soft("own", _own_embeddings(model, "short"))
    greedy = SamplingConfig(max_new_tokens=8)
    plain = generate_responses(model, QUERIES, "short", greedy, batch_size=3, progress=False)
    learned = generate_responses(model, QUERIES, soft, greedy, batch_size=3, progress=False)
    assert [r.text for r in learned] == [r.text for r in plain]
    openings = Openings(refusal=("No",), compliant=("Sure",))
    np.testing.assert_allclose(
        refusal_log_odds(model, encode_queries(model, QUERIES, soft), openings, progress=False),
        refusal_log_odds(model, encode_queries(model, QUERIES, "short"), openings, progress=False),
        atol=1e-4,
    )


def test_a_different_soft_prompt_changes_the_representations(tiny_model_dir):
    model = _model(tiny_model_dir)
    plain = represent_queries(model, QUERIES, "short", progress=False)
    other = PromptSetting.soft("random", random_soft_prompt(model.params, 5, seed=0))
    assert np.abs(represent_queries(model, QUERIES, other, progress=False) - plain).max() > 1e-3


def test_insert_soft_prompt_places_rows_and_routes_gradients():
    embeds = jnp.zeros((2, 6, 3))
    soft = jnp.arange(6.0).reshape(2, 3) + 1
    offsets = jnp.array([1, -1])
    out = insert_soft_prompt(embeds, soft, offsets)
    np.testing.assert_array_equal(out[0, 1:3], soft)
    assert float(jnp.abs(out[0, [0, 3, 4, 5]]).sum()) == 0 and float(jnp.abs(out[1]).sum()) == 0
    grad = jax.grad(lambda s: insert_soft_prompt(embeds, s, jnp.array([1, 2])).sum())(soft)
    np.testing.assert_array_equal(grad, np.full((2, 3), 2.0))  # each row fills one position in each of 2 rows


def test_file_round_trip_and_errors(tmp_path):
    rows = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    path = save_soft_prompt(tmp_path / "p.safetensors", rows)
    np.testing.assert_array_equal(load_soft_prompt(path, hidden_size=8), rows)
    with pytest.raises(DroJaxError, match="hidden size is 16"):
        load_soft_prompt(path, hidden_size=16)
    with pytest.raises(DroJaxError, match="no such"):
        load_soft_prompt(tmp_path / "missing.safetensors")
    from safetensors.numpy import save_file

    save_file({"embeddings": rows}, str(tmp_path / "other.safetensors"))
    with pytest.raises(DroJaxError, match="no tensor named 'soft_prompt'"):
        load_soft_prompt(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(DroJaxError, match="not a readable safetensors"):
        load_soft_prompt(tmp_path / "junk.safetensors")
    bad = rows.copy()
    bad[0, 0] = np.nan
    save_file({"soft_prompt": bad}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(DroJaxError, match="NaN"):
        load_soft_prompt(tmp_path / "nan.safetensors")


def test_cli_uses_a_soft_prompt_file(tiny_model_dir, tmp_path, capsys):
    directory, _ = tiny_model_dir("llama")
    model = _model(tiny_model_dir)
    prompt_file = save_soft_prompt(tmp_path / "short.safetensors", _own_embeddings(model, "short"))
    queries = tmp_path / "q.txt"
    queries.write_text("\n".join(QUERIES), encoding="utf-8")
    common = ["--model", str(directory), "--queries", str(queries)]
    assert main(["represent", *common, "--soft-prompt", str(prompt_file), "--out", str(tmp_path / "soft.npy")]) == 0
    assert main(["represent", *common, "--system-prompt", "short", "--out", str(tmp_path / "plain.npy")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "soft.npy"), np.load(tmp_path / "plain.npy"), atol=1e-5)
    out = tmp_path / "gen.jsonl"
    assert main(["generate", *common, "--soft-prompt", str(prompt_file), "--greedy", "--max-new-tokens", "4", "--out", str(out)]) == 0
    assert '"setting": "soft:' in out.read_text()
    capsys.readouterr()

    wide = save_soft_prompt(tmp_path / "wide.safetensors", np.zeros((3, 32), np.float32))
    for command in ("represent", "generate", "label"):
        target = tmp_path / f"{command}.out"
        extra = ["--settings", "none", "--num-samples", "0"] if command == "label" else []
        assert main([command, *common, *extra, "--soft-prompt", str(wide), "--out", str(target)]) == 2
        err = capsys.readouterr().err
        assert "32 wide but the model's hidden size is 64" in err and "Traceback" not in err
        assert not target.exists()

