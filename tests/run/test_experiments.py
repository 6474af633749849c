"""The experiment scripts on a finished tiny run: their tables, plots and trained prompts."""

import json

from helpers import PNG_MAGIC


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
    assert _experiment("ablations.py", finished_run) == 0
    rows = json.loads((out / "ablations.json").read_text())["rows"]
    assert {r["setting"] for r in rows} == {"none", "short", "DRO", "DRO without norm", "DRO without refusal", "DRO without harmfulness"}
    for term in ("norm", "refusal", "harmfulness"):
        assert (out / "ablations" / f"no_{term}" / "soft_prompt.safetensors").is_file()
    assert _experiment("dro_vs_baselines.py", finished_run, "--epochs", "1", "--samples", "1", "--response-tokens", "4") == 0
    rows = json.loads((out / "dro_vs_baselines.json").read_text())["rows"]
    assert [r["setting"] for r in rows if r["dataset"] == "harmful"] == ["none", "short", "DRO", "prompt tuning"]


def test_refusal_variants_train_every_variant_and_seed_once(finished_run):
    args = ("--variants", "paper", "contrast", "openings+preserve", "--seeds", "1", "2", "--epochs", "1")
    assert _experiment("refusal_variants.py", finished_run, *args) == 0
    out = finished_run / "experiments"
    data = json.loads((out / "refusal_variants_1_epochs.json").read_text())
    assert list(data["results"]) == ["paper", "contrast", "openings+preserve"]
    assert [r["seed"] for r in data["results"]["openings+preserve"]] == [1, 2]
    assert data["variants"]["openings+preserve"]["loss_weights"][-1] == 1.0 and set(data["human"]) == {"none", "short"}
    assert (out / "variants" / "contrast" / "anchors.safetensors").is_file()  # refitted from the run's anchor data
    kept = out / "variants" / "paper" / "epochs_1_seed_2" / "rows.json"
    stamp = kept.stat().st_mtime_ns
    assert _experiment("refusal_variants.py", finished_run, *args) == 0  # a re-run only reads what it kept
    assert kept.stat().st_mtime_ns == stamp
    assert (out / "refusal_variants_1_epochs.png").read_bytes().startswith(PNG_MAGIC)
    assert "seeds meeting every target" in (out / "refusal_variants_1_epochs.md").read_text()


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
