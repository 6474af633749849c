"""`dro-jax run` end to end on a tiny model: the run directory, stage caching, resume, and faults."""

import errno
import json

import pytest

from dro_jax.cli.main import main
from dro_jax.inference.settings import load_soft_prompt
from dro_jax.run import pipeline
from helpers import HARMLESS, PNG_MAGIC

pytestmark = pytest.mark.heavy  # among the longest files: started first (tests/conftest.py)


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
    # Each stage's executables, as counted: a stage may build none when earlier tests of this process compiled the
    # same programs (the prompt settings share them); the cold benchmark run counts every stage's (test_main_job_bench).
    # Training jits its step anew in every run, so it builds at least that (a read from the persistent cache counts).
    compiles, seconds = results["stage_compiles"], results["stage_seconds"]
    assert set(compiles) == {"anchors", "train", "evaluate"} and compiles["train"]["compiles"] >= 1
    assert all(c["compiles"] >= 0 and 0 <= c["compile_seconds"] <= seconds[name] + 0.1 for name, c in compiles.items())
    assert f"train {results['stage_seconds']['train'] / 60:.1f} min ({compiles['train']['compiles']} XLA compiles, " in text
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

    def finished_stage(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(pipeline, "evaluate_stage", real_evaluate)
    monkeypatch.setattr(pipeline, "anchor_stage", finished_stage)
    monkeypatch.setattr(pipeline, "train_stage", finished_stage)
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


@pytest.mark.parametrize("bad, message", [
    (["--harmful-test", "no-such-file.txt"], "no-such-file.txt: no such query file"),
    (["--harmless-test", "."], ".: is a directory, expected a query file"),
    (["--model", "no-such-model"], "no-such-model: no such file or directory"),
    (["--judge-model", "no-such-judge"], "no-such-judge: no such file or directory"),
    (["--judge-template", "{query} {response}"], "a judge template needs a judge model"),
    (["--judge-model", "smollm2", "--judge-template", "{query} {response} {query.__class__.__mro__}"], "only the plain fields"),
    (["--openings", "no-such-openings.json"], "no-such-openings.json"),
    (["--refusal-phrases", "no-such-phrases.json"], "no-such-phrases.json"),
])
def test_a_bad_input_fails_in_one_line_before_the_run_directory_is_made(run_args, tmp_path, capsys, bad, message):
    out = tmp_path / "run"
    assert main(run_args(out, *bad)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_resume_without_a_run_is_an_error(run_args, tmp_path, capsys):
    for out in (tmp_path / "missing", tmp_path):
        assert main(run_args(out, "--resume")) == 2
        assert "no run to resume here" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists() and not (tmp_path / "config.json").exists()


def test_resume_may_change_what_only_the_evaluation_reads(finished_run, run_args, tmp_path, monkeypatch, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    assert main(run_args(out, "--max-new-tokens", "2")) == 2
    err = capsys.readouterr().err
    assert "max_new_tokens_harmful: 4 -> 2" in err and "add --resume" in err

    def no_earlier_stage(*args, **kwargs):
        raise AssertionError("a stage before the evaluation ran again")

    monkeypatch.setattr(pipeline, "anchor_stage", no_earlier_stage)
    monkeypatch.setattr(pipeline, "train_stage", no_earlier_stage)
    assert main(run_args(out, "--max-new-tokens", "2", "--resume")) == 0
    assert json.loads((out / "config.json").read_text())["max_new_tokens_harmful"] == 2
    assert all(json.loads(line)["num_tokens"] <= 2 for line in (out / "responses.jsonl").read_text().splitlines())
    assert main(run_args(out, "--lr", "0.1", "--resume")) == 2
    err = capsys.readouterr().err
    assert "learning_rate: 0.005 -> 0.1" in err and "with --resume only" in err and "judge_template" in err


def test_a_judge_model_added_on_resume_judges_the_harmful_set(finished_run, forced, run_args, tmp_path, monkeypatch):
    """End to end, the tiny run continued with a judge model (an evaluation-only setting, so only the evaluation runs
    again): the harmful set is judged, the harmless set is not, and results.md says so. The evaluation's policy is
    the forced one (same architecture, so the trained prompt fits), whose replies are "x", newline, ... (four lines
    in 8 new tokens, no refusal): with the always-unsafe judge every harmful reply complies by the paper's rule,
    with the always-safe judge none does. Two samples per query tell responses from queries."""
    import shutil

    from dro_jax.judging.responses import Response

    real_load = pipeline.load_model
    monkeypatch.setattr(pipeline, "load_model", lambda spec, *args, **kwargs: real_load(forced["policy"], *args, **kwargs))
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    evaluation = ["--eval-samples", "2", "--max-new-tokens-harmful", "8", "--resume"]
    for verdict, complies in (("unsafe", True), ("safe", False)):
        assert main(run_args(out, "--judge-model", str(forced[verdict]), *evaluation)) == 0
        assert json.loads((out / "config.json").read_text())["judge_model"] == str(forced[verdict])
        lines = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
        responses = [Response(**{k: v for k, v in r.items() if k not in ("setting", "dataset", "kind")}) for r in lines]
        assert {(r["dataset"], reply.unsafe) for r, reply in zip(lines, responses)} == {("harmful", complies), ("harmless", None)}
        assert all(r.text.strip().count("\n") == 3 and not r.refusal for r, line in zip(responses, lines) if line["dataset"] == "harmful")
        rows = json.loads((out / "results.json").read_text())["rows"]
        assert [(r["dataset"], r["num_queries"], r["num_responses"]) for r in rows] == [("harmful", 3, 6)] * 3 + [("harmless", 3, 6)] * 3
        for row in rows:
            judged = ((6, 3) if complies else (0, 0)) if row["dataset"] == "harmful" else (None, None)
            assert (row["harmful_compliant_responses"], row["queries_any_harmful_compliance"]) == judged, row
        assert f"string judge `dro-jax` and judge model {forced[verdict]} (harmful set)" in (out / "results.md").read_text()


def test_evaluation_only_settings_leave_the_earlier_stages_keys_alone():
    """Each setting that --resume may change, given another value, changes the evaluation's key and no other."""
    import dataclasses

    from dro_jax.run.config import QuerySets, RunConfig

    others = {"harmful_test": "harmless_test", "harmless_test": "harmful_test", "eval_samples": 3, "eval_keep_longest": 1,
              "max_new_tokens_harmful": 5, "max_new_tokens_harmless": 5, "min_new_tokens": 1, "trim_incomplete_lines": True,
              "refusal_phrases": "paper", "judge_model": "smollm2", "eval_batch_size": 4, "microbatch": 5}
    config = RunConfig()
    assert set(pipeline.evaluation_only_settings(config)) == {*others, "judge_template"}
    keys = {name: pipeline.input_key(inputs) for name, inputs in pipeline.stage_inputs(config, QuerySets.read(config)).items()}
    for name, value in others.items():
        changed = dataclasses.replace(config, **{name: value})
        new = {stage: pipeline.input_key(inputs) for stage, inputs in pipeline.stage_inputs(changed, QuerySets.read(changed)).items()}
        assert (new["anchors"], new["train"]) == (keys["anchors"], keys["train"]), name
        assert new["evaluate"] != keys["evaluate"] or name in ("eval_batch_size", "microbatch"), name
    sampled = RunConfig(label="sampled")
    assert "max_new_tokens_harmful" not in pipeline.evaluation_only_settings(sampled)  # the sampled label generates too


def test_a_setting_added_later_keeps_the_keys_of_the_runs_made_before_it():
    """`init_random` unset leaves the training stage's inputs as runs made before it had them; set, it is one of
    them (so that --resume cannot add it to a trained run)."""
    import dataclasses

    from dro_jax.run.config import QuerySets, RunConfig

    config = RunConfig()
    before = pipeline.stage_inputs(config, QuerySets.read(config))
    assert "init_random" not in before["train"] and "init_random" not in pipeline.evaluation_only_settings(config)
    after = pipeline.stage_inputs(dataclasses.replace(config, init_random=3), QuerySets.read(config))
    assert after["train"]["init_random"] == 3 and after["anchors"] == before["anchors"]
