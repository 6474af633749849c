"""The experiment scripts on a finished tiny run: their tables, plots and trained prompts."""

import json

import pytest
from helpers import PNG_MAGIC

pytestmark = pytest.mark.heavy  # among the longest files: started first (tests/conftest.py)


def _experiment(script, run_dir, *extra):
    """Runs an experiment script in this process (sharing its compiled functions); returns its exit status."""
    import runpy
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "experiments"
    argv, path = sys.argv, list(sys.path)
    sys.argv, sys.path = [script, "--run", str(run_dir), *extra], [str(folder), *sys.path]
    try:
        runpy.run_path(str(folder / script), run_name="__main__")
    except SystemExit as stop:
        return stop.code
    finally:
        sys.argv, sys.path = argv, path
    return 0


def test_experiments_write_their_tables_and_plots(finished_run):
    assert _experiment("prompt_movement.py", finished_run) == 0
    out = finished_run / "experiments"
    movement = json.loads((out / "prompt_movement.json").read_text())
    assert {m["setting"] for m in movement["anchor_queries"]} == {"none", "short"}
    assert {m["setting"] for m in movement["held_out"]} == {"none", "short", "DRO"}
    assert (out / "prompt_movement.png").read_bytes().startswith(PNG_MAGIC)
    assert _experiment("ablations.py", finished_run, "--terms", "preserve") == 2  # the run weights it 0: nothing to ablate
    assert _experiment("ablations.py", finished_run, "--terms", "norm", "replies") == 0
    rows = json.loads((out / "ablations.json").read_text())["rows"]
    assert {r["setting"] for r in rows} == {"none", "short", "DRO", "DRO without norm", "DRO without replies"}
    for term in ("norm", "replies"):
        assert (out / "ablations" / f"no_{term}" / "soft_prompt.safetensors").is_file()
    assert _experiment("dro_vs_baselines.py", finished_run, "--epochs", "1", "--samples", "1", "--response-tokens", "4") == 0
    rows = json.loads((out / "dro_vs_baselines.json").read_text())["rows"]
    assert [r["setting"] for r in rows if r["dataset"] == "harmful"] == ["none", "short", "DRO", "prompt tuning"]


def test_the_objectives_experiment_trains_every_variant_and_seed_once(finished_run, tmp_path, monkeypatch):
    """Files named for the validation sets by default (--sets; the run's own held-out files stand in for the packaged
    sets, too long for the tiny model's context); the base configuration is the run's config.json, field by field;
    what is trained and evaluated is kept, so a re-run only reads it (training there fails the test);
    counts come with their Wilson intervals."""
    from dro_jax.dro import train
    from dro_jax.run import pipeline

    out = tmp_path / "objectives"
    config = json.loads((finished_run / "config.json").read_text())  # the tiny model's context is too short for the packaged sets
    args = ("--out", str(out), "--variants", "paper", "prompt-tuning", "--seeds", "1", "2",
            "--epochs", "1", "--settings", "none", "short", "--harmful", config["harmful_test"], "--harmless", config["harmless_test"])
    assert _experiment("objectives.py", finished_run, *args) == 0
    data = json.loads((out / "objectives_val.json").read_text())
    assert data["sets"] == [config["harmful_test"], config["harmless_test"]] and list(data["human"]) == ["none", "short"]
    assert data["base"] == config  # every field, the run's one epoch included
    assert list(data["results"]) == ["paper", "prompt-tuning"]
    assert [r["seed"] for r in data["results"]["paper"]] == [1, 2]
    assert data["results"]["paper"][0]["harmful declined"][1] == 3  # (declined, of) the 3 held-out queries
    kept = out / "evaluated" / "val" / "paper_seed_2.json"
    prompts = sorted((out / "trained").glob("*/seed_*/soft_prompt.safetensors"))
    assert [p.relative_to(out / "trained").parts[:2] for p in prompts] == [(v, f"seed_{s}") for v in ("paper", "prompt-tuning") for s in (1, 2)]
    stamps = [path.stat().st_mtime_ns for path in [kept, *prompts]]

    def no_training(*args, **kwargs):
        raise AssertionError("a kept soft prompt was trained again")

    monkeypatch.setattr(pipeline, "train_stage", no_training)
    monkeypatch.setattr(train, "train_soft_prompt", no_training)
    assert _experiment("objectives.py", finished_run, *args) == 0  # a re-run only reads what it kept
    assert [path.stat().st_mtime_ns for path in [kept, *prompts]] == stamps
    assert (out / "objectives_val.png").read_bytes().startswith(PNG_MAGIC)
    text = (out / "objectives_val.md").read_text()
    assert "targets missed" in text and "(CI " in text
    assert (out / "trained" / "prompt-tuning" / "seed_1" / "soft_prompt.safetensors").is_file()


def test_wilson_intervals_and_judge_agreement_figures():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
    from common import wilson
    from judge_agreement import precision_recall

    low, high = wilson(0, 25)
    assert low == 0.0 and abs(high - 0.1332) < 1e-3  # the known upper bound for 0 of 25
    low, high = wilson(15, 75)
    assert abs(low - 0.1251) < 1e-3 and abs(high - 0.3041) < 1e-3  # p = 0.2, n = 75
    # 2 of 3 said refusals are declines, 2 of 4 declines found; nothing said gives no precision
    assert precision_recall([True, True, True, False, False], [True, True, False, True, True])[:2] == (
        "0.67 (2/3; 0.21-0.94)", "0.50 (2/4; 0.15-0.85)")
    assert precision_recall([False], [True])[0] == "n/a (0/0)"


def test_an_experiment_without_a_run_says_how_to_make_one(tmp_path, capsys):
    assert _experiment("prompt_movement.py", tmp_path / "nothing") == 2
    assert "dro-jax run --out" in capsys.readouterr().err


def test_the_baseline_experiment_trains_the_reference_baseline_on_a_paper_run(monkeypatch):
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    from dro_jax.dro.prompt_tuning import PromptTuningConfig
    from dro_jax.run.config import RunConfig

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "experiments"))
    monkeypatch.delitem(sys.modules, "dro_vs_baselines", raising=False)
    import dro_vs_baselines as experiment

    def options(paper=False, **given):
        return SimpleNamespace(paper=paper, **{name: given.get(name) for name in experiment.OPTIONS})

    paper_run = RunConfig.paper(model="/models/Llama-2-7b-chat-hf", batch_size=50)
    assert experiment.is_paper_run(paper_run) and not experiment.is_paper_run(RunConfig())
    assert not experiment.is_paper_run(RunConfig.paper(epochs=3))  # an overridden preset is not taken for the paper's
    assert experiment.baseline_config(options(), paper_run) == PromptTuningConfig.reference("/models/Llama-2-7b-chat-hf")
    assert experiment.baseline_config(options(paper=True), RunConfig()) == PromptTuningConfig.reference(RunConfig().model)
    assert experiment.baseline_config(options(samples=1, epochs=2), RunConfig()) == PromptTuningConfig(
        responses=1, max_response_tokens=64, epochs=2)
