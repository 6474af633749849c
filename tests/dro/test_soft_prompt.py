"""Soft-prompt files in the paper's format, their checks, and the initial values a soft prompt starts from."""

import numpy as np
import pytest

from dro_jax.common.errors import DroJaxError
from dro_jax.dro.soft_prompt import initial_soft_prompt, prompt_token_ids, random_soft_prompt
from dro_jax.inference.settings import SAFETY_PROMPTS, load_soft_prompt, parse_prompt_setting, save_soft_prompt


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




def test_initial_rows_are_the_prompt_tokens_embeddings_and_random_rows_are_vocabulary_rows(tiny_dro):
    model = tiny_dro.model
    table = np.asarray(model.params["embed_tokens"]["weight"])
    ids = prompt_token_ids(model.tokenizer, SAFETY_PROMPTS["short"])
    np.testing.assert_array_equal(initial_soft_prompt(model.params, model.tokenizer, "short"), table[ids])
    with pytest.raises(DroJaxError, match="'none' has no tokens"):
        initial_soft_prompt(model.params, model.tokenizer, "none")
    rows = random_soft_prompt(model.params, 5, seed=3)
    assert rows.shape == (5, 64) and all(np.any(np.all(table == row, axis=1)) for row in rows)
    np.testing.assert_array_equal(random_soft_prompt(model.params, 5, seed=3), rows)  # the seed fixes them


def test_prompt_settings_from_specs(tmp_path):
    """A `soft:` spec carries the file's rows and is checked against the model's width; the rest are text."""
    rows = np.random.default_rng(1).normal(size=(2, 8)).astype(np.float32)
    path = save_soft_prompt(tmp_path / "p.safetensors", rows)
    soft = parse_prompt_setting(f"soft:{path}", hidden_size=8)
    assert soft.name == f"soft:{path}" and soft.text is None
    np.testing.assert_array_equal(soft.soft_prompt, rows)
    with pytest.raises(DroJaxError, match="hidden size is 16"):
        parse_prompt_setting(f"soft:{path}", hidden_size=16)
    assert parse_prompt_setting("short").text == SAFETY_PROMPTS["short"]
    assert parse_prompt_setting("none").text is None
    assert parse_prompt_setting("Be kind.").text == "Be kind."
