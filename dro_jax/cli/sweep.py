"""The `sweep` command of `dro-jax`: every model x prompt x query set, over all local devices and, optionally, hosts."""

from __future__ import annotations

import argparse
import sys

from dro_jax.cli.args import (
    add_compute_args, add_field_arg, add_host_args, add_judge_args, add_openings_arg, add_phrases_arg, add_suffix_arg, check_judge_args,
    model_judge, positive_int, start_job, suffix_of,
)
from dro_jax.common.errors import DroJaxError
from dro_jax.inference.sampling import REFERENCE_SAMPLING
from dro_jax.inference.settings import PROMPT_SETTINGS
from dro_jax.loading.registry import DTYPES

SAMPLING_OPTIONS = ("temperature", "top_p", "top_k")  # apply only with --num-samples; defaults from REFERENCE_SAMPLING


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
    add_field_arg(sweep)
    add_suffix_arg(sweep)
    sweep.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="parameter and activation dtype (default: %(default)s)")
    add_compute_args(sweep)
    decoding = sweep.add_argument_group("decoding (default: greedy, one response per query)")
    mode = decoding.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="greedy decoding (the default)")
    mode.add_argument("--num-samples", type=positive_int, help="sample N responses per query instead")
    for flag, kind in (("--temperature", float), ("--top-p", float), ("--top-k", int)):
        default = getattr(REFERENCE_SAMPLING, flag[2:].replace("-", "_"))
        decoding.add_argument(flag, type=kind, help=f"with --num-samples (default: {default})")
    decoding.add_argument("--seed", type=int, default=0, help="with --num-samples: fixes every sample (default: %(default)s)")
    decoding.add_argument("--max-new-tokens", type=positive_int, default=64, help="(default: %(default)s)")
    sweep.add_argument("--batch-size", type=positive_int, default=32, help="sequences run together, rounded up to fill every device (default: %(default)s)")
    add_phrases_arg(sweep)
    add_openings_arg(sweep)
    add_judge_args(sweep, "a response to a query of a harmful set (see --harmful-datasets)")
    sweep.add_argument(
        "--harmful-datasets", nargs="*", metavar="SPEC",
        help="which of --datasets are harmful, i.e. judged by --judge-model with the paper's rule (the others: the string judge "
        "alone); give none to name no set (default: those whose file name starts with 'harmful', e.g. harmful_test)",
    )
    sweep.add_argument("--devices", type=positive_int, metavar="N", help="use only this process's first N devices (default: all)")
    sweep.add_argument(
        "--mesh", metavar="AXIS=N,...", help="how each process's devices are used: data, fsdp and model sizes, e.g. model=4 "
        "(default: all on data); each process evaluates its share of the queries on its own devices (with --span-hosts: "
        "how every device of the job is used)",
    )
    sweep.add_argument(
        "--span-hosts", action="store_true",
        help="place each model on one mesh over every process's devices, its weights split across hosts, and run every "
        "query on it together, as run and evaluate do: for models too large for one host (default: a share of the "
        "queries per process)",
    )
    sweep.add_argument("--dcn-mesh", metavar="AXIS=N,...", help="with --span-hosts: how much of each --mesh axis spans "
                       "TPU slices (elsewhere: processes), e.g. data=2 (default: laid out by the topology alone)")
    add_host_args(sweep)
    sweep.add_argument("--out", required=True, help="output directory: sweep.csv, sweep.md, sweep.json")
    sweep.set_defaults(run=_run_sweep)


def _sweep_config(args: argparse.Namespace):
    """The SweepConfig of the command line, without the judge model, which loads later; its options are checked here."""
    import dataclasses

    from dro_jax.evaluation.evaluate import EvalConfig
    from dro_jax.evaluation.measure import harmful_set_flags
    from dro_jax.evaluation.sweep import SweepConfig, harmful_by_name
    from dro_jax.inference.refusal_score import Openings
    from dro_jax.judging.judges import StringJudge

    given = {name: getattr(args, name) for name in SAMPLING_OPTIONS if getattr(args, name) is not None}
    if args.num_samples is None and given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise DroJaxError(f"{flags} only apply with --num-samples (the default is greedy decoding)")
    check_judge_args(args)
    harmful = harmful_by_name(args.datasets) if args.harmful_datasets is None else tuple(args.harmful_datasets)
    harmful_set_flags(args.datasets, harmful, args.judge_model)
    sampling = dataclasses.replace(REFERENCE_SAMPLING, greedy=args.num_samples is None, max_new_tokens=args.max_new_tokens, **given)
    evaluation = EvalConfig(
        sampling, args.num_samples or 1, seed=args.seed, judge=StringJudge.load(args.refusal_phrases), openings=Openings.load(args.openings),
        harmful_sets=harmful, suffix=suffix_of(args),
    )
    return SweepConfig(evaluation, args.batch_size, args.dtype, args.attention)


def _run_sweep(args: argparse.Namespace) -> None:
    import dataclasses

    import jax

    from dro_jax.data.queries import read_queries
    from dro_jax.evaluation.rows import sweep_markdown
    from dro_jax.evaluation.sweep import run_sweep
    from dro_jax.evaluation.sweep_output import prepare_output_dir, write_sweep
    from dro_jax.inference.settings import parse_prompt_setting
    from dro_jax.parallel import distributed
    from dro_jax.parallel.mesh import MeshShape, local_mesh

    config = _sweep_config(args)  # checks the options before anything loads
    if args.span_hosts and args.devices:
        raise DroJaxError("--devices picks this process's own devices; with --span-hosts every device of the job is used")
    if args.dcn_mesh and not args.span_hosts:
        raise DroJaxError("--dcn-mesh lays out a mesh across hosts: use it with --span-hosts")
    prompts = [parse_prompt_setting(spec) for spec in args.prompts]
    datasets = {spec: read_queries(spec, args.field) for spec in args.datasets}
    shape = MeshShape.parse(args.mesh) if args.mesh else None
    out = prepare_output_dir(args.out) if not args.process_id else None
    if args.span_hosts:
        mesh = start_job(args)
    else:
        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        mesh = local_mesh(args.devices, shape)
    if args.judge_model:
        config = dataclasses.replace(config, judge_model=model_judge(args, args.batch_size, mesh))
    rows = run_sweep(args.models, prompts, datasets, config, mesh)
    if jax.process_index() != 0:
        return
    for model, error in dict.fromkeys((row.model, row.error) for row in rows if row.error):
        print(f"dro-jax: warning: error rows for {model}: {error}", file=sys.stderr)
    paths = write_sweep(rows, out, args.judge_model, config.evaluation.harmful_sets)
    print(sweep_markdown(rows, args.judge_model, config.evaluation.harmful_sets))
    print(f"wrote {', '.join(map(str, paths))}", file=sys.stderr)
