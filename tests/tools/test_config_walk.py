"""`tools/config_walk.py` on the project itself: the main job's config flows one way (no call from a lower layer
into a higher one, not even through a callback), the config object stays in `run/` (lower layers get the
settings objects built from it), and the tool's layers are the import-linter contract's."""

import re
import subprocess
import sys

from processes import REPO


def _walk(*options: str, root=REPO) -> tuple[dict[str, int], list[str], str]:
    """(the four counts by letter, the files entered, the whole report) of a walk over `root` (this checkout)."""
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "config_walk.py"), str(root), *options], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    counts = {m[1]: int(m[2]) for m in re.finditer(r"^\(([a-d])\) [^:]+: (\d+)", done.stdout, re.M)}
    files = re.findall(r"^ +\d+  (dro_jax/\S+\.py)  \[", done.stdout, re.M)
    return counts, files, done.stdout


def test_the_config_flows_one_way_and_its_object_stays_in_the_run_layer():
    broad, broad_files, report = _walk()
    assert "WARNING" not in report, report[:2000]  # layers as .importlinter has them, every file parsed
    assert set(broad) == {"a", "b", "c", "d"} and broad["a"] == len(broad_files) > 20
    assert broad["c"] == 0  # no climb back up through the values derived from the config
    own, own_files, _ = _walk("--object")
    assert own["c"] == own["d"] == 0
    assert "dro_jax/run/pipeline.py" in own_files and all(path.startswith("dro_jax/run/") for path in own_files), own_files


def test_a_call_from_a_lower_layer_into_a_higher_one_is_counted_as_a_climb(tmp_path):
    """The tool sees a climb where there is one: in a three-file tree the pipeline (run/) passes the config to one
    layer, which hands a value read from it to another; common/ handing it up to evaluation/ is one climb, the
    same files the other way round none."""
    for middle, last, climbs in (("common", "evaluation", 1), ("evaluation", "common", 0)):
        root = tmp_path / middle
        modules = {
            "run/pipeline.py": f"from dro_jax.{middle}.settings import read\n\n\ndef run_pipeline(config):\n    return read(config)\n",
            f"{middle}/settings.py": f"from dro_jax.{last}.rows import row\n\n\ndef read(config):\n    return row(config.name)\n",
            f"{last}/rows.py": "def row(name):\n    return [name]\n",
        }
        for path, text in modules.items():
            (root / "dro_jax" / path).parent.mkdir(parents=True, exist_ok=True)
            (root / "dro_jax" / path).write_text(text)
        counts, files, report = _walk(root=root)
        assert sorted(files) == sorted(f"dro_jax/{path}" for path in modules) and counts["c"] == climbs, report
        assert (f"dro_jax/{middle}/settings.py -> dro_jax/{last}/rows.py" in report) == bool(climbs), report
