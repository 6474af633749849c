"""Greedy decode speed of two or more dro_jax trees, timed in turns inside one process.

Usage: python tools/decode_in_turns.py TAG=TREE[:BUCKET] ... [--batch N] [--new-tokens T] [--repeats R] [--queries FILE]
       TREE holds the package dro_jax/ (e.g. a `git archive` of an older commit); BUCKET pads the shared prefix
       to a multiple of that many tokens ("none": not padded; default: the tree's own choice).

Separate benchmark runs on a shared 2-core machine drift by 10% and more between runs, which hides a change of
that size. Here every tree is imported into one process (each from its own path, its modules dropped before the
next import), loads SmolLM2 in float32 and compiles its generation once; then each repeat times one call of
every tree in turn (64 new tokens by default, no stop token), so drift hits them alike. Printed: each tree's
tokens/s and its speed relative to the first tree (median and range over the repeats).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import statistics
import sys
import time
from typing import Callable

import jax


def _fresh_import(tree: str, name: str):
    """`name` from the dro_jax under `tree`, whichever dro_jax was imported before."""
    sys.path.insert(0, tree)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(tree)


def decode_call(tree: str, queries: list[str], rows: int, new_tokens: int, bucket: str | None) -> Callable[[], object]:
    """One compiled greedy generation of `rows` queries with the dro_jax under `tree`, ready to time."""
    for module in [m for m in sys.modules if m == "dro_jax" or m.startswith("dro_jax.")]:
        del sys.modules[module]
    model = _fresh_import(tree, "dro_jax.loading").load_model("smollm2", "float32", progress=False)
    encoded = _fresh_import(tree, "dro_jax.inference.encoding").encode_queries(model, queries, None)
    prompts = encoded.select([i % len(queries) for i in range(rows)])
    inputs = prompts.model_inputs(next(prompts.batches(rows, model.pad_id)))
    if bucket is not None:
        padded_prefix = _fresh_import(tree, "dro_jax.models.inputs").padded_prefix
        shared = inputs.prefix
        inputs = inputs._replace(prefix=padded_prefix(shared.tokens, int(shared.soft_offset), None if bucket == "none" else int(bucket)))
    generate_tokens = _fresh_import(tree, "dro_jax.inference.generate").generate_tokens
    sampling = _fresh_import(tree, "dro_jax.inference.sampling").SamplingConfig(max_new_tokens=new_tokens)
    if "inputs" in inspect.signature(generate_tokens).parameters:
        call = lambda: generate_tokens(model.params, model.config, inputs, [], sampling, pad_id=model.pad_id)  # noqa: E731
    else:  # trees from before `ModelInputs` was passed whole
        call = lambda: generate_tokens(  # noqa: E731
            model.params, model.config, inputs.token_ids, inputs.attention_mask, [], sampling, pad_id=model.pad_id, prefix=inputs.prefix
        )
    jax.block_until_ready(call())
    return call


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="+", metavar="TAG=TREE[:BUCKET]")
    parser.add_argument("--batch", type=int, default=1, help="rows per call (default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per row and call (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=15, help="timed turns (default: %(default)s)")
    parser.add_argument("--queries", help="one query per line (default: the first tree's packaged harmful_test)")
    args = parser.parse_args(argv)
    specs = {}
    for spec in args.trees:
        tag, separator, rest = spec.partition("=")
        if not separator:
            parser.error(f"{spec}: expected TAG=TREE[:BUCKET]")
        tree, _, bucket = rest.partition(":")
        specs[tag] = (tree, bucket or None)
    if args.queries:
        with open(args.queries) as handle:
            queries = [line.strip() for line in handle if line.strip()]
    else:
        queries = _fresh_import(next(iter(specs.values()))[0], "dro_jax.data.queries").read_queries("harmful_test")
    calls = {tag: decode_call(tree, queries, args.batch, args.new_tokens, bucket) for tag, (tree, bucket) in specs.items()}
    times = {tag: [] for tag in calls}
    for _ in range(args.repeats):
        for tag, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            times[tag].append(time.perf_counter() - start)
    first = times[next(iter(times))]
    for tag, taken in times.items():
        speed = [a / b for a, b in zip(first, taken)]
        print(f"{tag}: {args.batch * args.new_tokens / statistics.median(taken):.1f} tokens/s (median of {args.repeats}); "
              f"speed relative to the first: median {statistics.median(speed):.3f}, range {min(speed):.3f}-{max(speed):.3f}")


if __name__ == "__main__":
    main()
