"""`python -m dro_jax.bench forward|generate|anchor|train-step`: both sides on the device JAX uses, in one dtype, read against that
chip's limits, every figure in `--json`."""

import json
from types import SimpleNamespace

import jax
import pytest
from helpers import HARMFUL, HARMLESS

from dro_jax.bench import device as bench_device_module
from dro_jax.bench.__main__ import main as bench
from dro_jax.bench.device import bench_device
from dro_jax.parallel.chips import datasheet
from dro_jax.common.errors import DroJaxError


def test_known_chips_by_their_device_kind():
    assert datasheet("NVIDIA H100 80GB HBM3") == (989.0, 3.35)
    assert datasheet("NVIDIA H100 PCIe") == (756.0, 2.0)  # not the SXM part's figures
    assert datasheet("NVIDIA H200") == (989.0, 4.8)
    assert datasheet("TPU v5 lite") == (197.0, 0.82) and datasheet("TPU v5p")[0] == 459.0
    assert datasheet("cpu") is None


def _fake_device(monkeypatch, platform: str, kind: str):
    monkeypatch.setattr(bench_device_module.jax, "devices", lambda: [SimpleNamespace(platform=platform, device_kind=kind)])


def test_a_gpu_runs_both_sides_there_in_bfloat16(monkeypatch):
    _fake_device(monkeypatch, "gpu", "NVIDIA H100 80GB HBM3")
    with_cuda = SimpleNamespace(cuda=SimpleNamespace(is_available=lambda: True))
    device = bench_device(with_cuda)
    assert (device.dtype, device.torch_device, device.limits_from) == ("bfloat16", "cuda", "datasheet")
    assert (device.peak_gflops, device.bandwidth_gbs) == (989e3, 3.35e3)
    without_cuda = SimpleNamespace(cuda=SimpleNamespace(is_available=lambda: False))
    with pytest.raises(DroJaxError, match="no CUDA"):
        bench_device(without_cuda)


def test_the_cpu_measures_its_own_limits(monkeypatch):
    """The limits are the timings taken here read as rates: 2 n^3 FLOPs per n x n matmul (the best of n = 1024, 2048,
    3072), then 512 MiB read per matrix-vector product."""
    import torch

    timings, measured = [], bench_device_module.best_of

    def timed(repeats, fn):
        timings.append(measured(repeats, fn))
        return timings[-1]

    monkeypatch.setattr(bench_device_module, "best_of", timed)
    device = bench_device(torch)
    assert (device.platform, device.dtype, device.torch_device, device.limits_from) == ("cpu", "float32", "cpu", "measured")
    assert len(timings) == 4 and all(seconds > 0 for seconds in timings)
    assert device.peak_gflops == pytest.approx(max(2 * n**3 / seconds / 1e9 for n, seconds in zip((1024, 2048, 3072), timings)))
    assert device.bandwidth_gbs == pytest.approx(512 * 2**20 / timings[3] / 1e9)
    with pytest.raises(DroJaxError, match="dtype must be one of"):
        bench_device(torch, "float16")


def test_forward_and_generate_write_every_figure(tiny_model_dir, tmp_path, capsys, monkeypatch):
    # The limits as measured (the test above measures them once); the rows' fractions are read against these.
    monkeypatch.setattr(bench_device_module, "matmul_peak_gflops", lambda dtype: 100.0)
    monkeypatch.setattr(bench_device_module, "memory_bandwidth_gbs", lambda dtype: 10.0)
    directory = str(tiny_model_dir("llama")[0])
    queries = tmp_path / "queries.txt"
    queries.write_text("\n".join(HARMFUL[:3] + HARMLESS[:3]))
    figures = tmp_path / "forward.json"
    common = ["--model", directory, "--queries", str(queries), "--repeats", "1", "--threads", "1"]
    assert bench(["forward", *common, "--system-prompt", "none", "--batch-size", "4", "--skip-loop", "--json", str(figures)]) == 0
    forward = json.loads(figures.read_text())
    assert forward["device"]["platform"] == jax.devices()[0].platform and forward["device"]["dtype"] == "float32"
    assert [row["implementation"] for row in forward["rows"]] == [
        "dro-jax, jit, batched", "dro-jax, jit, batched, every query whole", "transformers, batched"]
    assert forward["device"]["peak_gflops"] == 100.0
    assert all(row["of_peak"] == pytest.approx(row["gflops"] / 100.0) for row in forward["rows"])
    assert forward["min_cosine"]["transformers"] > 0.9999 and forward["min_cosine"]["every_query_whole"] > 0.9999
    figures = tmp_path / "generate.json"
    assert bench(["generate", *common, "--batch-sizes", "1", "2", "--new-tokens", "3", "--json", str(figures)]) == 0
    generate = json.loads(figures.read_text())
    assert {(row["batch"], row["implementation"]) for row in generate["rows"]} == {
        (batch, f"{side}, {kind}") for batch in (1, 2) for side in ("dro-jax", "transformers") for kind in ("greedy", "sampled")}
    for row in generate["rows"]:
        assert row["of_bandwidth"] == pytest.approx(row["new_tokens_per_second"] * generate["weight_bytes"] / 1e9 / 10.0)
    assert generate["weight_bytes"] == 4 * forward_parameters(directory)
    assert "transformers on cpu, both in float32" in capsys.readouterr().out


def test_the_anchor_benchmark_writes_every_figure(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench_device_module, "matmul_peak_gflops", lambda dtype: 100.0)
    monkeypatch.setattr(bench_device_module, "memory_bandwidth_gbs", lambda dtype: 10.0)
    figures = tmp_path / "anchor.json"
    args = ["anchor", "--model", str(tiny_model_dir("llama")[0]), "--num-queries", "2", "--batch-size", "4", "--repeats", "1",
            "--settings", "none", "Answer safely.", "--threads", "1", "--json", str(figures)]
    assert bench(args) == 0
    anchor = json.loads(figures.read_text())
    assert anchor["device"]["dtype"] == "float32" and anchor["inputs"] == 2 * 4  # 2 settings x (2 harmful + 2 harmless)
    assert [row["implementation"] for row in anchor["rows"]] == ["dro-jax", "transformers"]
    assert all(row["of_peak"] == pytest.approx(row["gflops"] / 100.0) for row in anchor["rows"])
    dro_jax, transformers = anchor["rows"]
    assert dro_jax["gflop"] < transformers["gflop"]  # each setting's shared tokens run once
    assert anchor["log_odds_max_abs_diff"] < 1e-3 and anchor["states_min_cosine"] > 0.9999
    assert "transformers on cpu, both in float32" in capsys.readouterr().out


def test_the_training_step_benchmark_runs_both_sides_on_one_device(tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setattr(bench_device_module, "matmul_peak_gflops", lambda dtype: 100.0)
    monkeypatch.setattr(bench_device_module, "memory_bandwidth_gbs", lambda dtype: 10.0)
    args = ["train-step", "--model", str(tiny_model_dir("llama")[0]), "--num-queries", "2", "--batch-size", "4", "--steps", "1",
            "--init-prompt", "Answer safely.", "--refusal-scores", "probe", "--threads", "1"]
    assert bench(args) == 0
    out = capsys.readouterr().out
    assert "transformers on cpu, both in float32" in out and "matmul peak (measured): 100 GFLOP/s" in out
    for row in ("dro-jax training step", "PyTorch training step", "dro-jax loss, forward only", "PyTorch loss, forward only"):
        assert f"| {row}" in out
    jax_terms, torch_terms = (float(x) for x in out.split("the paper's terms ")[1].split(" (")[0].split(" vs "))
    assert jax_terms == pytest.approx(torch_terms, rel=1e-4)  # the same loss on the same inputs


def forward_parameters(directory: str) -> int:
    from dro_jax.loading import load_model

    return load_model(directory, with_tokenizer=False, progress=False).config.num_parameters
