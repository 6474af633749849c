"""Models, inputs and outputs in an object store: gs:// paths served by an in-memory fsspec filesystem (what epath
reads gs:// through when gcsfs is installed), and local paths unchanged."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from etils import epath
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.registry import _registry

from dro_jax.anchors.collect import AnchorData
from dro_jax.anchors.space import AnchorSpace
from dro_jax.cli.main import main
from dro_jax.common.errors import DroJaxError
from dro_jax.common.files import check_writable, write_text
from dro_jax.common.paths import as_path, is_remote, local_copy
from dro_jax.data.queries import read_queries
from dro_jax.inference.settings import load_soft_prompt, save_soft_prompt
from dro_jax.loading import load_model


class MemoryBucket(MemoryFileSystem):
    """gs://bucket/key kept in this process's memory under the keys "/bucket/key"; listings answer "bucket/key",
    as gcsfs does."""

    protocol = ("gs", "gcs")
    store: dict = {}
    pseudo_dirs: list = [""]

    @classmethod
    def _strip_protocol(cls, path):
        for scheme in ("gs://", "gcs://"):
            if str(path).startswith(scheme):
                path = str(path)[len(scheme):]
        return super()._strip_protocol(path)

    def glob(self, path, **kwargs):
        return [name.lstrip("/") for name in super().glob(path, **kwargs)]


@pytest.fixture
def bucket(monkeypatch, tmp_path):
    """gs:// in memory for the test (emptied after it), and a fresh local cache for remote models."""
    monkeypatch.setitem(_registry, "gcs", MemoryBucket)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    epath.backend.fsspec_backend._get_filesystem.cache_clear()
    yield epath.Path("gs://bucket")
    MemoryBucket.store.clear()
    MemoryBucket.pseudo_dirs[:] = [""]
    epath.backend.fsspec_backend._get_filesystem.cache_clear()


def test_local_paths_stay_pathlib_and_uris_become_epath(tmp_path):
    assert type(as_path(tmp_path / "x")) is type(tmp_path) and type(as_path("relative/x")) is type(tmp_path)
    assert isinstance(as_path("gs://bucket/run"), epath.Path) and str(as_path("gs://bucket/run") / "a.json") == "gs://bucket/run/a.json"
    assert is_remote("s3://b/k") and not is_remote(tmp_path)
    assert local_copy(tmp_path) == tmp_path  # a local path is read where it is


def test_inputs_and_outputs_round_trip_through_the_bucket(bucket, tiny_dro):
    (bucket / "queries").mkdir(parents=True)
    (bucket / "queries" / "harmful.txt").write_text("one\n\ntwo\n")
    assert read_queries("gs://bucket/queries/harmful.txt") == ["one", "two"]
    with pytest.raises(DroJaxError, match="no such query file"):
        read_queries("gs://bucket/queries/missing.txt")

    assert write_text("gs://bucket/run/notes.md", "written whole") == bucket / "run" / "notes.md"
    assert (bucket / "run" / "notes.md").read_text() == "written whole"
    with pytest.raises(DroJaxError, match="is a directory"):
        check_writable("gs://bucket/run")

    rows = np.arange(12, dtype=np.float32).reshape(3, 4)
    save_soft_prompt("gs://bucket/run/soft_prompt.safetensors", rows)  # safetensors writes a local file, uploaded
    np.testing.assert_array_equal(load_soft_prompt("gs://bucket/run/soft_prompt.safetensors"), rows)

    tiny_dro.anchors.save("gs://bucket/run/anchors.safetensors")
    again = AnchorSpace.load("gs://bucket/run/anchors.safetensors")
    np.testing.assert_array_equal(again.basis, tiny_dro.anchors.basis)
    assert again.metadata == tiny_dro.anchors.metadata
    data = AnchorData(np.ones((2, 3), np.float32), np.array([0.0, 1.0]), np.zeros(2), np.array([0, 1]), ["none", "none"])
    data.save(bucket / "run" / "anchor_data.npz")
    np.testing.assert_array_equal(AnchorData.load(bucket / "run" / "anchor_data.npz").states, data.states)
    assert not any(name.endswith(".tmp") for name in MemoryBucket.store)


def test_a_model_in_a_bucket_is_copied_to_the_cache_once_and_loads_like_the_local_one(bucket, tiny_model_dir, tmp_path):
    directory, _ = tiny_model_dir("llama")
    remote = bucket / "models" / "llama"
    remote.mkdir(parents=True)
    for file in directory.iterdir():
        (remote / file.name).write_bytes(file.read_bytes())
    local = load_model(directory, progress=False)
    loaded = load_model("gs://bucket/models/llama", progress=False)
    assert Path(loaded.source).is_relative_to(tmp_path / "cache" / "dro-jax" / "remote")
    jax.tree.map(np.testing.assert_array_equal, local.params, loaded.params)
    assert loaded.tokenizer("a query").input_ids == local.tokenizer("a query").input_ids
    copied = Path(loaded.source) / "config.json"
    stamp = copied.stat().st_mtime_ns
    assert local_copy(remote) == Path(loaded.source) and copied.stat().st_mtime_ns == stamp  # not fetched again
    with pytest.raises(DroJaxError, match="no such file or directory"):
        load_model("gs://bucket/models/missing", progress=False)


def test_the_main_job_writes_into_a_bucket_and_resumes_from_it(bucket, run_args, monkeypatch, tmp_path, capsys):
    """Every output of `dro-jax run --out gs://...` lands in the bucket, with the query files read from it, and a
    second run finds its finished stages there. The
    checkpoints go where orbax puts gs:// paths (its own tensorstore GCS driver, which needs a real bucket): here
    they are redirected to a local directory, and the path they were asked for is checked."""
    import dro_jax.dro.train as train

    asked = []

    def local_checkpoints(directory, keep):
        asked.append(str(directory))
        return train_checkpoints(tmp_path / "checkpoints", keep)

    train_checkpoints = train.TrainCheckpoints
    monkeypatch.setattr(train, "TrainCheckpoints", local_checkpoints)
    args = run_args("gs://bucket/run", "--settings", "none")
    for option in ("--harmful", "--harmless"):
        index = args.index(option) + 1
        remote = bucket / "queries" / Path(args[index]).name
        remote.write_text(Path(args[index]).read_text())
        args[index] = str(remote)
    assert main(args) == 0
    run = bucket / "run"
    assert {p.name for p in run.iterdir()} >= {"config.json", "anchors.safetensors", "soft_prompt.safetensors", "metrics.jsonl",
                                               "results.md", "results.json", "responses.jsonl", "refusals.png", "stages"}
    assert asked == ["gs://bucket/run/checkpoints"]
    assert all(json.loads(p.read_text())["done"] for p in (run / "stages").iterdir())
    results = (run / "results.json").read_text()
    capsys.readouterr()

    assert main(args) == 0  # every stage's record is read back from the bucket: none is redone
    assert capsys.readouterr().err.count("done earlier with the same inputs, skipped") == 3
    assert (run / "results.json").read_text() == results
    assert main([*args, "--max-new-tokens", "5"]) == 2  # the run directory in the bucket is claimed as a local one is
    assert "holds a run with other settings" in capsys.readouterr().err
