"""Meshes: `--mesh` parsing, the partition rules, and training / scoring / generation on 8 forced devices
split by FSDP and by data x tensor parallelism giving the single-device results with the weights
really split."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from dro_jax.common.errors import DroJaxError
from dro_jax.models.partitioning import logical_axes, param_shardings
from dro_jax.parallel.mesh import MeshShape, data_mesh, make_mesh
from dro_jax.parallel.sharding import logical_spec
from jax.sharding import PartitionSpec as P

from helpers import TINY_CONFIGS
from processes import device_env

pytestmark = pytest.mark.heavy  # among the longest files: started first (tests/conftest.py)

HERE = Path(__file__).parent


def test_mesh_shapes_parse_and_fill_the_data_axis():
    assert MeshShape.parse("data=2,model=4") == MeshShape(2, 1, 4)
    assert MeshShape.parse(" fsdp=8 ").resolve(8) == (1, 8, 1)
    assert MeshShape.parse("model=2").resolve(8) == (4, 1, 2)
    assert MeshShape().resolve(3) == (3, 1, 1)
    for text, message in (("data=2,data=4", "twice"), ("pipeline=2", "AXIS=SIZE"), ("data=two", "AXIS=SIZE"), ("model=0", "at least 1")):
        with pytest.raises(DroJaxError, match=message):
            MeshShape.parse(text)
    with pytest.raises(DroJaxError, match="needs a multiple of 3 devices, there are 8"):
        MeshShape(model=3).resolve(8)
    with pytest.raises(DroJaxError, match="needs 4 devices, there are 8"):
        MeshShape(data=2, fsdp=2).resolve(8)
    with pytest.raises(DroJaxError, match="--dcn-mesh data=2,fsdp=1,model=1 does not fit the 1 processes of the job"):
        make_mesh(None, jax.devices()[:1], dcn="data=2")
    assert make_mesh(None, jax.devices()[:1], dcn="data=1").shape == {"data": 1, "fsdp": 1, "model": 1}


def test_logical_axes_map_onto_the_mesh_only_where_they_divide():
    mesh = {"data": 2, "fsdp": 4, "model": 2}
    assert logical_spec(mesh, ("batch", None, None), (16, 5, 64)) == P(("data", "fsdp"))
    assert logical_spec(mesh, ("layers", "heads", "embed"), (2, 4, 64)) == P(None, "model", "fsdp")
    assert logical_spec(mesh, ("layers", "kv_heads", "embed"), (2, 3, 64)) == P(None, None, "fsdp")  # 3 heads do not split in 2
    assert logical_spec(mesh, ("batch", "embed"), (8, 64)) == P(("data", "fsdp"))  # fsdp already splits the batch
    assert logical_spec({"data": 8, "fsdp": 1, "model": 1}, ("vocab", "embed"), (320, 64)) == P()  # weights copied


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_every_parameter_has_partition_rules(tiny_model_dir, name):
    from dro_jax.loading import load_model

    model = load_model(tiny_model_dir(name)[0], with_tokenizer=False, progress=False)
    shardings = param_shardings(model.config, data_mesh())
    import jax

    ndims = {tuple(k.key for k in path): leaf.ndim for path, leaf in jax.tree_util.tree_flatten_with_path(model.params)[0]}
    declared = logical_axes(model.config)  # as the modules declare them beside each weight
    assert {path: len(axes) for path, axes in declared.items()} == ndims  # one axis per dimension of every loaded weight
    assert declared["layers", "self_attn", "q_proj", "weight"] == ("layers", "heads", "embed")
    assert declared["layers", "mlp", "down_proj", "weight"] == ("layers", "embed", "mlp")
    assert jax.tree.structure(shardings) == jax.tree.structure(model.params)


def test_eight_device_meshes_give_the_single_device_results(tiny_model_dir, tmp_path):
    directory = tiny_model_dir("llama-4kv")[0]
    done = subprocess.run(
        [sys.executable, str(HERE / "mesh_worker.py"), str(directory), str(tmp_path)], env=device_env(8), capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    one = results.pop("one")
    prompt = np.asarray(one["soft_prompt"])
    assert len(set(one["losses"])) == len(one["losses"]) == 4  # it trained
    for name, got in results.items():
        np.testing.assert_allclose(got["losses"], one["losses"], rtol=1e-5, err_msg=name)
        # Relative to the prompt's scale: an entry near zero after an Adam step keeps the reduction order's noise.
        difference = np.abs(np.asarray(got["soft_prompt"]) - prompt)
        assert difference.max() <= 1e-5 * np.abs(prompt).max(), (name, difference.max())
        np.testing.assert_allclose(got["log_odds"], one["log_odds"], rtol=1e-5, atol=1e-5, err_msg=name)
        assert got["tokens"] == one["tokens"], name
        assert got["fingerprint"] == one["fingerprint"], name  # a checkpoint resumes on any mesh
    # One device holds the whole of every weight; FSDP splits every matrix in 8 along the hidden axis; tensor
    # parallelism splits heads, the MLP and the vocabulary in 4 (and the data axis copies them).
    assert set(one["share"].values()) == {1.0}
    assert results["fsdp=8"]["share"] == pytest.approx(dict.fromkeys(one["share"], 1 / 8))
    assert results["data=2,model=4"]["share"] == pytest.approx(dict.fromkeys(one["share"], 1 / 4))
    # Training runs on the mesh it is given: a device's share of the frozen q_proj weight and of each batch (6 rows,
    # padded to 8 where the batch is split 8 ways).
    assert one["trained_on"] == {"q_proj": 1.0, "batch": 1.0}
    assert results["fsdp=8"]["trained_on"] == pytest.approx({"q_proj": 1 / 8, "batch": 1 / 8})
    assert results["data=2,model=4"]["trained_on"] == pytest.approx({"q_proj": 1 / 4, "batch": 1 / 2})
    # Generation takes the weights whole along the fsdp axis: its compiled program gathers none, where FSDP's layout
    # would gather them in the prefill and at every decoded token.
    assert results["fsdp=8"]["weight_gathers"]["serving"] == 0 and results["fsdp=8"]["weight_gathers"]["fsdp"] > 0
    assert results["data=2,model=4"]["mesh"] == (
        "mesh data=2,fsdp=1,model=4 over 8 device(s) of 1 process(es); device ids by (data, model): [[0 1 2 3] [4 5 6 7]]")


def test_weights_kept_whole_and_filler_batches_are_reported(caplog):
    from dro_jax.bench.memory_plan import SHAPES
    from dro_jax.models.partitioning import unsplit_weights
    from dro_jax.parallel.sharding import padded_batch_size, warn_once

    llama70b = SHAPES["llama2-70b"]  # 8 key-value groups, hidden size 8192
    assert unsplit_weights(llama70b, {"data": 1, "fsdp": 8, "model": 8}) == []
    assert unsplit_weights(llama70b, {"data": 1, "fsdp": 3, "model": 16}) == [
        "a hidden size of 8192 does not divide over fsdp=3: down_proj, embed_tokens, gate_proj, k_proj, lm_head, o_proj, q_proj, "
        "up_proj, v_proj kept whole along it on every device",
        "8 key-value groups do not divide over model=16: k_proj, o_proj, q_proj, v_proj kept whole along it on every device",
    ]
    warn_once.cache_clear()
    mesh = data_mesh(jax.devices()[:1])
    with caplog.at_level("WARNING"):
        assert padded_batch_size(5, mesh) == 5
    assert caplog.text == ""
    # 25 rows over 32 ways: 7 of 32 rows filler (22%, no word); 17 over 32: 47% filler.
    fake = type("Mesh", (), {"shape": {"data": 32, "fsdp": 1, "model": 1}})()
    with caplog.at_level("WARNING"):
        assert padded_batch_size(25, fake) == 32
        assert caplog.text == ""
        assert padded_batch_size(17, fake) == 32 and padded_batch_size(17, fake) == 32
    assert caplog.text.count("batches of 17 rows are padded to 32 to split 32 ways: 47% of every batch is filler") == 1
