"""Generation throughput: dro-jax (jit prefill + while-loop decode with a KV cache) vs transformers `generate`.

Same chat-formatted prompts, greedy, a fixed number of new tokens (stop tokens
are ignored so that every row makes them all), float32. Compile time is
reported apart. Each row also gives its fraction of the relevant limit: at
batch 1, decoding is bound by reading the weights once per token (memory
bandwidth, measured here with a large matrix-vector product); at large batch, by compute (the
float32 matmul peak).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp

from dro_jax.bench.common import best_of, matmul_peak_gflops
from dro_jax.common.tables import markdown_table
from dro_jax.data.queries import read_queries
from dro_jax.inference.batching import left_padded_batches
from dro_jax.inference.encoding import encode_queries
from dro_jax.inference.generate import generate_tokens
from dro_jax.inference.sampling import SamplingConfig
from dro_jax.loading import load_model
from dro_jax.parity.torch_models import import_torch, load_torch_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
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
    sequences = encode_queries(model, queries, None).sequences
    sampling = SamplingConfig(max_new_tokens=args.new_tokens)
    peak = matmul_peak_gflops()
    bandwidth = memory_bandwidth_gbs()
    weight_bytes = 4 * config.num_parameters
    print(f"model {model.source}: {config.num_parameters / 1e6:.1f}M parameters, float32 ({weight_bytes / 1e9:.2f} GB of weights)")
    print(f"float32 matmul peak {peak:.0f} GFLOP/s; memory bandwidth {bandwidth:.1f} GB/s "
          f"(a token at batch 1 reads every weight once: at most {bandwidth * 1e9 / weight_bytes:.0f} tokens/s)")
    rows = []
    for batch_size in args.batch_sizes:
        prompts = [sequences[i % len(sequences)] for i in range(batch_size)]
        batch = next(left_padded_batches(prompts, batch_size, model.pad_id))
        prompt_len = batch.token_ids.shape[1]

        def ours():
            return generate_tokens(model.params, model.config, batch.token_ids, batch.attention_mask, [], sampling, pad_id=model.pad_id)  # no stop: all tokens

        def theirs():
            with torch.inference_mode():
                width = int(batch.attention_mask.sum(1).max())
                return torch_model.generate(
                    input_ids=torch.from_numpy(batch.token_ids[:, -width:]).long(),
                    attention_mask=torch.from_numpy(batch.attention_mask[:, -width:]).long(),
                    max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=model.pad_id,
                )

        start = time.perf_counter()
        ours()
        first = time.perf_counter() - start
        theirs()
        timings = {"dro-jax": [], "transformers": []}
        for _ in range(args.repeats):
            timings["dro-jax"].append(best_of(1, ours))
            timings["transformers"].append(best_of(1, theirs))
        new_tokens = batch_size * args.new_tokens
        prefill_tokens = int(batch.attention_mask.sum())
        flops = config.forward_flops(prefill_tokens + new_tokens, 0, with_logits=True) - 2.0 * config.embedding_parameters * prefill_tokens
        for name, seconds in ((k, min(v)) for k, v in timings.items()):
            rate = new_tokens / seconds
            if batch_size == 1:
                limit = f"{rate * weight_bytes / 1e9 / bandwidth:.0%} of bandwidth"
            else:
                limit = f"{flops / seconds / 1e9 / peak:.0%} of compute peak"
            note = f"compile {max(first - seconds, 0):.1f} s" if name == "dro-jax" else ""
            rows.append([str(batch_size), name, f"{rate:.1f}", limit, note])
        ratio = min(timings["transformers"]) / min(timings["dro-jax"])
        rows.append([str(batch_size), "dro-jax / transformers", f"{ratio:.2f}x", "", f"prompt {prompt_len} slots"])
    print()
    print(markdown_table(["batch", "implementation", "new tokens/s", "of the limit", "note"], rows))
