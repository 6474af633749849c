"""Generation throughput: dro-jax (jit prefill + while-loop decode with a KV cache) vs transformers `generate`.

Same chat-formatted prompts, greedy and sampled (temperature 1, top-p 0.9,
top-k 50), a fixed number of new tokens (stop tokens are ignored so that every
row makes them all), both sides on the device JAX uses and in one dtype
(bfloat16 on accelerators, float32 on CPUs: `dro_jax.bench.device`); dro-jax
runs the prompts' shared prefix once. Compile time is reported apart; rows are
medians of alternating repeats. Each row also gives its fraction of the
relevant limit: at batch 1, decoding is bound by reading the weights once per
token (memory bandwidth); at large batch, by compute (the matmul peak).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from dro_jax.bench.common import best_of
from dro_jax.bench.device import DTYPES, bench_device
from dro_jax.common.files import write_text
from dro_jax.common.tables import markdown_table
from dro_jax.data.queries import read_queries
from dro_jax.inference.encoding import encode_queries
from dro_jax.inference.generate import generate_tokens
from dro_jax.inference.sampling import REFERENCE_SAMPLING, SamplingConfig
from dro_jax.loading import load_model
from dro_jax.parity.torch_models import import_torch, load_torch_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--dtype", choices=DTYPES, help="both sides' dtype (default: bfloat16 on accelerators, float32 on CPUs)")
    parser.add_argument("--queries", help="query file (default: the packaged held-out sets)")
    parser.add_argument("--json", metavar="FILE", help="also write every figure to this JSON file")


def run(args: argparse.Namespace) -> None:
    torch = import_torch(args.threads)
    device = bench_device(torch, args.dtype)
    model = load_model(args.model, device.dtype, progress=False)
    torch_model = load_torch_model(model.source, torch, device.dtype, device.torch_device)
    config = model.config
    queries = read_queries(args.queries) if args.queries else read_queries("harmful_test") + read_queries("harmless_test")
    encoded = encode_queries(model, queries, None)
    greedy = SamplingConfig(max_new_tokens=args.new_tokens)
    peak, bandwidth = device.peak_gflops, device.bandwidth_gbs
    weight_bytes = jnp.dtype(device.dtype).itemsize * config.num_parameters
    print(f"model {model.source}: {config.num_parameters / 1e6:.1f}M parameters ({weight_bytes / 1e9:.2f} GB of weights); {device.describe()}")
    print(f"a token at batch 1 reads every weight once: at most {bandwidth * 1e9 / weight_bytes:.0f} tokens/s")
    rows, figures = [], []
    sampled = dataclasses.replace(REFERENCE_SAMPLING, max_new_tokens=args.new_tokens)
    for batch_size in args.batch_sizes:
        prompts = encoded.select([i % len(encoded) for i in range(batch_size)])
        batch = next(prompts.batches(batch_size, model.pad_id))
        inputs = prompts.model_inputs(batch)
        whole = np.concatenate([np.broadcast_to(prompts.prefix().tokens, (batch_size, prompts.prefix_length)), batch.token_ids], 1)
        whole_mask = np.concatenate([np.ones((batch_size, prompts.prefix_length), np.int32), batch.attention_mask], 1)
        width = int(whole_mask.sum(1).max())

        def ours(sampling):
            return lambda: generate_tokens(  # no stop token: every row makes every token
                model.params, model.config, inputs, [], sampling, pad_id=model.pad_id
            )

        def theirs(sample):
            def call():
                with torch.inference_mode():
                    options = dict(do_sample=True, temperature=1.0, top_p=0.9, top_k=50) if sample else dict(do_sample=False)
                    tokens = torch_model.generate(
                        input_ids=torch.from_numpy(np.ascontiguousarray(whole[:, -width:])).long().to(device.torch_device),
                        attention_mask=torch.from_numpy(np.ascontiguousarray(whole_mask[:, -width:])).long().to(device.torch_device),
                        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=model.pad_id, **options,
                    )
                device.synchronize(torch)
                return tokens
            return call

        calls = {"dro-jax, greedy": ours(greedy), "transformers, greedy": theirs(False),
                 "dro-jax, sampled": ours(sampled), "transformers, sampled": theirs(True)}
        compile_seconds = {}
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            compile_seconds[name] = time.perf_counter() - start
        timings = {name: [] for name in calls}
        for _ in range(args.repeats):  # alternate, so that drifting load hits every row alike
            for name, call in calls.items():
                timings[name].append(best_of(1, call))
        new_tokens = batch_size * args.new_tokens
        prefill_tokens = int(whole_mask.sum())
        flops = config.forward_flops(prefill_tokens + new_tokens, 0, with_logits=True) - 2.0 * config.embedding_parameters * prefill_tokens
        seconds = {name: statistics.median(times) for name, times in timings.items()}
        for name, taken in seconds.items():
            rate = new_tokens / taken
            if batch_size == 1:
                limit = f"{rate * weight_bytes / 1e9 / bandwidth:.0%} of bandwidth"
            else:
                limit = f"{flops / taken / 1e9 / peak:.0%} of compute peak"
            note = f"compile {max(compile_seconds[name] - min(timings[name]), 0):.1f} s" if name.startswith("dro-jax") else ""
            rows.append([str(batch_size), name, f"{rate:.1f}", limit, note])
            figures.append({"batch": batch_size, "implementation": name, "seconds": taken, "new_tokens_per_second": rate,
                            "of_bandwidth": rate * weight_bytes / 1e9 / bandwidth, "of_compute_peak": flops / taken / 1e9 / peak,
                            "first_call_seconds": compile_seconds[name]})
        for kind in ("greedy", "sampled"):
            ratio = seconds[f"transformers, {kind}"] / seconds[f"dro-jax, {kind}"]
            rows.append([str(batch_size), f"dro-jax / transformers, {kind}", f"{ratio:.2f}x", "",
                         f"prompts {prompts.prefix_length} shared + {batch.token_ids.shape[1]} own slots"])
        rows.append([str(batch_size), "dro-jax sampled / greedy", f"{seconds['dro-jax, greedy'] / seconds['dro-jax, sampled']:.2f}x", "",
                     "T 1, top-p 0.9, top-k 50"])
    print()
    print(markdown_table(["batch", "implementation", "new tokens/s (median)", "of the limit", "note"], rows))
    if args.json:
        write_text(Path(args.json), json.dumps({
            "device": device.as_dict(), "model": model.source, "new_tokens": args.new_tokens, "weight_bytes": weight_bytes, "rows": figures,
        }, indent=2))
