"""Generation throughput: dro-jax (jit prefill + while-loop decode with a KV cache) vs transformers `generate`.

Same chat-formatted prompts, greedy and sampled (temperature 1, top-p 0.9,
top-k 50), a fixed number of new tokens (stop tokens are ignored so that every
row makes them all), float32; dro-jax runs the prompts' shared prefix once.
Compile time is reported apart; rows are medians of alternating repeats. Each row also gives its fraction of the relevant limit: at
batch 1, decoding is bound by reading the weights once per token (memory
bandwidth, measured here with a large matrix-vector product); at large batch, by compute (the
float32 matmul peak).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from dro_jax.bench.common import best_of, matmul_peak_gflops
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


def memory_bandwidth_gbs(megabytes: int = 512, repeats: int = 5) -> float:
    """Weight bytes read per second by a large matrix-vector product: the access
    pattern of decoding one token, so the practical limit at batch 1."""
    columns = 4096
    matrix = jnp.ones((megabytes * 2**20 // 4 // columns, columns), jnp.float32)
    vector = jnp.ones((columns,), jnp.float32)
    matvec = jax.jit(jnp.matmul)
    matvec(matrix, vector).block_until_ready()
    seconds = best_of(repeats, lambda: matvec(matrix, vector).block_until_ready())
    return matrix.nbytes / seconds / 1e9


def run(args: argparse.Namespace) -> None:
    torch = import_torch(args.threads)
    model = load_model(args.model, "float32", progress=False)
    torch_model = load_torch_model(model.source, torch)
    config = model.config
    queries = read_queries("harmful_test") + read_queries("harmless_test")
    encoded = encode_queries(model, queries, None)
    greedy = SamplingConfig(max_new_tokens=args.new_tokens)
    peak = matmul_peak_gflops()
    bandwidth = memory_bandwidth_gbs()
    weight_bytes = 4 * config.num_parameters
    print(f"model {model.source}: {config.num_parameters / 1e6:.1f}M parameters, float32 ({weight_bytes / 1e9:.2f} GB of weights)")
    print(f"float32 matmul peak {peak:.0f} GFLOP/s; memory bandwidth {bandwidth:.1f} GB/s "
          f"(a token at batch 1 reads every weight once: at most {bandwidth * 1e9 / weight_bytes:.0f} tokens/s)")
    rows = []
    sampled = dataclasses.replace(REFERENCE_SAMPLING, max_new_tokens=args.new_tokens)
    for batch_size in args.batch_sizes:
        prompts = encoded.select([i % len(encoded) for i in range(batch_size)])
        batch = next(prompts.batches(batch_size, model.pad_id))
        inputs = prompts.model_inputs(batch)
        whole = np.concatenate([np.broadcast_to(prompts.prefix().token_ids, (batch_size, prompts.prefix_length)), batch.token_ids], 1)
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
                    return torch_model.generate(
                        input_ids=torch.from_numpy(np.ascontiguousarray(whole[:, -width:])).long(),
                        attention_mask=torch.from_numpy(np.ascontiguousarray(whole_mask[:, -width:])).long(),
                        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=model.pad_id, **options,
                    )
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
        for kind in ("greedy", "sampled"):
            ratio = seconds[f"transformers, {kind}"] / seconds[f"dro-jax, {kind}"]
            rows.append([str(batch_size), f"dro-jax / transformers, {kind}", f"{ratio:.2f}x", "",
                         f"prompts {prompts.prefix_length} shared + {batch.token_ids.shape[1]} own slots"])
        rows.append([str(batch_size), "dro-jax sampled / greedy", f"{seconds['dro-jax, greedy'] / seconds['dro-jax, sampled']:.2f}x", "",
                     "T 1, top-p 0.9, top-k 50"])
    print()
    print(markdown_table(["batch", "implementation", "new tokens/s (median)", "of the limit", "note"], rows))
