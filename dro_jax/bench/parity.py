"""Numerical parity with transformers on the same weights: every layer, the final states and the logits.

Runs each prompt alone through both implementations (float32) and prints the
worst case over prompts against its tolerance (`dro_jax.parity.checks`,
shared with `dro-jax compare-torch`): max absolute difference per layer
relative to the layer's scale, the final-norm states, the logits, the KL of
the next-token distributions, and whether the most likely next token agrees.
"""

from __future__ import annotations

import argparse

from dro_jax.loading import load_model
from dro_jax.parity.checks import checks_table, model_checks, model_parity, parity_sequences
from dro_jax.parity.torch_models import import_torch, load_torch_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--num-prompts", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)


def run(args: argparse.Namespace) -> None:
    torch = import_torch(args.threads)
    model = load_model(args.model, "float32", progress=False)
    torch_model = load_torch_model(model.source, torch)
    figures = model_parity(model, torch_model, parity_sequences(model, args.num_prompts))
    print(f"model {model.source}, float32, {figures.num_sequences} chat-formatted prompts ({figures.positions} positions)\n")
    print(checks_table(model_checks(figures)))
