"""Argument helpers that several commands share: number types, model, query, prompt and decoding options.

Commands import what they compute with inside their run functions, so that
building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dro_jax.inference.sampling import REFERENCE_SAMPLING, SamplingConfig
from dro_jax.inference.settings import PROMPT_SETTINGS
from dro_jax.loading.registry import DEFAULT_MODEL, DTYPES
from dro_jax.models.config import ATTENTION_IMPLEMENTATIONS, MATMUL_PRECISIONS


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    return 0 if text.strip() == "0" else positive_int(text)


def add_model_arg(parser: argparse.ArgumentParser, default: str | None = DEFAULT_MODEL) -> None:
    """--model; with `default=None` the option stays unset unless given (a preset fills it in)."""
    shown = "%(default)s" if default else DEFAULT_MODEL
    parser.add_argument("--model", default=default, help=f"'{DEFAULT_MODEL}', a HF model directory or a .gguf file (default: {shown})")


def add_model_args(parser: argparse.ArgumentParser, default: str | None = "float32") -> None:
    """--model, --dtype and --attention (see `add_model_arg` for `default=None`; --attention has no preset)."""
    add_model_arg(parser, DEFAULT_MODEL if default else None)
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=default, help="parameter and activation dtype (default: float32)"
    )
    add_compute_args(parser)


def add_compute_args(parser: argparse.ArgumentParser) -> None:
    """--attention, --precision and --compilation-cache: how the model computes, not what."""
    parser.add_argument(
        "--compilation-cache", metavar="DIR|off",
        help="where compiled XLA programs are kept for the next run, or off "
        "(default: $JAX_COMPILATION_CACHE_DIR, else $XDG_CACHE_HOME/dro-jax/xla, i.e. ~/.cache/dro-jax/xla)",
    )
    parser.add_argument(
        "--precision", choices=tuple(MATMUL_PRECISIONS), default="highest",
        help="float32 matmuls: " + "; ".join(f"{name}: {why}" for name, (_, why) in MATMUL_PRECISIONS.items()) + " (default: %(default)s)",
    )
    parser.add_argument(
        "--attention", choices=tuple(ATTENTION_IMPLEMENTATIONS), default="reference",
        help="how attention is computed, with the same results: "
        + "; ".join(f"{name}: {why.split(';')[0]}" for name, why in ATTENTION_IMPLEMENTATIONS.items()) + " (default: %(default)s)",
    )


def add_field_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--field", help="column (.csv) or field (.jsonl) holding the query (default: query)")


def add_query_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--queries",
        required=True,
        help="a packaged set (harmful_train, harmless_train, harmful_test, harmless_test) or a file: "
        ".txt (one query per line), .csv or .jsonl",
    )
    add_field_arg(parser)


def add_prompt_args(parser: argparse.ArgumentParser) -> None:
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument(
        "--system-prompt",
        default="none",
        help=f"one of {', '.join(PROMPT_SETTINGS)}, or custom text (default: %(default)s)",
    )
    prompt.add_argument(
        "--soft-prompt", metavar="FILE", help="a trained soft prompt (safetensors, tensor 'soft_prompt' [N, hidden]) in the system slot"
    )


def prompt_setting(args: argparse.Namespace):
    """The setting from --system-prompt or --soft-prompt; a soft-prompt file is read (and checked) here."""
    from dro_jax.inference.settings import SOFT_PREFIX, parse_prompt_setting

    return parse_prompt_setting(SOFT_PREFIX + args.soft_prompt if args.soft_prompt else args.system_prompt)


def add_suffix_arg(parser: argparse.ArgumentParser) -> None:
    """--suffix-file: an adversarial suffix on every query (read by `dro_jax.data.suffixes.QuerySuffix.read`)."""
    parser.add_argument(
        "--suffix-file", metavar="FILE",
        help="append an adversarial suffix to every query for generation and the refusal log-odds (judges see the "
        "original query; rows are named 'SETTING + suffix NAME'): .json with a string, a list of strings (one per query) "
        'or {"suffix": ...}; .txt with one line (for every query) or one line per query',
    )


def suffix_of(args: argparse.Namespace):
    """The `QuerySuffix` of --suffix-file, or None."""
    from dro_jax.data.suffixes import QuerySuffix

    return None if args.suffix_file is None else QuerySuffix.read(args.suffix_file)


def add_openings_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--openings", metavar="apologies|declines|decline-replies|FILE",
        help="reply openings of the refusal log-odds (labels, the openings refusal score, the log-odds column): apologies "
        "(\"I'm sorry\", \"I cannot\", ...), declines (first words that say no without apologising), decline-replies (whole "
        'short declines), or a JSON file {"refusal": [...], "compliant": [...]} (default: `run` decline-replies, --paper '
        "and the anchor, train and evaluate commands apologies, the paper's)",
    )


def add_refusal_fit_arg(parser: argparse.ArgumentParser, default: str | None) -> None:
    """--refusal-fit: how the anchor stage fits the refusal direction (`None`: a preset decides)."""
    from dro_jax.anchors.space import REFUSAL_FITS

    parser.add_argument(
        "--refusal-fit", choices=tuple(REFUSAL_FITS), default=default,
        help="how the refusal direction is fitted: " + "; ".join(f"{name}: {text.split('.')[0]}" for name, text in REFUSAL_FITS.items())
        + f" (default: {default or 'the preset'})",
    )


def add_refusal_score_arg(parser: argparse.ArgumentParser, default: str | None) -> None:
    """--refusal-score: what the loss's refusal term reads (`None`: a preset decides)."""
    from dro_jax.dro.loss import REFUSAL_SCORES

    parser.add_argument(
        "--refusal-score", choices=tuple(REFUSAL_SCORES), default=default,
        help="what the refusal term of the loss reads: " + "; ".join(f"{name}: {text.split(':')[0]}" for name, text in REFUSAL_SCORES.items())
        + f" (default: {default or 'the preset'})",
    )


def add_phrases_arg(parser: argparse.ArgumentParser, default: str | None = "dro-jax") -> None:
    """--refusal-phrases: which string judge decides refusals (`None`: a preset decides)."""
    parser.add_argument(
        "--refusal-phrases", metavar="decline|paper|dro-jax|FILE", default=default,
        help="the string judge: decline (explicit declines only: an apology alone is no refusal; docs/judging.md), paper (the "
        "reference's rule: case-sensitive phrases with their exceptions over the first two non-empty lines), dro-jax (this "
        "project's phrases, lower-cased, over the first two paragraphs) or a JSON file "
        '{"refusal": [...], "not_refusal": [...]} read like dro-jax; the decline judge\'s counts are shown beside it anyway'
        + f" (default: {default or 'the preset'})",
    )


def add_judge_args(parser: argparse.ArgumentParser, what: str) -> None:
    """--judge-model and --judge-template; `what` says which responses the judge model judges."""
    parser.add_argument(
        "--judge-model", metavar="MODEL",
        help="a chat model used as safety classifier (LlamaGuard style, one scoring pass per reply: p('unsafe') against p('safe')); "
        f"{what} then complies only if it is not a string-judged refusal, judged unsafe and longer than two lines (the paper's rule "
        "for harmful queries); it may be the --model itself",
    )
    parser.add_argument(
        "--judge-template", metavar="FILE|TEXT",
        help="the judge's prompt, with {query} and {response} in it, sent as one user message (default: the pair as a user / "
        "assistant conversation through the judge's own chat template, which suits LlamaGuard)",
    )


def check_judge_args(args: argparse.Namespace) -> None:
    """Checks the judge options before any work: a template means nothing without a judge model, is rendered once
    (see `dro_jax.judging.templates`), and the judge model must exist."""
    from dro_jax.common.errors import DroJaxError
    from dro_jax.judging.judges import check_judge_template, read_judge_template
    from dro_jax.loading import resolve_model_path

    if args.judge_template is not None and not args.judge_model:
        raise DroJaxError("--judge-template needs --judge-model")
    check_judge_template(read_judge_template(args.judge_template))
    if args.judge_model:
        resolve_model_path(args.judge_model)


def model_judge(args: argparse.Namespace, batch_size: int, mesh=None, policy=None):
    """The judge model of `add_judge_args` (None without --judge-model); `policy` (the loaded --model) is reused
    when the judge is the same model."""
    from dro_jax.judging.judges import ModelJudge, read_judge_template

    check_judge_args(args)
    if not args.judge_model:
        return None
    return ModelJudge.load(
        args.judge_model, read_judge_template(args.judge_template), args.dtype, args.attention, mesh, batch_size,
        None if policy is None else (args.model, policy),
    )


def add_decoding_args(parser: argparse.ArgumentParser, samples_default: int, allow_zero_samples: bool = False) -> None:
    defaults = REFERENCE_SAMPLING
    decoding = parser.add_argument_group(
        f"decoding (default: sampling with temperature {defaults.temperature:g}, top-p {defaults.top_p:g}, top-k {defaults.top_k})"
    )
    decoding.add_argument("--greedy", action="store_true", help="greedy decoding (ignores temperature, top-p, top-k)")
    decoding.add_argument("--temperature", type=float, default=defaults.temperature)
    decoding.add_argument("--top-p", type=float, default=defaults.top_p)
    decoding.add_argument("--top-k", type=int, default=defaults.top_k, help="0 disables the top-k filter")
    decoding.add_argument(
        "--num-samples", type=non_negative_int if allow_zero_samples else positive_int, default=samples_default,
        help="responses per query" + (" (0: log-odds only)" if allow_zero_samples else "") + " (default: %(default)s)",
    )
    decoding.add_argument("--max-new-tokens", type=int, default=64)
    decoding.add_argument("--min-new-tokens", type=int, default=0)
    decoding.add_argument("--seed", type=int, default=0, help="fixes every sample (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="sequences run together (default: %(default)s)")
    add_phrases_arg(parser)


def sampling_config(args: argparse.Namespace) -> SamplingConfig:
    """The decoding options of `add_decoding_args`."""
    return SamplingConfig(
        greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
    )


def add_host_args(parser: argparse.ArgumentParser) -> None:
    """--coordinator, --num-processes, --process-id: one process of a multi-host job."""
    hosts = parser.add_argument_group("multi-host (give all three, or none for one process; start one process per host)")
    hosts.add_argument(
        "--coordinator", metavar="HOST:PORT", help="address of process 0's coordination service, or 'auto' alone where jax "
        "detects the job (TPU pods, SLURM)",
    )
    hosts.add_argument("--num-processes", type=positive_int, help="processes in the job")
    hosts.add_argument("--process-id", type=non_negative_int, help="this process's index; only process 0 writes files")


def add_mesh_args(parser: argparse.ArgumentParser, training: bool = False) -> None:
    """--mesh (and, for training, --microbatch and --profile), and the multi-host options."""
    parser.add_argument(
        "--mesh", metavar="AXIS=N,...",
        help="how the devices of every process are used: sizes of the data, fsdp and model axes, e.g. fsdp=8 or "
        "data=2,model=4; an axis left out is 1, data takes the rest (default: every device on data)",
    )
    parser.add_argument(
        "--dcn-mesh", metavar="AXIS=N,...",
        help="how much of each --mesh axis spans TPU slices (elsewhere: processes), which talk over the slower "
        "data-centre network, e.g. data=2 for two slices; the rest of each axis stays within one (default: laid out by the topology alone)",
    )
    if training:
        parser.add_argument(
            "--microbatch", type=positive_int, metavar="B",
            help="run B rows through the model at a time and accumulate: the same update as the whole batch, less memory",
        )
        parser.add_argument(
            "--profile", metavar="DIR", type=profile_directory,
            help="write a jax.profiler trace of a few training steps into DIR, a local directory (view it in TensorBoard's "
            "profile plugin, or its trace.json.gz in ui.perfetto.dev)",
        )
    add_host_args(parser)


def profile_directory(text: str) -> Path:
    """--profile's directory, checked as the command line is read: local (the profiler writes through the local
    file system), and a writable directory or one that can be made there (the trace makes it)."""
    from dro_jax.common.paths import as_path, is_remote

    path = as_path(text)
    if is_remote(path):
        raise argparse.ArgumentTypeError(f"{text}: the profiler writes local directories only; copy the trace afterwards")
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text}: {existing} is not a writable directory")
    return path


def start_job(args: argparse.Namespace):
    """Joins the multi-host job when asked to, then returns the mesh of `--mesh` (and `--dcn-mesh`) over every
    process's devices, said on stderr where it has more than one."""
    from dro_jax.parallel import distributed
    from dro_jax.parallel.mesh import MeshShape, describe_mesh, make_mesh

    dcn = MeshShape.parse(args.dcn_mesh) if args.dcn_mesh else None  # a typo fails before joining the job
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    mesh = make_mesh(args.mesh, dcn=dcn)
    if mesh.devices.size > 1 and distributed.is_writer():
        print(describe_mesh(mesh), file=sys.stderr)
    return mesh
