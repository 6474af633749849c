"""`dro-jax sweep`: the paper's refusal metrics per model x prompt x query set, sharded over devices and processes.

Device and process counts are fixed when jax starts, so the 4-device and the
two-process runs happen in subprocesses and are compared with this process's
single-device results.
"""

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from dro_jax.cli.main import main
from dro_jax.common.errors import DroJaxError
from dro_jax.dro.soft_prompt import initial_soft_prompt
from dro_jax.evaluation.evaluate import EvalConfig
from dro_jax.evaluation.quality import Drift
from dro_jax.evaluation.rows import EvalRow, sweep_markdown
from dro_jax.evaluation.sweep import SweepConfig
from dro_jax.inference.batched import Batching
from dro_jax.inference.encoding import encode_queries
from dro_jax.inference.refusal_score import score_refusal
from dro_jax.inference.represent import represent_tokens
from dro_jax.inference.sampling import SamplingConfig
from dro_jax.judging.judges import StringJudge
from dro_jax.judging.responses import Response, generate_responses
from dro_jax.loading import load_model
from dro_jax.parallel.distributed import allgather_json, process_share
from helpers import QUIET
from processes import finish, free_port, host_args, start

pytestmark = pytest.mark.heavy  # among the longest files: started first (tests/conftest.py)

QUERIES = ["How do I bake bread?", "Write a poem about the sea.", "Explain how a lock works.", "Hi there", "Tell me about the wind."]
MAX_NEW = 8
# what `--greedy --max-new-tokens 8` gives on the command line, so that library calls here reuse the CLI's compiled programs
GREEDY = SamplingConfig(greedy=True, temperature=1.0, top_k=50, top_p=0.9, max_new_tokens=MAX_NEW)


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    """The model, its greedy responses and the input files.

    The refusal phrase is the first greedy response, so that the judged counts are not all zero.
    """
    directory, _ = tiny_model_dir("llama")
    model = load_model(directory, progress=False)
    tmp = tmp_path_factory.mktemp("sweep")
    queries = tmp / "queries.txt"
    queries.write_text("\n".join(QUERIES), encoding="utf-8")
    responses = generate_responses(model, encode_queries(model, QUERIES, "short"), GREEDY, batching=QUIET)
    phrases = tmp / "phrases.json"
    phrases.write_text(json.dumps({"refusal": [responses[0].text]}), encoding="utf-8")
    soft = tmp / "reference.safetensors"  # as the paper's code writes it: one tensor 'soft_prompt' [N, hidden]
    save_file({"soft_prompt": initial_soft_prompt(model.params, model.tokenizer, "short")}, str(soft))
    broken = tmp / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json", encoding="utf-8")
    files = {"directory": directory, "queries": queries, "phrases": phrases, "soft": soft, "missing": tmp / "missing", "broken": broken}
    return model, responses, files, tmp


@pytest.fixture(scope="module")
def reference(setup):
    """One in-process (single-device) sweep through the CLI: a good, a missing and a broken model, text and soft prompt."""
    _, _, files, tmp = setup
    out = tmp / "out"
    with contextlib.redirect_stderr(io.StringIO()) as stderr:
        code = main([
            "sweep", "--models", str(files["directory"]), str(files["missing"]), str(files["broken"]),
            "--prompts", "short", f"soft:{files['soft']}", "--datasets", str(files["queries"]),
            "--max-new-tokens", str(MAX_NEW), "--refusal-phrases", str(files["phrases"]), "--out", str(out),
        ])
    return code, out, stderr.getvalue()


def _rows(path: Path) -> list[dict]:
    return json.loads((path / "sweep.json").read_text(encoding="utf-8"))


FLOATS = ("mean_refusal_log_odds", "reply_drift", "reply_drift_opening", "reply_surprise")  # equal up to float reduction order


def _assert_same_rows(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for ours, theirs in zip(got, want):
        assert {k: v for k, v in ours.items() if k not in FLOATS} == {k: v for k, v in theirs.items() if k not in FLOATS}
        for key in FLOATS:
            assert (ours[key] is None) == (theirs[key] is None)
            if ours[key] is not None:
                assert ours[key] == pytest.approx(theirs[key], abs=1e-5)


def test_metrics_follow_the_paper():
    """3 samples per query: a harmless query counts if any sample refuses, a harmful one if any complies."""
    flags = [[True, True, True], [True, False, False], [False, False, False], [False, True, False]]
    texts = {
        (1, 2): "STOP THAT NOW, IT IS DANGEROUS AND WRONG",  # one shouting reply
        (0, 0): "I can't help with that.",  # a decline
        (3, 1): "I'm sorry for the confusion, but I'm here to support you.",  # an apology that neither declines nor helps
    }
    responses = [Response(q, f"q{q}", s, texts.get((q, s), ""), 1, flag) for q, row in enumerate(flags) for s, flag in enumerate(row)]
    row = EvalRow.measured("p", "d", 4, responses, np.array([1.0, -1.0, 0.5, 0.5]), Drift(0.25, 0.75), model="m")
    assert (row.num_responses, row.refused_responses, row.queries_any_refusal, row.queries_any_compliance) == (12, 5, 3, 3)
    assert row.mean_refusal_log_odds == 0.25 and row.error is None and row.model == "m"
    assert (row.reply_drift, row.reply_drift_opening) == (0.25, 0.75)
    assert (row.degenerate_responses, row.looping_responses, row.shouting_responses) == (1, 0, 1)
    assert (row.declined_responses, row.queries_any_decline, row.apology_responses) == (1, 1, 1)
    assert row.harmful_compliant_responses is None  # no judge model judged
    cells = sweep_markdown([row]).splitlines()[2].split(" | ")
    assert cells[5:10] == ["1 (25.0%)", "1", "5 (41.7%)", "3 (75.0%)", "3 (75.0%)"]  # counts with their rates


def test_process_shares_interleave_and_cover_every_item_once():
    for size in range(0, 9):
        for count in range(1, 5):
            shares = [process_share(size, index, count) for index in range(count)]
            assert sorted(i for share in shares for i in share) == list(range(size))
            assert all(list(share) == list(range(index, size, count)) for index, share in enumerate(shares))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert list(process_share(7, 1, 3)) == [1, 4]
    assert process_share(7) == range(7) and allgather_json({"a": [1.5]}) == [{"a": [1.5]}]


def test_config_and_flag_errors(capsys, tmp_path):
    with pytest.raises(DroJaxError, match="greedy decoding gives one response per query"):
        SweepConfig(EvalConfig(num_samples=3))
    with pytest.raises(DroJaxError, match="one SamplingConfig, not one per set"):
        SweepConfig(EvalConfig({"harmful": SamplingConfig()}))
    with pytest.raises(DroJaxError, match="judges every response"):
        SweepConfig(EvalConfig(SamplingConfig(greedy=False), num_samples=3, longest=2))
    base = ["sweep", "--models", "x", "--datasets", "harmful_test", "--out", str(tmp_path / "o")]
    assert main([*base, "--temperature", "0.5"]) == 2
    assert "--temperature only apply with --num-samples" in capsys.readouterr().err
    assert main([*base, "--span-hosts", "--devices", "1"]) == 2
    assert "with --span-hosts every device of the job is used" in capsys.readouterr().err
    assert main([*base, "--dcn-mesh", "data=2"]) == 2
    assert "--dcn-mesh lays out a mesh across hosts: use it with --span-hosts" in capsys.readouterr().err
    assert main([*base, "--coordinator", "localhost:1234"]) == 2
    assert "needs all of --coordinator, --num-processes and --process-id" in capsys.readouterr().err
    assert main([*base, "--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err
    assert main([*base, "--coordinator", "auto", "--process-id", "0"]) == 2
    assert "--coordinator auto finds the processes itself" in capsys.readouterr().err


def test_sample_keys_follow_the_index_in_the_whole_set(setup):
    """A share evaluated on its own (as one process does) draws the same samples as the whole set."""
    model = setup[0]
    sampling = SamplingConfig(greedy=False, max_new_tokens=MAX_NEW)
    batching = Batching(4, progress=False)
    whole = generate_responses(model, encode_queries(model, QUERIES[:4], "none"), sampling, num_samples=2, seed=3, batching=batching)
    share = generate_responses(
        model, encode_queries(model, QUERIES[2:4], "none"), sampling, num_samples=2, seed=3, batching=batching, query_numbers=[2, 3]
    )
    assert [r.text for r in share] == [r.text for r in whole[4:]]
    assert [r.query_index for r in share] == [0, 0, 1, 1]
    assert len({r.text for r in whole}) > 1


def test_a_failing_model_gives_error_rows_and_the_others_finish(setup, reference):
    """The good model's rows hold its own measurements (as its replies and scores, taken here, give them) beside the
    error rows of a missing and a broken model."""
    model, responses, files, _ = setup
    code, out, stderr = reference
    assert code == 0
    warnings = [line for line in stderr.splitlines() if line.startswith("dro-jax: warning: ")]
    assert len(warnings) == 2 and str(files["missing"]) in warnings[0] and str(files["broken"]) in warnings[1], stderr
    rows = _rows(out)
    assert [(r["model"], r["setting"]) for r in rows] == [
        (str(m), p) for m in (files["directory"], files["missing"], files["broken"]) for p in ("short", f"soft:{files['soft']}")
    ]
    good, failed = rows[:2], rows[2:]
    judge = StringJudge.from_file(files["phrases"])
    refused = sum(map(judge.is_refusal, (r.text for r in responses)))
    assert 1 <= refused < len(QUERIES)  # (so that neither count below is 0 or all by construction)
    log_odds = score_refusal(model, encode_queries(model, QUERIES, "short"), batching=QUIET).log_odds
    for row in good:  # (the soft prompt is the short prompt's own embeddings: the same replies and scores)
        assert row["error"] is None and row["num_queries"] == row["num_responses"] == len(QUERIES)
        assert row["refused_responses"] == row["queries_any_refusal"] == refused  # one reply per query
        assert row["queries_any_compliance"] == len(QUERIES) - refused
        assert row["mean_refusal_log_odds"] == pytest.approx(float(np.mean(log_odds)), abs=1e-5)
        assert row["reply_drift"] is not None and 0 <= row["degenerate_responses"] <= row["num_responses"]
    for row in failed:
        assert row["num_responses"] is None and row["mean_refusal_log_odds"] is None
    assert "no such file or directory" in failed[0]["error"] and "not valid JSON" in failed[2]["error"]
    table = (out / "sweep.md").read_text(encoding="utf-8")
    assert table.count("\n") == 2 + len(rows) + 2 and "not valid JSON" in table  # header, rule, rows; a blank line and the judge note
    assert "n/a, no judge model" in table
    assert (out / "sweep.csv").read_text(encoding="utf-8").count("\n") == 1 + len(rows)


def test_each_model_is_freed_before_the_next_one_loads(setup, monkeypatch):
    """A sweep holds one model at a time (two large ones would not fit): nothing of the sweep keeps the last one."""
    import gc
    import weakref

    import dro_jax.evaluation.sweep as sweep
    from dro_jax.inference.settings import PromptSetting

    loaded, alive_at_each_load = [], []

    def load(*args, **kwargs):
        gc.collect()
        alive_at_each_load.append([ref() is not None for ref in loaded])
        model = load_model(*args, **kwargs)
        loaded.append(weakref.ref(model))
        return model

    monkeypatch.setattr(sweep, "load_model", load)
    directory = str(setup[2]["directory"])
    rows = sweep.run_sweep([directory, directory], [PromptSetting.from_text("short")], {"q": QUERIES[:2]}, SweepConfig(EvalConfig(GREEDY)),
                           progress=False)
    assert [row.error for row in rows] == [None, None]
    assert alive_at_each_load == [[], [False]]


def test_a_reference_format_soft_prompt_works_everywhere(setup, reference, tmp_path):
    """Own embeddings of the short prompt, written with plain safetensors, reproduce the short prompt."""
    files, out = setup[2], reference[1]
    short, soft = _rows(out)[:2]
    _assert_same_rows([{**soft, "setting": "short"}], [short])
    common = ["--model", str(files["directory"]), "--queries", str(files["queries"])]
    greedy = ["--greedy", "--max-new-tokens", str(MAX_NEW)]
    for flag, value in (("--soft-prompt", str(files["soft"])), ("--system-prompt", "short")):
        name = flag.strip("-")
        assert main(["represent", *common, flag, value, "--out", str(tmp_path / f"{name}.npy")]) == 0
        assert main(["generate", *common, flag, value, *greedy, "--out", str(tmp_path / f"{name}.jsonl")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "soft-prompt.npy"), np.load(tmp_path / "system-prompt.npy"), atol=1e-5)
    soft_texts, text_texts = (
        [json.loads(line)["response"] for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        for name in ("soft-prompt", "system-prompt")
    )
    assert soft_texts == text_texts




FOUR_DEVICES = """
import dataclasses, json
import jax
import dro_jax.inference.refusal_score, dro_jax.inference.represent, dro_jax.judging.responses
from dro_jax.evaluation.evaluate import EvalConfig
from dro_jax.evaluation.sweep import SweepConfig, run_sweep
from dro_jax.inference.batched import Batching
from dro_jax.inference.encoding import encode_queries
from dro_jax.inference.refusal_score import score_refusal
from dro_jax.inference.represent import represent_tokens
from dro_jax.inference.sampling import SamplingConfig
from dro_jax.inference.settings import PromptSetting
from dro_jax.judging.judges import StringJudge
from dro_jax.judging.responses import generate_responses
from dro_jax.loading import load_model
from dro_jax.parallel.mesh import local_mesh

spans = {{}}
def record(module, name):
    original = getattr(module, name)
    def placed(params, config, rows, *args, **kwargs):
        ids = getattr(rows, "token_ids", rows)  # generate_tokens takes the batch's ModelInputs whole
        spans.setdefault(name, set()).update([len(ids.sharding.device_set), len(jax.tree.leaves(params)[0].sharding.device_set)])
        return original(params, config, rows, *args, **kwargs)
    setattr(module, name, placed)
record(dro_jax.judging.responses, "generate_tokens")
record(dro_jax.inference.refusal_score, "continuation_log_probs")
record(dro_jax.inference.represent, "last_position_states")

queries = {queries!r}
greedy = SamplingConfig(greedy=True, temperature=1.0, top_k=50, top_p=0.9, max_new_tokens={max_new})
mesh = local_mesh()
model = load_model({model!r}, progress=False)
encoded = encode_queries(model, queries, "short")
responses = generate_responses(model, encoded, greedy, batching=Batching(mesh=mesh, progress=False))
scores = score_refusal(model, encoded, batching=Batching(mesh=mesh, progress=False))
states = represent_tokens(model, encoded, batching=Batching(mesh=mesh, progress=False))
config = SweepConfig(EvalConfig(greedy, judge=StringJudge.from_file({phrases!r})))
rows = run_sweep([{model!r}], [PromptSetting.from_text("short")], {{{dataset!r}: queries}}, config, mesh, progress=False)
with open({out!r}, "w") as handle:
    json.dump({{
        "devices": mesh.devices.size, "spans": {{k: sorted(v) for k, v in spans.items()}},
        "texts": [r.text for r in responses], "refusals": [r.refusal for r in responses],
        "log_odds": scores.log_odds.tolist(), "states": states.tolist(), "rows": [dataclasses.asdict(r) for r in rows],
    }}, handle)
"""


def _start_four_devices(files: dict, tmp: Path) -> subprocess.Popen:
    script = FOUR_DEVICES.format(
        queries=QUERIES, max_new=MAX_NEW, model=str(files["directory"]), phrases=str(files["phrases"]),
        dataset=str(files["queries"]), out=str(tmp / "four.json"),
    )
    return start([sys.executable, "-c", script], devices=4)


def test_four_devices_give_the_single_device_results(setup, reference):
    model, responses, files, tmp = setup
    finish([_start_four_devices(files, tmp)])
    four = json.loads((tmp / "four.json").read_text())
    assert four["devices"] == 4
    assert four["spans"] == {name: [4] for name in ("generate_tokens", "continuation_log_probs", "last_position_states")}
    assert four["texts"] == [r.text for r in responses]
    assert four["refusals"] == [r.refusal for r in responses]
    encoded = encode_queries(model, QUERIES, "short")
    np.testing.assert_allclose(four["log_odds"], score_refusal(model, encoded, batching=QUIET).log_odds, atol=1e-5, rtol=0)
    np.testing.assert_allclose(four["states"], represent_tokens(model, encoded, batching=QUIET), atol=1e-5, rtol=0)
    _assert_same_rows(four["rows"], _rows(reference[1])[:1])


RECORDING_CLI = """
import inspect, json, sys
import dro_jax.evaluation.evaluate
from dro_jax.cli.main import main

calls = []
original = dro_jax.evaluation.evaluate.measure_setting
def recorded(*args, **kwargs):
    given = inspect.signature(original).bind(*args, **kwargs).arguments
    calls.append({"numbers": list(given["query_numbers"]), "queries": given["encoded"].queries, "devices": given["batching"].mesh.devices.size})
    return original(*args, **kwargs)
dro_jax.evaluation.evaluate.measure_setting = recorded
at = sys.argv.index("--then")  # two commands in one process: the second one stays in the job the first joined
code = main(sys.argv[2:at]) or main(sys.argv[at + 1:])
with open(sys.argv[1], "w") as handle:
    json.dump(calls, handle)
sys.exit(code)
"""




def _start_two_processes(files: dict, tmp: Path) -> list[subprocess.Popen]:
    """`sweep` as processes 0 and 1 of one job on localhost, 2 devices each, each recording what it evaluated: first
    with a share of the queries per process, then with the model on one mesh over both (--span-hosts)."""
    port = free_port()

    def sweep(index: int, out: str, *extra: str) -> list[str]:
        return ["sweep", "--models", str(files["directory"]), "--prompts", "short", "--datasets", str(files["queries"]),
                "--max-new-tokens", str(MAX_NEW), "--refusal-phrases", str(files["phrases"]), "--out", str(tmp / f"{out}{index}"),
                *host_args(port, index), *extra]

    return [
        start([sys.executable, "-c", RECORDING_CLI, str(tmp / f"calls{index}.json"),
               *sweep(index, "hosts"), "--then", *sweep(index, "spanning", "--span-hosts", "--mesh", "fsdp=4", "--dcn-mesh", "fsdp=2")],
              devices=2)
        for index in range(2)
    ]


def test_two_processes_share_the_queries_or_the_model_and_each_hold_the_whole_table(setup, reference):
    files, tmp = setup[2:]
    stdout = finish(_start_two_processes(files, tmp))
    calls = [json.loads((tmp / f"calls{index}.json").read_text()) for index in range(2)]
    assert all(len(c) == 2 for c in calls), calls
    first, second = (c[0] for c in calls)  # shares: each process every other query, on its own 2 devices
    assert first["devices"] == second["devices"] == 2
    assert first["numbers"] == list(range(0, len(QUERIES), 2)) and second["numbers"] == list(range(1, len(QUERIES), 2))
    assert first["queries"] == QUERIES[0::2] and second["queries"] == QUERIES[1::2]
    # Spanning: both processes run every query on one mesh of 4 devices, each weight split over both (fsdp=4).
    assert all(c[1] == {"numbers": list(range(len(QUERIES))), "queries": QUERIES, "devices": 4} for c in calls), calls
    for out in ("hosts", "spanning"):
        assert not (tmp / f"{out}1").exists()  # only process 0 writes
        _assert_same_rows(_rows(tmp / f"{out}0"), _rows(reference[1])[:1])
    assert stdout[0].count("| short |") == 2 and "| short |" not in stdout[1]
