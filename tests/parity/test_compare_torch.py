"""`dro-jax compare-torch`: every check passes on faithful weights, and a model that is off by 1e-3 fails with exit status 1."""

import sys

import numpy as np
import pytest

from dro_jax.cli.main import main
from dro_jax.parity import torch_models
from dro_jax.parity.checks import random_anchor_space
from helpers import save_tiny_model

NUM_CHECKS = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny llama with room for the default safety prompt (453 tokens under the tiny tokenizer)."""
    directory = tmp_path_factory.mktemp("tiny-llama-512")
    save_tiny_model("llama", directory, max_position_embeddings=512)
    return directory


def table_rows(out: str) -> dict[str, str]:
    """check name -> pass/FAIL, from the markdown table."""
    rows = [line.strip("|").split("|") for line in out.splitlines() if line.startswith("| ") and not line.startswith("| check")]
    return {cells[0].strip(): cells[-1].strip() for cells in rows}


def test_all_checks_pass_on_the_same_weights(model_dir, capsys):
    assert main(["compare-torch", "--model", str(model_dir), "--num-prompts", "2", "--batch-size", "2"]) == 0
    results = table_rows(capsys.readouterr().out)
    assert len(results) == NUM_CHECKS and set(results.values()) == {"pass"}, results


def test_a_perturbed_torch_model_fails_with_exit_status_1(model_dir, tmp_path, capsys, monkeypatch):
    """The transformers side's final norm scaled by 1 + 1e-3: the states stay parallel (cosine 1) but are 1e-3 off."""
    load = torch_models.load_torch_model

    def load_perturbed(source, torch):
        model = load(source, torch)
        with torch.no_grad():
            model.model.norm.weight.mul_(1 + 1e-3)
        return model

    monkeypatch.setattr(torch_models, "load_torch_model", load_perturbed)
    rng = np.random.default_rng(0)
    anchors = random_anchor_space(rng.standard_normal((4, 64)), rng.standard_normal((4, 64)), 4, seed=0).save(tmp_path / "anchors.safetensors")
    with pytest.raises(SystemExit) as exit_info:
        main(["compare-torch", "--model", str(model_dir), "--num-prompts", "1", "--batch-size", "2", "--anchors", str(anchors)])
    assert exit_info.value.code == 1
    out, err = capsys.readouterr()
    results = table_rows(out)
    assert len(results) == NUM_CHECKS, results
    assert results["model: final-norm states, max abs diff / max abs value"] == "FAIL", results
    assert results["model: final-norm states, min cosine over all positions"] == "pass", results
    assert results["model: hidden states entering each layer, worst max abs diff / max abs value"] == "pass", results
    assert results["DRO loss: relative difference"] == "FAIL", results
    assert "parity checks failed" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-size", "3"], "--batch-size must be even and at most 200"),
        (["--batch-size", "202"], "--batch-size must be even and at most 200"),
    ],
)
def test_bad_batch_size_is_a_user_error(args, message, capsys):
    assert main(["compare-torch", *args]) == 2
    assert message in capsys.readouterr().err


def test_missing_torch_is_one_line(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    assert main(["compare-torch"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "dro-jax: error: dro-jax compare-torch needs PyTorch: pip install torch==2.13.0 'accelerate>=1.0'", err


def test_anchor_space_of_another_width_is_a_user_error(model_dir, tmp_path, capsys):
    rng = np.random.default_rng(0)
    anchors = random_anchor_space(rng.standard_normal((4, 8)), rng.standard_normal((4, 8)), 4, seed=0).save(tmp_path / "narrow.safetensors")
    assert main(["compare-torch", "--model", str(model_dir), "--anchors", str(anchors)]) == 2
    assert "the anchor space is 8 wide but the model's hidden size is 64" in capsys.readouterr().err
