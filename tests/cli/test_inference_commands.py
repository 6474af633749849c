"""`dro-jax represent`, `generate` and `label`: their outputs, soft prompts from files, and one clear error line
(exit code 2, no output file) per bad input."""

import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from dro_jax.cli.main import main
from dro_jax.dro.soft_prompt import initial_soft_prompt
from dro_jax.inference.chat import ChatFormatter
from dro_jax.inference.settings import save_soft_prompt
from dro_jax.inference.settings import SAFETY_PROMPTS
from dro_jax.judging.reply_text import response_opening
from dro_jax.loading import load_model
from helpers import save_tiny_model

QUERIES = ["How do I bake bread?", "Write a poem about the sea.", "Explain how a lock works.", "Hi"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_model("llama", directory, max_position_embeddings=128)
    return directory


@pytest.fixture()
def query_file(tmp_path):
    path = tmp_path / "queries.txt"
    path.write_text("\n".join(QUERIES[:2]) + "\n\n  \n" + "\n".join(QUERIES[2:]) + "\n", encoding="utf-8")
    return path


def test_represent_writes_last_position_final_norm_states(model_dir, query_file, tmp_path):
    out = tmp_path / "reps.npy"
    assert main(["represent", "--model", str(model_dir), "--queries", str(query_file), "--system-prompt", "short", "--batch-size", "3", "--out", str(out)]) == 0
    states = np.load(out)
    assert states.shape == (4, 64) and states.dtype == np.float32
    # Reference: transformers on each query alone, hidden_states[-1][:, -1].
    from transformers import AutoModelForCausalLM

    torch_model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32).eval()
    formatter = ChatFormatter(load_model(model_dir, progress=False).tokenizer, SAFETY_PROMPTS["short"])
    for row, query in enumerate(QUERIES):
        ids = torch.tensor([formatter.encode(query)])
        with torch.no_grad():
            want = torch_model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1].numpy()
        np.testing.assert_allclose(states[row], want, atol=1e-4, rtol=0)


def test_attention_option_reaches_the_model(model_dir, query_file, tmp_path, monkeypatch):
    """--attention fused loads the model with the fused attention path, which gives the reference's states."""
    import dro_jax.loading

    loaded = []

    def recording_load_model(*args, **kwargs):
        loaded.append(real_load_model(*args, **kwargs))
        return loaded[-1]

    real_load_model = dro_jax.loading.load_model
    monkeypatch.setattr(dro_jax.loading, "load_model", recording_load_model)
    states = {}
    for attention in ("reference", "fused"):
        out = tmp_path / f"{attention}.npy"
        assert main(["represent", "--model", str(model_dir), "--queries", str(query_file), "--attention", attention, "--out", str(out)]) == 0
        states[attention] = np.load(out)
    assert [model.config.attention for model in loaded] == ["reference", "fused"]
    np.testing.assert_allclose(states["fused"], states["reference"], atol=1e-5, rtol=0)


def _run_failing(args, capsys, *fragments):
    assert main(args) == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("dro-jax: error: ")]
    assert len(errors) == 1, stderr
    err = errors[0]
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_missing_model(tmp_path, query_file, capsys):
    out = tmp_path / "out.npy"
    _run_failing(["represent", "--model", str(tmp_path / "missing"), "--queries", str(query_file), "--out", str(out)], capsys, "missing", "no such file")
    assert not out.exists()


def test_empty_query_file(model_dir, tmp_path, capsys):
    queries = tmp_path / "empty.txt"
    queries.write_text("\n  \n", encoding="utf-8")
    out = tmp_path / "out.npy"
    _run_failing(["represent", "--model", str(model_dir), "--queries", str(queries), "--out", str(out)], capsys, "empty.txt", "empty")
    assert not out.exists()


def test_non_utf8_query_file(model_dir, tmp_path, capsys):
    queries = tmp_path / "latin1.txt"
    queries.write_bytes("first line\ncaf\xe9 au lait\n".encode("latin-1"))
    out = tmp_path / "out.npy"
    _run_failing(["represent", "--model", str(model_dir), "--queries", str(queries), "--out", str(out)], capsys, "latin1.txt", "line 2", "UTF-8")
    assert not out.exists()


def test_missing_query_file(model_dir, tmp_path, capsys):
    _run_failing(["represent", "--model", str(model_dir), "--queries", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o.npy")], capsys, "nope.txt")


def test_query_longer_than_context(model_dir, tmp_path, capsys):
    queries = tmp_path / "long.txt"
    queries.write_text("short one\n" + "bread " * 200 + "\n", encoding="utf-8")
    out = tmp_path / "out.npy"
    _run_failing(["represent", "--model", str(model_dir), "--queries", str(queries), "--out", str(out)], capsys, "long.txt", "query 2", "context of 128")
    assert not out.exists()


def test_unsupported_model_type(tmp_path, query_file, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "bert"}')
    _run_failing(["represent", "--model", str(tmp_path / "m"), "--queries", str(query_file), "--out", str(tmp_path / "o.npy")], capsys, "unsupported model_type 'bert'")


def test_output_directory_missing(model_dir, query_file, tmp_path, capsys):
    _run_failing(["represent", "--model", str(model_dir), "--queries", str(query_file), "--out", str(tmp_path / "no" / "o.npy")], capsys, "does not exist")


def test_failed_write_leaves_no_partial_file(model_dir, query_file, tmp_path, capsys, monkeypatch):
    def disk_full(handle, array):
        handle.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", disk_full)
    out = tmp_path / "out.npy"
    _run_failing(["represent", "--model", str(model_dir), "--queries", str(query_file), "--out", str(out)], capsys, "No space left")
    assert list(tmp_path.iterdir()) == [query_file]


def test_bad_batch_size_is_a_usage_error(model_dir, query_file, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["represent", "--model", str(model_dir), "--queries", str(query_file), "--batch-size", "0", "--out", str(tmp_path / "o.npy")])
    assert info.value.code == 2


def test_console_script_reports_errors_without_traceback(tmp_path):
    queries = tmp_path / "q.txt"
    queries.write_text("hello\n", encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "dro_jax.cli", "represent", "--model", str(tmp_path / "absent"), "--queries", str(queries), "--out", str(tmp_path / "o.npy")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "no such file or directory" in result.stderr


def _generate_args(model_dir, query_file, out, *extra):
    return ["generate", "--model", str(model_dir), "--queries", str(query_file), "--max-new-tokens", "6", "--out", str(out), *extra]


def test_generate_writes_one_judged_response_per_sample(model_dir, query_file, tmp_path):
    import json

    out = tmp_path / "responses.jsonl"
    assert main(_generate_args(model_dir, query_file, out, "--num-samples", "3", "--seed", "5", "--batch-size", "5")) == 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(records) == len(QUERIES) * 3
    assert [(r["query_index"], r["sample"]) for r in records] == [(q, s) for q in range(len(QUERIES)) for s in range(3)]
    assert {r["query"] for r in records} == set(QUERIES)
    assert all(set(r) == {"query", "query_index", "sample", "setting", "response", "num_tokens", "refusal"} for r in records)
    assert all(1 <= r["num_tokens"] <= 6 and isinstance(r["refusal"], bool) for r in records)
    # The seed fixes every sample, whatever the batch size.
    again = tmp_path / "again.jsonl"
    assert main(_generate_args(model_dir, query_file, again, "--num-samples", "3", "--seed", "5", "--batch-size", "2")) == 0
    assert again.read_text(encoding="utf-8") == out.read_text(encoding="utf-8")
    # The refusal field is the string judge's verdict: a phrase file whose one phrase is in some replies' openings
    # (the part the judge reads, lower-cased) and not in others marks exactly those replies as refusals.
    openings = [response_opening(r["response"]).lower() for r in records]
    words = sorted({word for text in openings for word in re.findall(r"[a-z]{2,}", text)})
    phrase = next(word for word in words if 0 < sum(word in text for text in openings) < len(openings))
    phrases = tmp_path / "phrases.json"
    phrases.write_text(json.dumps({"refusal": [phrase]}), encoding="utf-8")
    judged = tmp_path / "judged.jsonl"
    assert main(_generate_args(model_dir, query_file, judged, "--num-samples", "3", "--seed", "5", "--refusal-phrases", str(phrases))) == 0
    rejudged = [json.loads(line) for line in judged.read_text(encoding="utf-8").splitlines()]
    assert [r["response"] for r in rejudged] == [r["response"] for r in records]
    assert [r["refusal"] for r in rejudged] == [phrase in text for text in openings]


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (("--max-new-tokens", "0"), "max-new-tokens must be at least 1"),
        (("--top-p", "1.5"), "top-p must be in (0, 1]"),
        (("--top-p", "0"), "top-p must be in (0, 1]"),
        (("--max-new-tokens", "125"), "exceeds the model's context of 128"),
    ],
)
def test_generate_bad_settings(model_dir, query_file, tmp_path, capsys, extra, fragment):
    out = tmp_path / "out.jsonl"
    _run_failing(_generate_args(model_dir, query_file, out, *extra), capsys, fragment)
    assert not out.exists()


def test_soft_prompt_files_work_in_every_command(model_dir, query_file, tmp_path, capsys):
    import json

    model = load_model(model_dir, progress=False)
    prompt_file = save_soft_prompt(tmp_path / "short.safetensors", initial_soft_prompt(model.params, model.tokenizer, "short"))
    common = ["--model", str(model_dir), "--queries", str(query_file)]
    assert main(["represent", *common, "--soft-prompt", str(prompt_file), "--out", str(tmp_path / "soft.npy")]) == 0
    assert main(["represent", *common, "--system-prompt", "short", "--out", str(tmp_path / "plain.npy")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "soft.npy"), np.load(tmp_path / "plain.npy"), atol=1e-5)
    # Greedy replies under the short prompt's own embeddings are its text's replies, which differ from no prompt's.
    replies = {}
    for name, setting in (("soft", ["--soft-prompt", str(prompt_file)]), ("short", ["--system-prompt", "short"]), ("none", [])):
        out = tmp_path / f"gen-{name}.jsonl"
        assert main(["generate", *common, *setting, "--greedy", "--max-new-tokens", "4", "--out", str(out)]) == 0
        replies[name] = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert all(r["setting"] == f"soft:{prompt_file}" for r in replies["soft"])
    assert [r["response"] for r in replies["soft"]] == [r["response"] for r in replies["short"]]
    assert [r["response"] for r in replies["soft"]] != [r["response"] for r in replies["none"]]
    capsys.readouterr()

    wide = save_soft_prompt(tmp_path / "wide.safetensors", np.zeros((3, 32), np.float32))
    for command in ("represent", "generate", "label"):
        target = tmp_path / f"{command}.out"
        extra = ["--settings", "none", "--num-samples", "0"] if command == "label" else []
        assert main([command, *common, *extra, "--soft-prompt", str(wide), "--out", str(target)]) == 2
        err = capsys.readouterr().err
        assert "32 wide but the model's hidden size is 64" in err and "Traceback" not in err
        assert not target.exists()


def test_label_writes_one_label_per_query_and_setting(model_dir, query_file, tmp_path):
    """The compliance rate is the share of replies the string judge does not call refusals: 1 with a phrase no
    reply holds, 0 with the empty phrase, which every reply holds."""
    import json

    phrases = {}
    for name, phrase in (("never", "no reply of four tokens says this"), ("always", "")):
        phrases[name] = tmp_path / f"{name}.json"
        phrases[name].write_text(json.dumps({"refusal": [phrase]}), encoding="utf-8")
    out = tmp_path / "labels.jsonl"
    args = ["label", "--model", str(model_dir), "--queries", str(query_file), "--settings", "none", "short",
            "--refusal-phrases", str(phrases["never"]), "--num-samples", "2", "--max-new-tokens", "4", "--out", str(out)]
    assert main(args) == 0
    labels = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(l["setting"], l["query_index"]) for l in labels] == [(s, i) for s in ("none", "short") for i in range(len(QUERIES))]
    assert all(l["num_samples"] == 2 and l["compliance_rate"] == 1.0 for l in labels)
    refused = tmp_path / "refused.jsonl"
    assert main([*args[:-2], "--refusal-phrases", str(phrases["always"]), "--out", str(refused)]) == 0
    assert [l["compliance_rate"] for l in map(json.loads, refused.read_text(encoding="utf-8").splitlines())] == [0.0] * len(labels)
    assert all(np.isfinite(l["refusal_log_odds"]) for l in labels)
    assert labels[0]["refusal_log_odds"] != labels[len(QUERIES)]["refusal_log_odds"]  # the prompt changes the score
    only_scores = tmp_path / "scores.jsonl"
    assert main(args[:-4] + ["--num-samples", "0", "--out", str(only_scores)]) == 0
    scored = [json.loads(line) for line in only_scores.read_text(encoding="utf-8").splitlines()]
    assert all(l["compliance_rate"] is None for l in scored)
    assert [l["refusal_log_odds"] for l in scored] == [l["refusal_log_odds"] for l in labels]


class _Measured(Exception):
    """Stops a command where it hands its judge on."""


def _judge_used(argv, monkeypatch):
    """The string judge `argv`'s command measures with: generate's and label's as handed to their measuring (the
    command stops there), sweep's and run's from the configuration they run."""
    import dro_jax.anchors.labels
    import dro_jax.judging.responses
    from dro_jax.cli.main import build_parser
    from dro_jax.cli.run import run_config
    from dro_jax.cli.sweep import _sweep_config

    def stop(judge):
        raise _Measured(judge)

    monkeypatch.setattr(dro_jax.judging.responses, "generate_responses", lambda *args: stop(args[5]))
    monkeypatch.setattr(dro_jax.anchors.labels, "label_queries", lambda *args: stop(args[4].judge))
    if argv[0] in ("generate", "label"):
        with pytest.raises(_Measured) as measured:
            main(argv)
        return measured.value.args[0]
    args = build_parser().parse_args(argv)
    return _sweep_config(args).evaluation.judge if argv[0] == "sweep" else run_config(args).string_judge()


@pytest.mark.parametrize(
    "argv, default",
    [
        (["generate", "--out", "o.jsonl"], "dro-jax"),
        (["label", "--settings", "none", "--out", "o.jsonl"], "dro-jax"),
        (["sweep", "--models", "m", "--out", "o"], "dro-jax"),
        (["run"], None),  # the preset decides: dro-jax by default, paper under --paper
    ],
)
def test_every_command_with_a_string_judge_takes_paper_dro_jax_or_a_file(argv, default, model_dir, query_file, tmp_path, monkeypatch):
    """Each command measures with the judge its --refusal-phrases names, not only parses it."""
    import json

    from dro_jax.cli.main import build_parser
    from dro_jax.judging.judges import ReferenceStringJudge, StringJudge

    if argv[0] in ("generate", "label"):
        argv = [*argv, "--model", str(model_dir), "--queries", str(query_file)]
    assert build_parser().parse_args(argv).refusal_phrases == default
    phrases = tmp_path / "phrases.json"
    phrases.write_text(json.dumps({"refusal": ["I refuse"], "not_refusal": ["I refuse to stop"]}), encoding="utf-8")
    named = {"paper": ReferenceStringJudge.packaged(), "dro-jax": StringJudge.default(),
             str(phrases): StringJudge(("I refuse",), ("I refuse to stop",))}
    for spec, judge in named.items():
        assert _judge_used([*argv, "--refusal-phrases", spec], monkeypatch) == judge, spec


def test_precision_and_compilation_cache_options(capsys, tmp_path, monkeypatch):
    import jax

    from dro_jax.common.compiles import default_cache_dir, use_compilation_cache
    from dro_jax.models.config import set_matmul_precision

    try:
        assert main(["run", "--show-config", "--precision", "default", "--compilation-cache", str(tmp_path)]) == 0
        assert jax.config.jax_default_matmul_precision is None
        assert "matmul precision default: the backend's fastest float32 matmuls: TF32" in capsys.readouterr().err
        assert jax.config.jax_compilation_cache_dir == str(tmp_path) and jax.config.jax_enable_compilation_cache
        assert main(["run", "--show-config", "--compilation-cache", "off"]) == 0
        assert not jax.config.jax_enable_compilation_cache
        assert main(["run", "--show-config"]) == 0
        assert jax.config.jax_default_matmul_precision == "highest"  # float32 as PyTorch's, on any backend
        assert jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir == str(default_cache_dir())
    finally:
        set_matmul_precision("highest")
        use_compilation_cache()
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "dro-jax" / "xla"
