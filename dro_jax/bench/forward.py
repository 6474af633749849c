"""Forward-pass throughput: dro-jax (jit, batched) vs transformers (batched and one query at a time).

Each row runs the same chat-formatted queries to the last layer's final-norm
hidden states (no logits). GFLOP/s counts useful work only: matmul FLOPs of
the real (unpadded) tokens plus causal attention, so padding is a cost, not
a credit. Each row is also given as a fraction of the machine's float32 matmul
peak, measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from dro_jax.bench.common import best_of, layer_matmuls_gflops, matmul_peak_gflops
from dro_jax.common.tables import markdown_table
from dro_jax.data.queries import everyday_queries, read_queries
from dro_jax.inference.batching import left_padded_batches
from dro_jax.inference.encoding import encode_queries
from dro_jax.inference.represent import represent_tokens
from dro_jax.loading import load_model
from dro_jax.parity.torch_models import import_torch, load_torch_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--queries", help="query file (default: 64 built-in queries)")
    parser.add_argument("--num-queries", type=int, default=64)
    parser.add_argument("--system-prompt", default="default", help="safety prompt used to format the queries (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="PyTorch threads (XLA uses every core)")
    parser.add_argument("--skip-loop", action="store_true", help="skip the slow one-query-at-a-time row")


def run(args: argparse.Namespace) -> None:
    torch = import_torch(args.threads)
    queries = read_queries(args.queries) if args.queries else everyday_queries(args.num_queries)
    model = load_model(args.model, "float32", progress=False)
    config = model.config
    sequences = encode_queries(model, queries, args.system_prompt).sequences
    lengths = np.array([len(s) for s in sequences])
    useful_flops = sum(config.forward_flops(int(n), int(n * (n + 1) // 2)) for n in lengths)
    print(f"model {model.source}: {config.num_parameters / 1e6:.1f}M parameters, float32")
    print(f"{len(sequences)} queries, {lengths.sum()} tokens (mean {lengths.mean():.0f}), batch {args.batch_size}, "
          f"{useful_flops / 1e9:.1f} GFLOP per pass; XLA sees {os.cpu_count()} cores, PyTorch {args.threads} threads")

    peak = matmul_peak_gflops()
    torch_model = load_torch_model(model.source, torch)
    batches = list(left_padded_batches(sequences, args.batch_size, model.pad_id))

    def dro_jax_batched():
        return represent_tokens(model, sequences, args.batch_size, progress=False)

    def torch_batched():
        out = np.zeros((len(sequences), config.hidden_size), np.float32)
        with torch.inference_mode():
            for batch in batches:
                real = batch.index >= 0
                width = int(batch.attention_mask[real].sum(1).max())  # pad to the batch's longest, not the bucket
                ids = torch.from_numpy(batch.token_ids[real, -width:]).long()
                mask = torch.from_numpy(batch.attention_mask[real, -width:]).long()
                positions = (mask.cumsum(1) - 1).clamp(min=0)
                hidden = torch_model.model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
                out[batch.index[real]] = hidden[:, -1].numpy()
        return out

    def torch_loop():
        with torch.inference_mode():
            for seq in sequences:
                torch_model.model(input_ids=torch.tensor([seq])).last_hidden_state[:, -1]

    def torch_loop_as_reference():
        with torch.inference_mode():
            for seq in sequences:
                torch_model(input_ids=torch.tensor([seq]), output_hidden_states=True).hidden_states[-1][:, -1]

    start = time.perf_counter()
    jax_states = dro_jax_batched()
    first_call = time.perf_counter() - start
    torch_states = torch_batched()
    # Alternate the two batched rows so that drifting machine load hits both alike.
    timings = {"jax": [], "torch": []}
    for _ in range(args.repeats):
        timings["jax"].append(best_of(1, dro_jax_batched))
        timings["torch"].append(best_of(1, torch_batched))
    rows = []

    def row(name: str, seconds: float, note: str = "") -> None:
        gflops = useful_flops / seconds / 1e9
        rows.append([name, f"{len(sequences) / seconds:.2f}", f"{gflops:.0f}", f"{gflops / peak:.0%}", note])

    jax_seconds = min(timings["jax"])
    row("dro-jax, jit, batched", jax_seconds, f"compiling its shapes cost {max(first_call - jax_seconds, 0):.1f} s on the first call")
    row("transformers, batched", min(timings["torch"]), f"{torch_model.config._attn_implementation} attention, padded to each batch's longest")
    if not args.skip_loop:
        row("transformers, one query at a time", best_of(1, torch_loop), "decoder only, no logits")
        row("transformers, one query at a time, as the reference", best_of(1, torch_loop_as_reference), "full model: logits and all hidden states")

    cosine = (jax_states * torch_states).sum(1) / np.linalg.norm(jax_states, axis=1) / np.linalg.norm(torch_states, axis=1)
    typical_rows = args.batch_size * int(np.median([b.token_ids.shape[1] for b in batches]))
    ceiling = layer_matmuls_gflops(config, typical_rows)
    print(f"float32 matmul peak (XLA, best square matmul): {peak:.0f} GFLOP/s; the model's projections alone at "
          f"{typical_rows} rows: {ceiling:.0f} GFLOP/s ({ceiling / peak:.0%} of peak)")
    print(f"dro-jax vs transformers final states: min cosine {cosine.min():.6f}\n")
    print(markdown_table(["implementation", "queries/s", "GFLOP/s", "of peak", "note"], rows))
    print(f"\ndro-jax / transformers batched: {min(timings['torch']) / jax_seconds:.2f}x "
          f"(per repeat: {', '.join(f'{t / j:.2f}' for j, t in zip(timings['jax'], timings['torch']))})")
