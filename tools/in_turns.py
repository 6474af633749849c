"""The speed of two or more dro_jax trees on one pass, timed in turns inside one process.

Usage: python tools/in_turns.py TAG=TREE[:BUCKET] ... [--pass decode|score] [--setting NAME] [--batch N]
                                [--new-tokens T] [--sample] [--repeats R] [--queries FILE]
       TREE holds the package dro_jax/ (e.g. a `git archive` of an older commit). `decode` (the default): one greedy
       generation of --batch rows, T new tokens each (no stop token); BUCKET pads its shared prefix to a multiple of
       that many tokens ("none": not padded; default: the tree's own choice); --sample decodes with the paper's
       sampling (temperature 1, top-p 0.9, top-k 50) instead of greedily. `score`: the anchor stage's pass,
       `score_refusal` (refusal log-odds and representations) over every query in batches of --batch, the shared
       prefix run as the tree runs it. --setting: the prompt setting of the queries (default: none).

Separate benchmark runs on a shared 2-core machine drift by 10% and more between runs, which hides a change of
that size. Here every tree is imported into one process (each from its own path, its modules dropped before the
next import), loads SmolLM2 in float32 and compiles its pass once; then each repeat times one call of every tree
in turn, so drift hits them alike. Printed: each tree's rate (new tokens/s or queries/s) and its speed relative to
the first tree (median and range over the repeats).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import jax


# The project this tool belongs to: its packaged queries are the default work of every tree (an older tree's
# harmful_test may hold other queries, and fewer).
PROJECT = Path(__file__).resolve().parents[1]


def _fresh_import(tree: str, name: str):
    """`name` from the dro_jax under `tree`, whichever dro_jax was imported before."""
    sys.path.insert(0, tree)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(tree)


def _load(tree: str, queries: list[str], setting: str | None):
    """SmolLM2 and `queries` encoded under `setting` by the dro_jax under `tree`, whichever dro_jax was imported before."""
    for module in [m for m in sys.modules if m == "dro_jax" or m.startswith("dro_jax.")]:
        del sys.modules[module]
    model = _fresh_import(tree, "dro_jax.loading").load_model("smollm2", "float32", progress=False)
    return model, _fresh_import(tree, "dro_jax.inference.encoding").encode_queries(model, queries, setting)


# --sample: the paper's sampling (the work per token of the run's sampled labels and evaluation).
SAMPLED = {"greedy": False, "temperature": 1.0, "top_p": 0.9, "top_k": 50}


def decode_call(
    tree: str, queries: list[str], setting: str | None, rows: int, new_tokens: int, bucket: str | None, sample: bool
) -> Callable[[], object]:
    """One compiled generation of `rows` queries with the dro_jax under `tree` (greedy, or sampled as SAMPLED),
    ready to time."""
    model, encoded = _load(tree, queries, setting)
    prompts = encoded.select([i % len(queries) for i in range(rows)])
    inputs = prompts.model_inputs(next(prompts.batches(rows, model.pad_id)))
    if bucket is not None:
        padded_prefix = _fresh_import(tree, "dro_jax.models.inputs").padded_prefix
        shared = inputs.prefix
        inputs = inputs._replace(prefix=padded_prefix(shared.tokens, int(shared.soft_offset), None if bucket == "none" else int(bucket)))
    generate_tokens = _fresh_import(tree, "dro_jax.inference.generate").generate_tokens
    sampling = _fresh_import(tree, "dro_jax.inference.sampling").SamplingConfig(max_new_tokens=new_tokens, **(SAMPLED if sample else {}))
    if "inputs" in inspect.signature(generate_tokens).parameters:
        call = lambda: generate_tokens(model.params, model.config, inputs, [], sampling, pad_id=model.pad_id)  # noqa: E731
    else:  # trees from before `ModelInputs` was passed whole
        call = lambda: generate_tokens(  # noqa: E731
            model.params, model.config, inputs.token_ids, inputs.attention_mask, [], sampling, pad_id=model.pad_id, prefix=inputs.prefix
        )
    jax.block_until_ready(call())
    return call


def score_call(tree: str, queries: list[str], setting: str | None, batch: int) -> Callable[[], object]:
    """The refusal-score pass over every query with the dro_jax under `tree` (its programs compiled), ready to time."""
    model, encoded = _load(tree, queries, setting)
    score_refusal = _fresh_import(tree, "dro_jax.inference.refusal_score").score_refusal
    if "batching" in inspect.signature(score_refusal).parameters:
        batching = _fresh_import(tree, "dro_jax.inference.batched").Batching(batch, progress=False)
        call = lambda: score_refusal(model, encoded, batching=batching)  # noqa: E731
    else:  # trees from before `Batching`
        call = lambda: score_refusal(model, encoded, batch_size=batch, progress=False)  # noqa: E731
    call()  # its results are host arrays: the pass has finished when it returns
    return call


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="+", metavar="TAG=TREE[:BUCKET]")
    parser.add_argument("--pass", dest="timed", choices=("decode", "score"), default="decode", help="the pass timed (default: %(default)s)")
    parser.add_argument("--setting", help="the queries' prompt setting, e.g. default (default: none)")
    parser.add_argument("--batch", type=int, default=1, help="rows per call (decode) or per batch (score) (default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=64, help="decode: tokens per row and call (default: %(default)s)")
    parser.add_argument("--sample", action="store_true", help="decode: sampled as the paper samples, not greedy")
    parser.add_argument("--repeats", type=int, default=15, help="timed turns (default: %(default)s)")
    parser.add_argument("--queries", help="one query per line (default: this project's packaged harmful_test)")
    args = parser.parse_args(argv)
    specs = {}
    for spec in args.trees:
        tag, separator, rest = spec.partition("=")
        if not separator:
            parser.error(f"{spec}: expected TAG=TREE[:BUCKET]")
        tree, _, bucket = rest.partition(":")
        if bucket and args.timed != "decode":
            parser.error(f"{spec}: a prefix bucket applies to --pass decode only")
        specs[tag] = (tree, bucket or None)
    if args.sample and args.timed != "decode":
        parser.error("--sample applies to --pass decode only")
    if args.queries:
        with open(args.queries) as handle:
            queries = [line.strip() for line in handle if line.strip()]
    else:
        queries = _fresh_import(str(PROJECT), "dro_jax.data.queries").read_queries("harmful_test")
    print(f"{len(queries)} queries ({args.queries or 'harmful_test'}), setting {args.setting or 'none'}, batch {args.batch}, {args.timed} pass"
          + (", sampled (temperature 1, top-p 0.9, top-k 50)" if args.sample else ""))
    if args.timed == "decode":
        calls = {tag: decode_call(tree, queries, args.setting, args.batch, args.new_tokens, bucket, args.sample) for tag, (tree, bucket) in specs.items()}
        work, unit = args.batch * args.new_tokens, "tokens/s"
    else:
        calls = {tag: score_call(tree, queries, args.setting, args.batch) for tag, (tree, _) in specs.items()}
        work, unit = len(queries), "queries/s"
    times = {tag: [] for tag in calls}
    for _ in range(args.repeats):
        for tag, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            times[tag].append(time.perf_counter() - start)
    first = times[next(iter(times))]
    for tag, taken in times.items():
        speed = [a / b for a, b in zip(first, taken)]
        print(f"{tag}: {work / statistics.median(taken):.1f} {unit} (median of {args.repeats}); "
              f"speed relative to the first: median {statistics.median(speed):.3f}, range {min(speed):.3f}-{max(speed):.3f}")


if __name__ == "__main__":
    main()
