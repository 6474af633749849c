"""`dro-jax train`, `export` and `evaluate`: resumable runs, the baseline, and one clear error line per bad input."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dro_jax.anchors.space import AnchorSpace
from dro_jax.cli.main import main
from dro_jax.inference.settings import load_soft_prompt

pytestmark = pytest.mark.heavy  # among the longest files: started first (tests/conftest.py)


def _train_args(directory, anchors, files, out, *extra):
    return [
        "train", "--model", str(directory), "--harmful", str(files[0]), "--harmless", str(files[1]),
        "--anchors", str(anchors), "--epochs", "20", "--batch-size", "4", "--lr", "1e-2", "--checkpoint-every", "4",
        "--out", str(out), *extra,
    ]


def _stopped_at_checkpoint(command: list[str], checkpoints: Path, step: int, signum: int) -> subprocess.Popen:
    """`command` run until its checkpoint `step` exists, then sent `signum`."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (checkpoints / str(step)).exists() and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signum)
    process.stderr_text = process.communicate()[1]
    return process


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_sigterm_and_sigkill_ends_with_the_uninterrupted_prompt(tiny_dro, tmp_path, query_files):
    directory = tiny_dro.directory
    anchors = tiny_dro.anchors.save(tmp_path / "anchors.safetensors")
    assert main(_train_args(directory, anchors, query_files, tmp_path / "straight")) == 0
    want = load_soft_prompt(tmp_path / "straight" / "soft_prompt.safetensors")

    run = tmp_path / "stopped"
    command = [sys.executable, "-m", "dro_jax.cli", *_train_args(directory, anchors, query_files, run)]
    # SIGTERM (preemption): the running step finishes and is checkpointed between the periodic ones, exit status 143.
    process = _stopped_at_checkpoint(command, run / "checkpoints", 4, signal.SIGTERM)
    assert process.returncode == 143 and "stopped by SIGTERM" in process.stderr_text, process.stderr_text[-2000:]
    stopped_at = max(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert 4 <= stopped_at < 60 and _steps(run) == list(range(1, stopped_at + 1))
    # SIGKILL gives no chance to save: the resumed run loses the steps since its last checkpoint, nothing else.
    process = _stopped_at_checkpoint([*command, "--resume"], run / "checkpoints", stopped_at // 4 * 4 + 8, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL
    assert not (run / "soft_prompt.safetensors").exists()  # it was stopped mid-run
    assert main(_train_args(directory, anchors, query_files, run)) == 2  # no silent restart over a run
    # What it computes may not change: any option but the execution ones, here one the run directory's record
    # alone refuses (the given anchors make the anchor fit's folds unused, so the checkpoint would take them).
    assert main(_train_args(directory, anchors, query_files, run, "--resume", "--folds", "3")) == 2
    # how it computes may change (here a batch size of the anchor stage, which the given anchors skip)
    assert main(_train_args(directory, anchors, query_files, run, "--resume", "--batch-size-eval", "3")) == 0
    np.testing.assert_array_equal(load_soft_prompt(run / "soft_prompt.safetensors"), want)
    assert _steps(run) == list(range(1, 61))

    exported = tmp_path / "export.safetensors"
    assert main(["export", "--checkpoint", str(run), "--out", str(exported)]) == 0
    np.testing.assert_array_equal(load_soft_prompt(exported), want)


def _fails(args, capsys, fragment):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err, err


def test_train_command_bad_input(tiny_dro, tmp_path, query_files, capsys):
    directory = tiny_dro.directory
    anchors = tiny_dro.anchors.save(tmp_path / "anchors.safetensors")
    harmful, harmless = query_files
    short = tmp_path / "short.txt"
    short.write_text("\n".join(tiny_dro.pairs.harmless[:3]), encoding="utf-8")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    _fails(_train_args(directory, anchors, (harmful, short), tmp_path / "a"), capsys, "must be the same size")
    _fails(_train_args(directory, anchors, (empty, harmless), tmp_path / "b"), capsys, "empty")
    _fails(_train_args(directory, anchors, query_files, tmp_path / "c", "--batch-size", "13"), capsys, "larger than the 12 training queries")
    wrong = AnchorSpace(np.zeros(8, np.float32), np.eye(8, dtype=np.float32), 4, tiny_dro.anchors.refusal, tiny_dro.anchors.harmfulness, {})
    _fails(_train_args(directory, wrong.save(tmp_path / "wrong.safetensors"), query_files, tmp_path / "d"), capsys, "8 wide")
    _fails(_train_args(directory, anchors, query_files, tmp_path / "w", "--loss-weights", "1", "-1", "0", "0", "0"), capsys, "non-negative")
    _fails(["export", "--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.safetensors")], capsys, "no such checkpoint directory")
    assert not (tmp_path / "x.safetensors").exists()


def test_a_run_directory_refuses_other_settings(tiny_dro, tmp_path, query_files, capsys):
    anchors = tiny_dro.anchors.save(tmp_path / "anchors.safetensors")
    run = tmp_path / "run"
    args = _train_args(tiny_dro.directory, anchors, query_files, run)
    args[args.index("--epochs") + 1] = "1"
    assert main(args) == 0
    config = (run / "config.json").read_text()
    args[args.index("--lr") + 1] = "0.5"
    _fails(args + ["--resume"], capsys, "other settings (lr: 0.01 -> 0.5)")
    assert (run / "config.json").read_text() == config


def test_ablating_a_term_by_its_short_name(tiny_dro, tmp_path, query_files):
    anchors = tiny_dro.anchors.save(tmp_path / "anchors.safetensors")
    run = tmp_path / "ablated"
    args = _train_args(tiny_dro.directory, anchors, query_files, run, "--ablate", "harm", "--ablate", "norm")
    args[args.index("--epochs") + 1] = "1"
    assert main(args) == 0
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["loss"] == pytest.approx(last["refusal"], rel=1e-6)  # only the refusal term is left


def test_baseline_and_evaluate_commands(tiny_dro, tmp_path, query_files, capsys):
    directory = tiny_dro.directory
    run = tmp_path / "pt"
    args = ["train", "--model", str(directory), "--harmful", str(query_files[0]), "--harmless", str(query_files[1]),
            "--baseline", "prompt-tuning", "--pt-responses", "1", "--pt-negatives", "--pt-token-mean", "--unlikelihood-weight", "2",
            "--response-tokens", "8", "--epochs", "1", "--batch-size", "4", "--out", str(run)]
    assert main(args) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # 12 queries x 1 response + the 6 harmful queries' no-prompt answers (the tiny model never refuses): 18 rows, 5 steps
    assert len(metrics) == 5 and "likelihood" in metrics[0]
    assert metrics[0]["loss"] == pytest.approx(metrics[0]["likelihood"] + 2 * metrics[0]["unlikelihood"], rel=1e-5)
    recorded = json.loads((run / "config.json").read_text())
    assert (recorded["pt_negatives"], recorded["pt_token_mean"], recorded["unlikelihood_weight"], recorded["epochs"]) == (True, True, 2.0, 1)
    anchors = tiny_dro.anchors.save(tmp_path / "anchors.safetensors")
    out = tmp_path / "eval.md"
    evaluate = ["evaluate", "--model", str(directory), "--harmful", str(query_files[0]), "--harmless", str(query_files[1]),
                "--settings", "none", "short", "--soft-prompt", str(run / "soft_prompt.safetensors"), "--anchors", str(anchors),
                "--max-new-tokens", "4", "--out"]
    assert main([*evaluate, str(tmp_path / "eval.txt")]) == 2  # the table's own suffix, before any work
    assert "name the markdown table (.md)" in capsys.readouterr().err and not list(tmp_path.glob("eval.*"))
    assert main([*evaluate, str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".csv").read_text().count("\n") == 1 + len(rows)
    assert [(r["setting"], r["dataset"]) for r in rows][:3] == [("none", "harmful"), ("short", "harmful"), (f"soft:{run / 'soft_prompt.safetensors'}", "harmful")]
    assert rows[0]["compliance_shift"] == 0 and all(r["num_queries"] == 6 for r in rows)
    # two tables (header, rule, rows; a blank line between them), then a blank line and the judge note
    assert out.read_text().count("\n") == 2 * (2 + len(rows)) + 1 + 2


def _parsed(*extra):
    from dro_jax.cli.main import build_parser

    return build_parser().parse_args(["train", "--model", "meta-llama/Llama-2-7b-chat-hf", "--out", "run", *extra])


def test_baseline_options_pick_the_preset_and_override_it():
    from dro_jax.cli.dro import baseline_config
    from dro_jax.dro.prompt_tuning import PromptTuningConfig

    assert baseline_config(_parsed()) is None  # DRO
    assert baseline_config(_parsed("--baseline", "prompt-tuning")) == PromptTuningConfig()
    paper = baseline_config(_parsed("--baseline", "prompt-tuning", "--pt-paper"))
    assert paper == PromptTuningConfig.reference("meta-llama/Llama-2-7b-chat-hf") and paper.unlikelihood_weight == 5.0
    changed = baseline_config(_parsed("--baseline", "prompt-tuning", "--pt-paper", "--no-pt-negatives", "--pt-responses", "3",
                                      "--pt-samples", "4", "--unlikelihood-weight", "1.5", "--response-tokens", "50", "--epochs", "2"))
    assert changed == PromptTuningConfig.reference("meta-llama/Llama-2-7b-chat-hf", negatives=False, responses=3, samples=4,
                                                   unlikelihood_weight=1.5, max_response_tokens=50, epochs=2)
    quick = baseline_config(_parsed("--baseline", "prompt-tuning", "--pt-token-mean"))
    assert quick == PromptTuningConfig(token_mean=True)


@pytest.mark.parametrize("option", [["--pt-paper"], ["--pt-responses", "3"], ["--no-pt-negatives"], ["--unlikelihood-weight", "5"]])
def test_baseline_options_without_the_baseline_are_refused(option):
    from dro_jax.cli.dro import baseline_config
    from dro_jax.common.errors import DroJaxError

    with pytest.raises(DroJaxError, match=f"{option[0].replace('no-', '')} shapes the prompt-tuning baseline"):
        baseline_config(_parsed(*option))


def test_the_train_command_trains_through_the_main_jobs_config():
    """`dro-jax train`'s options become the RunConfig the main job's stages read: renamed options land in their
    fields, its own defaults (the paper's schedule, apologies openings) are kept, not RunConfig's, ablated terms
    weigh 0, and a sampled label keeps the anchor commands' 10 to 64 new tokens."""
    from dro_jax.anchors.collect import LABEL_SAMPLING
    from dro_jax.cli.dro import train_run_config
    from dro_jax.inference.refusal_score import Openings
    from dro_jax.inference.sampling import SetSampling
    from dro_jax.run.config import PAPER_TRAINING

    args = _parsed("--harmful", "h.txt", "--harmless", "l.txt", "--label", "sampled", "--num-samples", "3", "--batch-size-eval", "7",
                   "--lr", "0.02", "--seed", "5", "--settings", "none", "short", "--ablate", "harmfulness")
    config = train_run_config(args)
    assert (config.harmful_train, config.harmless_train, config.label_samples, config.eval_batch_size) == ("h.txt", "l.txt", 3, 7)
    assert (config.learning_rate, config.seed, config.settings, config.epochs) == (0.02, 5, ("none", "short"), PAPER_TRAINING.epochs)
    assert (config.batch_size, config.refusal_score, config.openings) == (PAPER_TRAINING.batch_size, "probe", None)
    train = config.train_config()
    assert train.loss_weights.harmfulness == 0 and train.loss_weights.refusal == 1 and train.openings == Openings()
    assert train.checkpoint_every == 10 and train_run_config(_parsed("--epochs", "3")).epochs == 3
    label = config.anchor_config()
    assert (label.num_samples, label.seed, label.sampling) == (3, 5, SetSampling.same(LABEL_SAMPLING))


def test_random_rows_and_a_profile_of_a_few_steps(tiny_dro, tmp_path, query_files, capsys, monkeypatch):
    """--init-random trains that many rows from random embeddings; --profile writes one trace (steps 2 and 3 of 3)
    into a local directory, and refuses an object store before anything is written."""
    import jax

    import dro_jax.dro.train as train
    from dro_jax.dro.soft_prompt import random_soft_prompt
    from dro_jax.run.config import RunConfig
    from dro_jax.run.pipeline import starting_prompt

    # which steps the trace spans: the profiler's start and stop among the steps begun (the trace is still written)
    events = []

    def recorded(function, event):
        def wrapper(*args):
            events.append(event(*args))
            return function(*args)
        return wrapper

    monkeypatch.setattr(jax.profiler, "start_trace", recorded(jax.profiler.start_trace, lambda *_: "start"))
    monkeypatch.setattr(jax.profiler, "stop_trace", recorded(jax.profiler.stop_trace, lambda *_: "stop"))
    monkeypatch.setattr(train, "batch_indices", recorded(train.batch_indices, lambda n, config, step: step + 1))
    anchors = tiny_dro.anchors.save(tmp_path / "anchors.safetensors")
    args = _train_args(tiny_dro.directory, anchors, query_files, tmp_path / "run", "--init-random", "3", "--seed", "5",
                       "--profile", str(tmp_path / "trace"))
    args[args.index("--epochs") + 1] = "1"
    assert main(args) == 0
    assert load_soft_prompt(tmp_path / "run" / "soft_prompt.safetensors").shape == (3, tiny_dro.model.config.hidden_size)
    assert len(list((tmp_path / "trace").rglob("*.xplane.pb"))) == 1
    assert events == [1, "start", 2, 3, "stop"]  # not the first step, which compiles
    with pytest.raises(SystemExit) as refused:
        main(_train_args(tiny_dro.directory, anchors, query_files, tmp_path / "other", "--profile", "gs://bucket/trace"))
    assert refused.value.code == 2 and "the profiler writes local directories only" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
    config = RunConfig(init_random=3, seed=5)
    np.testing.assert_array_equal(starting_prompt(tiny_dro.model, config), random_soft_prompt(tiny_dro.model.params, 3, 5))
    assert config.base_prompt == "none" and RunConfig().base_prompt == "short"


def test_the_evaluate_command_measures_as_the_main_job_does():
    """`dro-jax evaluate`'s options become the RunConfig whose evaluation the main job runs: its sets, batch size,
    one greedy reply of --max-new-tokens (no minimum length) per query, and the string judge and openings chosen."""
    from dro_jax.cli.dro import evaluate_run_config
    from dro_jax.cli.main import build_parser
    from dro_jax.inference.refusal_score import Openings
    from dro_jax.inference.sampling import SamplingConfig
    from dro_jax.judging.declines import DeclineJudge
    from dro_jax.judging.judges import StringJudge

    def evaluation(*extra):
        args = build_parser().parse_args(["evaluate", "--out", "e.md", "--harmful", "h.txt", "--harmless", "l.txt", *extra])
        config = evaluate_run_config(args)
        assert (config.harmful_test, config.harmless_test) == ("h.txt", "l.txt")
        return config, config.evaluation()

    config, plain = evaluation("--batch-size", "7", "--max-new-tokens", "9")
    assert config.eval_batch_size == 7
    assert plain.sampling == {"harmful": SamplingConfig(max_new_tokens=9), "harmless": SamplingConfig(max_new_tokens=9)}
    assert (plain.num_samples, plain.longest, plain.harmful_sets, plain.suffix) == (1, None, ("harmful",), None)
    assert plain.openings == Openings() and plain.judge == StringJudge.default()
    _, chosen = evaluation("--openings", "declines", "--refusal-phrases", "decline")
    assert chosen.openings == Openings.load("declines") and chosen.openings != Openings() and isinstance(chosen.judge, DeclineJudge)
