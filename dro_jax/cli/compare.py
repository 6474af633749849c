"""The `compare-torch` command of `dro-jax`: parity with transformers/PyTorch on the same weights, in one table.

The figures and tolerances live in `dro_jax.parity.checks` (shared with
the tests and `python -m dro_jax.bench parity`); this module only gathers the
inputs, prints the table and turns a failed check into exit status 1.
"""

from __future__ import annotations

import argparse
import sys

from dro_jax.cli.args import add_model_arg, positive_int
from dro_jax.common.errors import DroJaxError

EXIT_CHECK_FAILED = 1


def add_commands(commands) -> None:
    compare = commands.add_parser(
        "compare-torch",
        help="parity with transformers/PyTorch on the same weights: the model, the DRO loss, its gradient and one "
        "optimizer step, float32 (exit status 1 if a check fails; needs PyTorch)",
    )
    add_model_arg(compare)
    compare.add_argument("--num-prompts", type=positive_int, default=8, help="chat prompts for the model checks, each run alone (default: %(default)s)")
    compare.add_argument(
        "--batch-size", type=positive_int, default=4,
        help="queries in the DRO-loss batch, half from harmful_train and half from harmless_train; even (default: %(default)s)",
    )
    compare.add_argument(
        "--anchors", help="an anchor file from `dro-jax anchor` (default: a random anchor space around the batch's own representations)"
    )
    compare.add_argument("--threads", type=positive_int, default=2, help="PyTorch threads (default: %(default)s)")
    compare.add_argument("--seed", type=int, default=0, help="the soft prompt's noise and the random anchor space (default: %(default)s)")
    compare.set_defaults(run=_run_compare)


def _run_compare(args: argparse.Namespace) -> None:
    """Prints the table; raises SystemExit(1) after it when a check fails."""
    from dro_jax.anchors.space import AnchorSpace
    from dro_jax.data.queries import QueryPairs
    from dro_jax.loading import load_model
    from dro_jax.parity.checks import INIT_PROMPT, checks_table, dro_case, dro_checks, dro_parity, model_checks, model_parity, parity_sequences
    from dro_jax.parity.torch_dro import freeze
    from dro_jax.parity.torch_models import import_torch, load_torch_model

    count, odd = divmod(args.batch_size, 2)
    train = QueryPairs.read("harmful_train", "harmless_train")
    if odd or count > len(train.harmful):
        raise DroJaxError(f"--batch-size must be even and at most {len(train)} (harmful/harmless pairs), got {args.batch_size}")
    torch = import_torch(args.threads, "dro-jax compare-torch")
    anchors = AnchorSpace.load(args.anchors) if args.anchors else None
    model = load_model(args.model, "float32")
    if anchors is not None:
        anchors.check_hidden_size(model.config.hidden_size)
    torch_model = freeze(load_torch_model(model.source, torch))
    model_figures = model_parity(model, torch_model, parity_sequences(model, args.num_prompts))
    case = dro_case(model, torch_model, QueryPairs(train.harmful[:count], train.harmless[:count]), seed=args.seed, anchors=anchors)
    dro_figures = dro_parity(model, torch_model, case)
    checks = model_checks(model_figures) + dro_checks(dro_figures)

    import jax
    import transformers

    print(f"dro-jax vs transformers {transformers.__version__} / torch {torch.__version__} (jax {jax.__version__}), "
          f"{model.source}, float32")
    print(f"model: {model_figures.num_sequences} chat prompts, each alone ({model_figures.positions} positions); "
          f"DRO: {args.batch_size} training queries, soft prompt of {len(case.prompt)} rows ({INIT_PROMPT!r} prompt plus noise), "
          f"{args.anchors or 'random anchor space'}; loss {dro_figures.metrics['loss']:.6f}, gradient norm {dro_figures.grad_norm:.6f}\n")
    print(checks_table(checks))
    failed = sum(not c.passed for c in checks)
    if failed:
        print(f"dro-jax: {failed} of {len(checks)} parity checks failed", file=sys.stderr)
        raise SystemExit(EXIT_CHECK_FAILED)
