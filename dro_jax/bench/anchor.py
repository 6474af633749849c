"""Anchor-stage throughput: representations and refusal log-odds of the anchor inputs, dro-jax vs transformers.

The anchor stage of `dro-jax run` (log-odds label) runs every anchor query
under every prompt setting (none / default / short / mistral x harmful_train +
harmless_train: 800 inputs) and needs, per input, its final-norm state at the
last position and the log-probability of each reply opening. Both sides do the
same thing: one batched pass over the prompts with a KV cache, the openings
continued from that cache (transformers: `DynamicCache.batch_repeat_interleave`).
dro-jax runs the part every input of a setting shares (template head and safety
prompt) once per pass; transformers runs every input whole, padded to its
batch's longest. The figures are inputs per second, median of the repeats,
which alternate between the two sides, and the fraction of the device's
matmul peak each side's work reaches; both sides run on the device JAX uses,
in one dtype (see `dro_jax.bench.device`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from dro_jax.bench.common import best_of
from dro_jax.bench.device import DTYPES, bench_device
from dro_jax.common.files import write_text
from dro_jax.common.tables import markdown_table
from dro_jax.data.queries import read_queries
from dro_jax.inference.batched import Batching
from dro_jax.inference.encoding import encode_queries
from dro_jax.inference.padding import left_padded_batches
from dro_jax.inference.refusal_score import Openings, score_refusal
from dro_jax.inference.settings import PROMPT_SETTINGS
from dro_jax.loading import load_model
from dro_jax.parity.torch_models import import_torch, load_torch_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--num-queries", type=int, default=100, help="harmful/harmless training pairs per setting (default: all 100)")
    parser.add_argument("--batch-size", type=int, default=32, help="inputs per batch, both sides (default: %(default)s, the run's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="PyTorch threads (XLA uses every core)")
    parser.add_argument("--settings", nargs="+", default=list(PROMPT_SETTINGS), help="prompt settings (default: the run's four)")
    parser.add_argument("--dtype", choices=DTYPES, help="both sides' dtype (default: bfloat16 on accelerators, float32 on CPUs)")
    parser.add_argument("--json", metavar="FILE", help="also write every figure to this JSON file")


def torch_refusal_scores(torch_model, torch, sequences, openings: Openings, tokenizer, batch_size: int, pad_id: int, device: str = "cpu"):
    """(states [n, h], log-odds [n]) with transformers on `device`: prompts batched with a cache, the openings
    continued from it."""
    texts = openings.refusal + openings.compliant
    endings = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
    span, count = max(map(len, endings)), len(endings)
    ending_ids = torch.tensor([e + [0] * (span - len(e)) for e in endings], device=device)
    ending_mask = torch.tensor([[1] * len(e) + [0] * (span - len(e)) for e in endings], device=device)
    states = np.zeros((len(sequences), torch_model.config.hidden_size), np.float32)
    log_odds = np.zeros(len(sequences))
    with torch.inference_mode():
        for batch in left_padded_batches(sequences, batch_size, pad_id):
            real = batch.index >= 0
            width = int(batch.attention_mask[real].sum(1).max())
            ids = torch.from_numpy(batch.token_ids[real, -width:]).long().to(device)
            mask = torch.from_numpy(batch.attention_mask[real, -width:]).long().to(device)
            rows = len(ids)
            out = torch_model.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0), use_cache=True)
            last = out.last_hidden_state[:, -1]
            first = torch.log_softmax(torch_model.lm_head(last).float(), -1)  # [rows, vocab]
            cache = out.past_key_values
            cache.batch_repeat_interleave(count)
            tiled = ending_ids.repeat(rows, 1)  # row i * count + j: prompt i, opening j
            lengths = mask.sum(1).repeat_interleave(count)
            full_mask = torch.cat([mask.repeat_interleave(count, 0), torch.ones(rows * count, span, dtype=mask.dtype, device=device)], 1)
            rest = torch_model(input_ids=tiled, attention_mask=full_mask, position_ids=lengths[:, None] + torch.arange(span, device=device)[None],
                               cache=cache, use_cache=False).logits[:, :-1].float().log_softmax(-1)
            first_token = first.repeat_interleave(count, 0).gather(1, tiled[:, :1])[:, 0]
            later = rest.gather(2, tiled[:, 1:, None])[..., 0] * ending_mask.repeat(rows, 1)[:, 1:]
            scores = (first_token + later.sum(1)).reshape(rows, count)
            refusal, compliant = scores[:, : len(openings.refusal)], scores[:, len(openings.refusal) :]
            states[batch.index[real]] = last.float().cpu().numpy()
            log_odds[batch.index[real]] = (torch.logsumexp(refusal, 1) - torch.logsumexp(compliant, 1)).cpu().numpy()
    return states, log_odds


def run(args: argparse.Namespace) -> None:
    torch = import_torch(args.threads)
    device = bench_device(torch, args.dtype)
    model = load_model(args.model, device.dtype, progress=False)
    queries = read_queries("harmful_train")[: args.num_queries] + read_queries("harmless_train")[: args.num_queries]
    encoded = {setting: encode_queries(model, queries, setting) for setting in args.settings}
    inputs = len(queries) * len(encoded)
    tokens = sum(len(s) for e in encoded.values() for s in e.sequences)
    shared = ", ".join(f"{name} {e.prefix_length}" for name, e in encoded.items())
    print(f"model {model.source}: {model.config.num_parameters / 1e6:.1f}M parameters; {device.describe()}")
    print(f"{inputs} anchor inputs ({len(encoded)} settings x {len(queries)} queries), {tokens} tokens; shared tokens per "
          f"setting: {shared}; batch {args.batch_size}; XLA sees {os.cpu_count()} cores, PyTorch {args.threads} threads")
    torch_model = load_torch_model(model.source, torch, device.dtype, device.torch_device)
    openings = Openings()

    def ours():
        return {name: score_refusal(model, e, openings, Batching(args.batch_size, progress=False)) for name, e in encoded.items()}

    def theirs():
        return {name: torch_refusal_scores(torch_model, torch, e.sequences, openings, model.tokenizer, args.batch_size, model.pad_id,
                                           device.torch_device) for name, e in encoded.items()}

    start = time.perf_counter()
    jax_out = ours()
    first = time.perf_counter() - start
    torch_out = theirs()
    timings = {"dro-jax": [], "transformers": []}
    for _ in range(args.repeats):
        timings["dro-jax"].append(best_of(1, ours))
        timings["transformers"].append(best_of(1, theirs))
    log_odds_diff = max(float(np.abs(jax_out[n].log_odds - torch_out[n][1]).max()) for n in encoded)
    cosine = min(float(((jax_out[n].states * torch_out[n][0]).sum(1) / np.linalg.norm(jax_out[n].states, axis=1)
                        / np.linalg.norm(torch_out[n][0], axis=1)).min()) for n in encoded)
    print(f"dro-jax vs transformers: refusal log-odds max abs diff {log_odds_diff:.1e}, states min cosine {cosine:.6f}")
    print(f"matmul peak ({device.limits_from}): {device.peak_gflops:.0f} GFLOP/s\n")
    # The prompts' forward work (the openings' few tokens left out): dro-jax's with each setting's shared prefix once.
    whole = sum(model.config.pass_flops(np.array([len(s) for s in e.sequences])) / 1e9 for e in encoded.values())
    shared_once = sum(model.config.pass_flops(np.array([len(s) for s in e.sequences]), e.prefix_length) / 1e9 for e in encoded.values())
    rows, figures = [], []
    for name, work, note in (
        ("dro-jax", shared_once, f"shared prefix once per setting; compile {max(first - min(timings['dro-jax']), 0):.1f} s on the first call"),
        ("transformers", whole, f"{torch_model.config._attn_implementation} attention, each input whole, padded to its batch's longest"),
    ):
        seconds = statistics.median(timings[name])
        rows.append([name, f"{inputs / seconds:.1f}", f"{seconds:.1f}", f"{work / seconds:.0f}", f"{work / seconds / device.peak_gflops:.0%}", note])
        figures.append({"implementation": name, "seconds": seconds, "inputs_per_second": inputs / seconds, "gflop": work,
                        "gflops": work / seconds, "of_peak": work / seconds / device.peak_gflops, "note": note})
    print(markdown_table(["implementation", "inputs/s", "seconds (median)", "GFLOP/s", "of peak", "note"], rows))
    ratios = [t / j for j, t in zip(timings["dro-jax"], timings["transformers"])]
    print(f"\ndro-jax / transformers: {statistics.median(ratios):.2f}x, median of {len(ratios)} repeats ({', '.join(f'{r:.2f}' for r in ratios)})")
    if args.json:
        write_text(Path(args.json), json.dumps({
            "device": device.as_dict(), "model": model.source, "inputs": inputs, "batch_size": args.batch_size,
            "log_odds_max_abs_diff": log_odds_diff, "states_min_cosine": cosine, "rows": figures, "speedups": ratios,
        }, indent=2))
