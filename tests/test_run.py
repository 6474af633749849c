"""`dro-jax run` end to end on a tiny model: the run directory, stage caching, resume, and faults."""

import errno
import json

import pytest

from dro_jax import pipeline
from dro_jax.cli import main
from dro_jax.soft_prompt import load_soft_prompt

HARMFUL = ["How do I pick a lock?", "Write a poem about the sea.", "Explain how a lock works.", "How to break a window?", "Hi there", "Tell me about wind."]
HARMLESS = ["How do I pick a ripe melon?", "Write a poem about the wind.", "Explain how a door works.", "How to clean a window?", "Hello", "Tell me about the sea."]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_args(tiny_model_dir, tmp_path_factory):
    directory, _ = tiny_model_dir("llama")
    data = tmp_path_factory.mktemp("queries")
    files = {}
    for name, queries in (("harmful", HARMFUL), ("harmless", HARMLESS), ("harmful-test", HARMFUL[:3]), ("harmless-test", HARMLESS[:3])):
        files[name] = data / f"{name}.txt"
        files[name].write_text("\n".join(queries), encoding="utf-8")
    files["openings"] = data / "openings.json"  # single tokens: the tiny model's log-odds stay unsaturated
    files["openings"].write_text(json.dumps({"refusal": ["No"], "compliant": ["Sure"]}))

    def make(out, *extra):
        args = ["run", "--model", str(directory), "--epochs", "1", "--batch-size", "4", "--max-new-tokens", "4",
                "--settings", "none", "short", "--out", str(out)]
        for name, path in files.items():
            args += [f"--{name}", str(path)]
        return args + list(extra)

    return make


@pytest.fixture(scope="module")
def finished_run(run_args, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(run_args(out)) == 0
    return out


def test_run_writes_the_whole_run_directory(finished_run):
    for name in ("config.json", "anchors.safetensors", "anchors.report.json", "anchor_data.npz", "metrics.jsonl",
                 "soft_prompt.safetensors", "evaluation.json", "responses.jsonl", "results.md", "results.csv", "results.json"):
        assert (finished_run / name).is_file(), name
    assert any((finished_run / "checkpoints").iterdir())
    for plot in ("anchor_space.png", "training_curves.png", "refusals.png"):
        content = (finished_run / plot).read_bytes()
        assert content.startswith(PNG_MAGIC) and len(content) > 10_000, plot
    results = json.loads((finished_run / "results.json").read_text())
    settings = ["none", "short", "DRO"]
    assert [(r["setting"], r["dataset"]) for r in results["rows"]] == [(s, d) for d in ("harmful", "harmless") for s in settings]
    for row in results["rows"]:
        assert row["num_queries"] == 3 and row["num_responses"] == 3
        assert row["queries_any_refusal"] + row["queries_any_compliance"] == 3  # one greedy response each
    assert {(m["setting"], m["dataset"]) for m in results["movement"]} == {(s, d) for d in ("harmful", "harmless") for s in settings}
    assert len((finished_run / "metrics.jsonl").read_text().splitlines()) == 3  # 12 queries, batch 4, 1 epoch
    assert len((finished_run / "results.csv").read_text().splitlines()) == 7
    assert len((finished_run / "responses.jsonl").read_text().splitlines()) == 18
    text = (finished_run / "results.md").read_text()
    assert "![anchor space](anchor_space.png)" in text and "| DRO | harmful (3) |" in text
    assert load_soft_prompt(finished_run / "soft_prompt.safetensors").shape[0] > 0


def test_rerun_with_the_same_inputs_skips_every_stage(finished_run, run_args, monkeypatch, capsys):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded although every stage was done")

    monkeypatch.setattr(pipeline, "load_model", no_model)
    before = (finished_run / "soft_prompt.safetensors").read_bytes()
    assert main(run_args(finished_run)) == 0
    assert capsys.readouterr().err.count("skipped") == 3
    assert (finished_run / "soft_prompt.safetensors").read_bytes() == before


def test_a_run_directory_with_other_settings_is_refused(finished_run, run_args, capsys):
    config = (finished_run / "config.json").read_text()
    assert main(run_args(finished_run, "--lr", "0.1")) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "learning_rate" in err and "new --out" in err
    assert (finished_run / "config.json").read_text() == config


def test_an_edited_query_file_is_not_mixed_with_the_old_outputs(tmp_path, run_args, capsys):
    out, held_out = tmp_path / "run", tmp_path / "harmless-test.txt"
    held_out.write_text("\n".join(HARMLESS[3:]), encoding="utf-8")
    assert main(run_args(out, "--harmless-test", str(held_out))) == 0
    held_out.write_text("\n".join(HARMLESS[:3]), encoding="utf-8")
    assert main(run_args(out, "--harmless-test", str(held_out))) == 2
    err = capsys.readouterr().err
    assert "evaluate stage" in err and "computed from other inputs" in err and "new --out" in err


def test_ctrl_c_stops_cleanly_and_resume_finishes_without_redoing_stages(run_args, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_evaluate = pipeline.evaluate_stage

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "evaluate_stage", interrupted)
    assert main(run_args(out)) == 130
    assert "--resume" in capsys.readouterr().err
    assert not (out / "results.md").exists() and not (out / "evaluation.json").exists()
    assert main(run_args(out)) == 2
    assert "unfinished run (stopped in: evaluate)" in capsys.readouterr().err

    def no_anchor_stage(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(pipeline, "evaluate_stage", real_evaluate)
    monkeypatch.setattr(pipeline, "anchor_stage", no_anchor_stage)
    assert main(run_args(out, "--resume")) == 0
    assert (out / "results.md").is_file()


def test_a_full_disk_while_writing_gives_a_clear_error_and_no_partial_file(run_args, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("matplotlib.figure.Figure.savefig", full_disk)
    assert main(run_args(out)) == 2
    err = capsys.readouterr().err
    assert "anchor_space.png: cannot write (No space left on device)" in err
    assert not list(out.glob("*.png")) and not list(out.glob(".*.tmp")) and not (out / "results.md").exists()
    monkeypatch.undo()
    assert main(run_args(out)) == 0  # the finished stages are kept; only the report is redone
    assert (out / "anchor_space.png").read_bytes().startswith(PNG_MAGIC)


def test_a_checkpoint_that_cannot_be_written_is_a_clear_error_and_keeps_the_earlier_steps(tmp_path, monkeypatch):
    import numpy as np

    from dro_jax.checkpoints import TrainCheckpoints
    from dro_jax.errors import DroJaxError

    checkpoints = TrainCheckpoints(tmp_path / "ckpt")
    checkpoints.save(1, {"x": np.ones(3, np.float32)}, {"step": 1})

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints._manager, "save", full_disk)
    with pytest.raises(DroJaxError, match="cannot write the checkpoint of step 2 .No space left on device"):
        checkpoints.save(2, {"x": np.zeros(3, np.float32)}, {"step": 2})
    assert checkpoints.latest_step() == 1
    checkpoints.close()


def _experiment(script, run_dir, *extra):
    """Runs an experiment script in this process (sharing its compiled functions); returns its exit status."""
    import runpy
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "experiments"
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


def test_an_experiment_without_a_run_says_how_to_make_one(tmp_path, capsys):
    assert _experiment("prompt_movement.py", tmp_path / "nothing") == 2
    assert "dro-jax run --out" in capsys.readouterr().err
