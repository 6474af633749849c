"""Numerical parity with transformers on the same weights: every layer, the final states and the logits.

Runs each prompt alone through both implementations (float32) and reports the
worst case over prompts: max absolute difference per layer relative to the layer's
scale, cosine of the final-norm states, max absolute difference of the logits, and
whether the most likely next token agrees.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from dro_jax.bench.common import import_torch, load_torch_model, markdown_table
from dro_jax.bench.forward import benchmark_queries
from dro_jax.loading import load_model
from dro_jax.models import forward
from dro_jax.represent import encode_queries


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--num-prompts", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)


def run(args: argparse.Namespace) -> None:
    torch = import_torch(args.threads)
    model = load_model(args.model, "float32", progress=False)
    torch_model = load_torch_model(model.source, torch)
    queries = benchmark_queries(args.num_prompts)
    half = args.num_prompts // 2
    sequences = encode_queries(model, queries[:half], None).sequences + encode_queries(model, queries[half:], "default").sequences
    run_jax = jax.jit(forward, static_argnames=("config", "output_hidden_states", "output_logits"))
    layers = model.config.num_layers
    layer_error = np.zeros(layers)
    min_cosine, logit_error, top1_last, top1_all, positions = 1.0, 0.0, 0, 0, 0
    for seq in sequences:
        ids = np.array([seq], np.int32)
        ours = run_jax(model.params, model.config, ids, np.ones_like(ids), output_hidden_states=True, output_logits=True)
        with torch.inference_mode():
            theirs = torch_model(input_ids=torch.tensor(ids, dtype=torch.long), output_hidden_states=True)
        for i in range(layers):
            want = theirs.hidden_states[i][0].numpy()
            layer_error[i] = max(layer_error[i], np.abs(np.asarray(ours.hidden_states[i][0]) - want).max() / np.abs(want).max())
        a, b = np.asarray(ours.last_hidden_state[0]), theirs.hidden_states[-1][0].numpy()
        min_cosine = min(min_cosine, float(((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)).min()))
        ours_logits, their_logits = np.asarray(ours.logits[0]), theirs.logits[0].numpy()
        logit_error = max(logit_error, float(np.abs(ours_logits - their_logits).max()))
        top1_last += int(ours_logits[-1].argmax() == their_logits[-1].argmax())
        top1_all += int((ours_logits.argmax(-1) == their_logits.argmax(-1)).sum())
        positions += len(seq)
    print(f"model {model.source}, float32, {len(sequences)} chat-formatted prompts ({positions} positions)\n")
    rows = [
        ["hidden states, worst layer: max abs diff / max abs value", f"{layer_error.max():.1e} (layer {layer_error.argmax()})"],
        ["final-norm states: min cosine over all positions", f"{min_cosine:.7f}"],
        ["logits: max abs diff", f"{logit_error:.1e}"],
        ["next token at the last position agrees", f"{top1_last}/{len(sequences)}"],
        ["argmax agrees over all positions", f"{top1_all}/{positions}"],
    ]
    print(markdown_table(["check", "result"], rows))
