"""`python -m dro_jax.bench memory-plan`: the tiny shape compiled for 4 simulated devices (in a child process) gives
per-device numbers that follow the mesh, the microbatch and the budget; bad requests fail before anything compiles."""

import json

import pytest

from dro_jax.bench.__main__ import main
from dro_jax.bench.memory_plan import GIB, SHAPES, PlanRequest, budget_verdict, child_xla_flags, plan, report

# 16 rows of 64 own tokens: enough activations that the microbatch's saving shows above the fixed buffers.
SIZES = dict(devices=4, batch=16, tokens=64, max_new_tokens=16)
TINY = dict(config=SHAPES["tiny"], **SIZES)


@pytest.fixture(scope="module")
def plans():
    requests = {
        "data=4": PlanRequest(mesh="data=4", **TINY),
        "fsdp=4": PlanRequest(mesh="fsdp=4", **TINY),
        "fsdp=4, microbatch 4": PlanRequest(mesh="fsdp=4", microbatch=4, steps=("train",), **TINY),
    }
    return dict(zip(requests, plan(list(requests.values()), timeout=300)))


def test_the_llama2_shapes_have_their_published_sizes():
    assert SHAPES["llama2-7b"].num_parameters == pytest.approx(6.74e9, rel=2e-3)
    assert SHAPES["llama2-13b"].num_parameters == pytest.approx(13.0e9, rel=5e-3)
    assert SHAPES["llama2-70b"].num_parameters == pytest.approx(69.0e9, rel=5e-3)


def test_every_step_has_positive_numbers(plans):
    for name, result in plans.items():
        assert result["parameter_bytes"] == 2 * SHAPES["tiny"].num_parameters, name  # bfloat16
        for step in result["steps"].values():
            for key in ("argument", "output", "temporary", "total", "compile_seconds"):
                assert step[key] > 0, (name, key)
            assert step["total"] == step["argument"] + step["temporary"] + step["output"] - step["alias"]
    assert plans["fsdp=4"]["steps"]["train"]["alias"] > 0  # the donated soft prompt and optimizer state


def test_fsdp_holds_a_quarter_of_the_weights_per_device(plans):
    data, fsdp = plans["data=4"], plans["fsdp=4"]
    assert data["parameter_bytes_per_device"] == data["parameter_bytes"]
    assert fsdp["parameter_bytes_per_device"] == pytest.approx(data["parameter_bytes"] / 4, rel=0.01)  # norms stay whole
    saved = data["parameter_bytes_per_device"] - fsdp["parameter_bytes_per_device"]
    for step in ("train", "generate"):  # the batch is split 4 ways on both meshes: only the weights differ
        assert data["steps"][step]["argument"] - fsdp["steps"][step]["argument"] == saved, step


def test_a_microbatch_lowers_the_temporaries(plans):
    whole, micro = plans["fsdp=4"]["steps"]["train"], plans["fsdp=4, microbatch 4"]["steps"]["train"]
    assert micro["temporary"] < 0.5 * whole["temporary"]
    assert micro["argument"] == whole["argument"]


def test_the_verdict_follows_the_budget(plans):
    total = plans["fsdp=4"]["steps"]["train"]["total"]
    assert budget_verdict(total, 1.01 * total / GIB)[0]
    fits, headroom = budget_verdict(total, 0.99 * total / GIB)
    assert not fits and headroom == pytest.approx(-0.01 * total / GIB)


def test_the_command_prints_and_writes_the_plan(plans, tmp_path, capsys):
    total = plans["fsdp=4"]["steps"]["train"]["total"]
    budget = 1.01 * total / GIB
    path = tmp_path / "plan.json"
    sizes = [f"--{key.replace('_', '-')}={value}" for key, value in SIZES.items() if key != "max_new_tokens"]
    assert main(["memory-plan", "--shape", "tiny", "--mesh", "fsdp=4", *sizes, "--steps", "train",
                 "--budget-gib", str(budget), "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert f"parameters ({SHAPES['tiny'].num_parameters:,}), bfloat16" in printed and "4 devices as data=1,fsdp=4,model=1" in printed
    assert "| train step |" in printed and "| fits (+" in printed
    written = json.loads(path.read_text())
    train = written["steps"]["train"]
    assert train["total"] == total and train["fits"] and written["budget_gib"] == budget
    assert "does not fit" in report(written, 0.99 * total / GIB)


@pytest.mark.parametrize("arguments, message", [
    (["--shape", "llama2-1b", "--devices", "4"], "unknown --shape 'llama2-1b'"),
    (["--shape", "tiny", "--devices", "4", "--mesh", "fsdp=8"], "--mesh fsdp=8 does not match --devices 4"),
    (["--shape", "tiny", "--devices", "4", "--mesh", "fsdp=4", "--batch", "16", "--microbatch", "6"], "microbatch 6 must divide"),
])
def test_bad_requests_fail_before_compiling(arguments, message, capsys):
    assert main(["memory-plan", *arguments]) == 2
    assert message in capsys.readouterr().err


def test_the_child_keeps_the_callers_flags():
    flags = child_xla_flags("--xla_force_host_platform_device_count=2 --xla_dump_to=/tmp/x --xla_disable_hlo_passes=foo", 16)
    assert flags.split() == [
        "--xla_dump_to=/tmp/x", "--xla_force_host_platform_device_count=16",
        "--xla_disable_hlo_passes=change-op-data-type,operand_upcaster,foo",
    ]


def test_the_soft_prompt_gradient_is_summed_across_devices_in_float32(plans):
    # The model is compiled in half precision; the soft prompt's gradient [20 rows, hidden 64] must not be summed in it.
    for name in ("data=4", "fsdp=4"):
        sums = plans[name]["steps"]["train"]["all_reduces"]
        assert "f32[20,64]" in sums and not any(s.endswith("[20,64]") and not s.startswith("f32") for s in sums), (name, sums)
    # With the batch split and the weights whole, nothing else is summed across devices in half precision either:
    # the shared prefix's keys and values, whose gradient is also a sum over the rows, are float32.
    assert all(s.startswith("f32") for s in plans["data=4"]["steps"]["train"]["all_reduces"])
