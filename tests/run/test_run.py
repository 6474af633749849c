"""`dro-jax run` end to end on a tiny model: the run directory, stage caching, resume, and faults."""

import errno
import json

import pytest

from dro_jax.cli.main import main
from dro_jax.dro.soft_prompt import load_soft_prompt
from dro_jax.run import pipeline
from helpers import HARMLESS, PNG_MAGIC


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

    from dro_jax.common.errors import DroJaxError
    from dro_jax.dro.checkpoints import TrainCheckpoints

    checkpoints = TrainCheckpoints(tmp_path / "ckpt")
    checkpoints.save(1, {"x": np.ones(3, np.float32)}, {"step": 1})

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints._manager, "save", full_disk)
    with pytest.raises(DroJaxError, match="cannot write the checkpoint of step 2 .No space left on device"):
        checkpoints.save(2, {"x": np.zeros(3, np.float32)}, {"step": 2})
    assert checkpoints.latest_step() == 1
    checkpoints.close()
