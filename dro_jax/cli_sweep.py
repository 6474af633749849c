"""The `sweep` command of `dro-jax`: every model x prompt x query set, over all local devices and, optionally, hosts."""

from __future__ import annotations

import argparse
import sys

from dro_jax.chat import PROMPT_SETTINGS
from dro_jax.cli import _non_negative_int, _positive_int
from dro_jax.errors import DroJaxError
from dro_jax.loading.registry import DTYPES

SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 0.9, "top_k": 50}


def add_commands(commands) -> None:
    sweep = commands.add_parser(
        "sweep", help="refusal rates and refusal log-odds for every model x prompt setting x query set (multi-device, multi-host)"
    )
    sweep.add_argument("--models", nargs="+", required=True, help="model names, HF model directories or .gguf files")
    sweep.add_argument(
        "--prompts", nargs="+", default=list(PROMPT_SETTINGS),
        help=f"prompt settings: {', '.join(PROMPT_SETTINGS)}, soft:FILE or custom text (default: %(default)s)",
    )
    sweep.add_argument(
        "--datasets", nargs="+", default=["harmful_test", "harmless_test"],
        help="packaged query sets or .txt/.csv/.jsonl files (default: %(default)s)",
    )
    sweep.add_argument("--field", help="column (.csv) or field (.jsonl) holding the query (default: query)")
    sweep.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="parameter and activation dtype (default: %(default)s)")
    decoding = sweep.add_argument_group("decoding (default: greedy, one response per query)")
    mode = decoding.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="greedy decoding (the default)")
    mode.add_argument("--num-samples", type=_positive_int, help="sample N responses per query instead")
    for flag, kind in (("--temperature", float), ("--top-p", float), ("--top-k", int)):
        default = SAMPLING_DEFAULTS[flag[2:].replace("-", "_")]
        decoding.add_argument(flag, type=kind, help=f"with --num-samples (default: {default})")
    decoding.add_argument("--seed", type=int, default=0, help="with --num-samples: fixes every sample (default: %(default)s)")
    decoding.add_argument("--max-new-tokens", type=_positive_int, default=64, help="(default: %(default)s)")
    sweep.add_argument("--batch-size", type=_positive_int, default=32, help="sequences run together, rounded up to fill every device (default: %(default)s)")
    sweep.add_argument("--refusal-phrases", help='JSON file {"refusal": [...], "not_refusal": [...]} for the string judge')
    sweep.add_argument("--openings", help='JSON file {"refusal": [...], "compliant": [...]}: reply openings for the log-odds')
    sweep.add_argument("--devices", type=_positive_int, metavar="N", help="use only this process's first N devices (default: all)")
    hosts = sweep.add_argument_group("multi-host (give all three, or none for one process)")
    hosts.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0's coordination service")
    hosts.add_argument("--num-processes", type=_positive_int, help="processes in the job")
    hosts.add_argument("--process-id", type=_non_negative_int, help="this process's index; only process 0 writes files")
    sweep.add_argument("--out", required=True, help="output directory: sweep.csv, sweep.md, sweep.json")
    sweep.set_defaults(run=_run_sweep)


def _sweep_config(args: argparse.Namespace):
    from dro_jax.generate import SamplingConfig
    from dro_jax.judges import StringJudge
    from dro_jax.refusal_score import Openings
    from dro_jax.sweep import SweepConfig

    given = {name: getattr(args, name) for name in SAMPLING_DEFAULTS if getattr(args, name) is not None}
    if args.num_samples is None and given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise DroJaxError(f"{flags} only apply with --num-samples (the default is greedy decoding)")
    sampling = SamplingConfig(greedy=args.num_samples is None, max_new_tokens=args.max_new_tokens, **{**SAMPLING_DEFAULTS, **given})
    return SweepConfig(
        sampling=sampling, num_samples=args.num_samples or 1, seed=args.seed, batch_size=args.batch_size, dtype=args.dtype,
        openings=Openings.from_file(args.openings) if args.openings else Openings(),
        judge=StringJudge.from_file(args.refusal_phrases) if args.refusal_phrases else None,
    )


def _run_sweep(args: argparse.Namespace) -> None:
    import jax

    from dro_jax import distributed
    from dro_jax.queries import read_queries
    from dro_jax.sharding import local_mesh
    from dro_jax.soft_prompt import parse_prompt_setting
    from dro_jax.sweep import run_sweep
    from dro_jax.sweep_output import prepare_output_dir, sweep_markdown, write_sweep

    config = _sweep_config(args)
    prompts = [parse_prompt_setting(spec) for spec in args.prompts]
    datasets = {spec: read_queries(spec, args.field) for spec in args.datasets}
    out = prepare_output_dir(args.out) if not args.process_id else None
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    rows = run_sweep(args.models, prompts, datasets, config, local_mesh(args.devices))
    if jax.process_index() != 0:
        return
    for model, error in dict.fromkeys((row.model, row.error) for row in rows if row.error):
        print(f"dro-jax: warning: error rows for {model}: {error}", file=sys.stderr)
    paths = write_sweep(rows, out)
    print(sweep_markdown(rows))
    print(f"wrote {', '.join(map(str, paths))}", file=sys.stderr)
