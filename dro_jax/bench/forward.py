"""Forward-pass throughput: dro-jax (jit, batched) vs transformers (batched and one query at a time).

Each row runs the same chat-formatted queries to the last layer's final-norm
hidden states (no logits). dro-jax runs the tokens every query shares (the
template head and the safety prompt) once for all batches; the "every query
whole" row turns that off and does the same work as transformers. "Work" counts the
matmul FLOPs of the real (unpadded) tokens each row computes plus causal
attention, so padding is a cost, not a credit; GFLOP/s is that work per
second, also given as a fraction of the device's matmul peak in the dtype
both sides run in (see `dro_jax.bench.device`: the same device and dtype for
both, bfloat16 on accelerators).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from dro_jax.bench.common import best_of, layer_matmuls_gflops
from dro_jax.bench.device import DTYPES, bench_device
from dro_jax.common.files import write_text
from dro_jax.common.tables import markdown_table
from dro_jax.data.queries import everyday_queries, read_queries
from dro_jax.inference.batched import Batching
from dro_jax.inference.encoding import EncodedQueries, encode_queries
from dro_jax.inference.padding import left_padded_batches
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
    parser.add_argument("--dtype", choices=DTYPES, help="both sides' dtype (default: bfloat16 on accelerators, float32 on CPUs)")
    parser.add_argument("--json", metavar="FILE", help="also write every figure to this JSON file")


def run(args: argparse.Namespace) -> None:
    torch = import_torch(args.threads)
    device = bench_device(torch, args.dtype)
    queries = read_queries(args.queries) if args.queries else everyday_queries(args.num_queries)
    model = load_model(args.model, device.dtype, progress=False)
    config = model.config
    encoded = encode_queries(model, queries, args.system_prompt)
    sequences, shared = encoded.sequences, encoded.prefix_length
    whole = EncodedQueries(sequences, prefix_length=0)
    lengths = np.array([len(s) for s in sequences])
    plain_work = config.pass_flops(lengths) / 1e9
    print(f"model {model.source}: {config.num_parameters / 1e6:.1f}M parameters; {device.describe()}")
    print(f"{len(sequences)} queries, {lengths.sum()} tokens (mean {lengths.mean():.0f}, {shared} shared by all), batch "
          f"{args.batch_size}; XLA sees {os.cpu_count()} cores, PyTorch {args.threads} threads")

    peak = device.peak_gflops
    torch_model = load_torch_model(model.source, torch, device.dtype, device.torch_device)
    batches = list(left_padded_batches(sequences, args.batch_size, model.pad_id))

    def dro_jax_batched():
        return represent_tokens(model, encoded, Batching(args.batch_size, progress=False))

    def dro_jax_whole():
        return represent_tokens(model, whole, Batching(args.batch_size, progress=False))

    def torch_batched():
        out = np.zeros((len(sequences), config.hidden_size), np.float32)
        with torch.inference_mode():
            for batch in batches:
                real = batch.index >= 0
                width = int(batch.attention_mask[real].sum(1).max())  # pad to the batch's longest, not the bucket
                ids = torch.from_numpy(batch.token_ids[real, -width:]).long().to(device.torch_device)
                mask = torch.from_numpy(batch.attention_mask[real, -width:]).long().to(device.torch_device)
                positions = (mask.cumsum(1) - 1).clamp(min=0)
                hidden = torch_model.model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
                out[batch.index[real]] = hidden[:, -1].float().cpu().numpy()
        return out

    def torch_loop():
        with torch.inference_mode():
            for seq in sequences:
                torch_model.model(input_ids=torch.tensor([seq], device=device.torch_device)).last_hidden_state[:, -1]
        device.synchronize(torch)

    def torch_loop_as_reference():
        with torch.inference_mode():
            for seq in sequences:
                torch_model(input_ids=torch.tensor([seq], device=device.torch_device), output_hidden_states=True).hidden_states[-1][:, -1]
        device.synchronize(torch)

    start = time.perf_counter()
    jax_states = dro_jax_batched()
    first_call = time.perf_counter() - start
    whole_states = dro_jax_whole()
    torch_states = torch_batched()
    # Alternate the batched rows so that drifting machine load hits them alike.
    timings = {"jax": [], "whole": [], "torch": []}
    for _ in range(args.repeats):
        timings["jax"].append(best_of(1, dro_jax_batched))
        timings["whole"].append(best_of(1, dro_jax_whole))
        timings["torch"].append(best_of(1, torch_batched))
    rows, figures = [], []

    def row(name: str, seconds: float, work: float, note: str = "") -> None:
        rows.append([name, f"{len(sequences) / seconds:.2f}", f"{work:.0f}", f"{work / seconds:.0f}", f"{work / seconds / peak:.0%}", note])
        figures.append({"implementation": name, "seconds": seconds, "queries_per_second": len(sequences) / seconds, "gflop": work,
                        "gflops": work / seconds, "of_peak": work / seconds / peak, "note": note})

    jax_seconds = statistics.median(timings["jax"])
    row("dro-jax, jit, batched", jax_seconds, config.pass_flops(lengths, shared) / 1e9,
        f"shared prefix run once for all batches; compiling its shapes cost {max(first_call - min(timings['jax']), 0):.1f} s on the first call")
    row("dro-jax, jit, batched, every query whole", statistics.median(timings["whole"]), plain_work, "the same work as transformers")
    row("transformers, batched", statistics.median(timings["torch"]), plain_work,
        f"{torch_model.config._attn_implementation} attention, padded to each batch's longest")
    if not args.skip_loop:
        row("transformers, one query at a time", best_of(1, torch_loop), plain_work, "decoder only, no logits")
        row("transformers, one query at a time, as the reference", best_of(1, torch_loop_as_reference), plain_work,
            "full model: logits and all hidden states")

    def min_cosine(a, b):
        return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())

    typical_rows = args.batch_size * int(np.median([b.token_ids.shape[1] for b in batches]))
    ceiling = layer_matmuls_gflops(config, typical_rows, device.dtype)
    cosines = {"transformers": min_cosine(jax_states, torch_states), "every_query_whole": min_cosine(jax_states, whole_states)}
    print(f"matmul peak ({device.limits_from}): {peak:.0f} GFLOP/s; the model's projections alone at "
          f"{typical_rows} rows: {ceiling:.0f} GFLOP/s ({ceiling / peak:.0%} of peak)")
    print(f"final states, min cosine: dro-jax vs transformers {cosines['transformers']:.6f}, shared prefix vs "
          f"every query whole {cosines['every_query_whole']:.6f} (max abs diff {np.abs(jax_states - whole_states).max():.1e})\n")
    print(markdown_table(["implementation", "queries/s", "work (GFLOP)", "GFLOP/s", "of peak", "note"], rows))
    ratios = {}
    for name, key in (("dro-jax", "jax"), ("dro-jax, every query whole", "whole")):
        ratios[name] = [t / j for j, t in zip(timings[key], timings["torch"])]
        print(f"{name} / transformers batched: {statistics.median(ratios[name]):.2f}x, median of {len(ratios[name])} repeats "
              f"({', '.join(f'{r:.2f}' for r in ratios[name])})")
    if args.json:
        write_text(Path(args.json), json.dumps({
            "device": device.as_dict(), "model": model.source, "queries": len(sequences), "batch_size": args.batch_size,
            "projections_gflops": ceiling, "min_cosine": cosines, "rows": figures, "speedups": ratios,
        }, indent=2))
