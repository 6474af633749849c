"""The `anchor`, `train`, `export` and `evaluate` commands: the DRO stages one at a time."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from dro_jax.cli.args import (
    add_field_arg, add_judge_args, add_mesh_args, add_model_args, add_openings_arg, add_phrases_arg, add_refusal_fit_arg,
    add_refusal_score_arg, add_suffix_arg, check_judge_args, model_judge, positive_int, start_job, suffix_of,
)
from dro_jax.common.errors import DroJaxError
from dro_jax.dro.loss import TERM_ALIASES, LossWeights
from dro_jax.inference.settings import PROMPT_SETTINGS
from dro_jax.run.config import PAPER_TRAINING  # the reference's schedule: the defaults of `dro-jax train`

# `dro-jax train` option -> PromptTuningConfig field; unset options keep the preset's value.
BASELINE_OPTIONS = {
    "pt_responses": "responses", "pt_samples": "samples", "pt_negatives": "negatives", "pt_token_mean": "token_mean",
    "unlikelihood_weight": "unlikelihood_weight", "response_tokens": "max_response_tokens", "epochs": "epochs",
}
# The options that mean nothing without --baseline (--epochs and --response-tokens have uses or defaults of their own).
BASELINE_ONLY = ("pt_paper", "pt_responses", "pt_samples", "pt_negatives", "pt_token_mean", "unlikelihood_weight")
# `dro-jax anchor` / `train` option -> RunConfig field, where the names differ (`evaluate` names its options' fields).
RUN_FIELDS = {"harmful": "harmful_train", "harmless": "harmless_train", "num_samples": "label_samples", "batch_size_eval": "eval_batch_size",
              "lr": "learning_rate"}
# `dro-jax train` options that say where and how it computes, not what (results the same within float rounding) and
# the command's own plumbing: `--resume` may change them.
EXECUTION_OPTIONS = (
    "command", "run", "out", "resume", "attention", "batch_size_eval", "compilation_cache", "precision", "mesh", "dcn_mesh", "microbatch",
    "profile", "coordinator", "num_processes", "process_id",
)


def _add_anchor_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--harmful", default="harmful_train", help="harmful anchor/training queries: a packaged set or a file (default: %(default)s)")
    parser.add_argument("--harmless", default="harmless_train", help="harmless queries, paired with the harmful ones (default: %(default)s)")
    add_field_arg(parser)
    parser.add_argument(
        "--label", choices=("logodds", "sampled"), default="logodds",
        help="refusal label: refusal log-odds (no generation) or the sampled compliance rate (default: %(default)s)",
    )
    add_openings_arg(parser)
    parser.add_argument("--num-samples", type=positive_int, default=5, help="responses per input for --label sampled (default: %(default)s)")
    add_judge_args(parser, "with --label sampled, a response to a harmful query")
    parser.add_argument(
        "--settings", nargs="+", default=list(PROMPT_SETTINGS),
        help="prompt settings whose representations make the anchor space (default: %(default)s)",
    )
    parser.add_argument("--num-components", type=positive_int, default=4, help="PCA components (default: %(default)s)")
    parser.add_argument("--folds", type=positive_int, default=10, help="k-fold splits for the two probes (default: %(default)s)")
    add_refusal_fit_arg(parser, "logistic")
    parser.add_argument("--batch-size-eval", type=positive_int, default=32, help="queries per forward pass when representing (default: %(default)s)")


def add_commands(commands) -> None:
    anchor = commands.add_parser("anchor", help="representations and labels of the anchor queries, PCA space, refusal and harmfulness probes")
    add_model_args(anchor)
    _add_anchor_args(anchor)
    anchor.add_argument("--out", required=True, help="output anchor file (.safetensors)")
    anchor.set_defaults(run=_run_anchor)

    terms = LossWeights.terms()
    train = commands.add_parser("train", help="train a DRO soft prompt (computes the anchor space first unless --anchors is given)")
    add_model_args(train)
    _add_anchor_args(train)
    train.add_argument("--anchors", help="an anchor file from `dro-jax anchor` (default: compute one into the output directory)")
    init = train.add_mutually_exclusive_group()
    init.add_argument(
        "--init-prompt", default="short",
        help=f"start from the token embeddings of this prompt: {', '.join(PROMPT_SETTINGS[1:])} or text (default: %(default)s)",
    )
    init.add_argument("--init-random", type=positive_int, metavar="N", help="start from N random vocabulary embeddings instead")
    train.add_argument("--epochs", type=positive_int, help=f"(default: {PAPER_TRAINING.epochs}; --baseline: 5, the paper's)")
    train.add_argument("--batch-size", type=positive_int, default=PAPER_TRAINING.batch_size, help="(default: %(default)s)")
    train.add_argument("--lr", type=float, default=PAPER_TRAINING.learning_rate, help="AdamW learning rate (default: %(default)s)")
    train.add_argument("--seed", type=int, default=42, help="data order, random init and the sampled label's samples (default: %(default)s)")
    train.add_argument(
        "--loss-weights", type=float, nargs=len(terms), metavar=tuple(t.upper() for t in terms), default=list(LossWeights().as_tuple()),
        help=f"weights of the {', '.join(terms)} terms (default: %(default)s, the paper's)",
    )
    add_refusal_score_arg(train, "probe")
    train.add_argument("--ablate", choices=sorted({*terms, *TERM_ALIASES}), action="append", default=[], help="drop a loss term (repeatable)")
    train.add_argument(
        "--baseline", choices=("prompt-tuning",),
        help="train the vanilla prompt-tuning baseline instead of DRO: likelihood on wanted and unlikelihood on "
        "unwanted sampled responses; the --pt-* options and --unlikelihood-weight shape it",
    )
    baseline = train.add_argument_group("prompt-tuning baseline (with --baseline prompt-tuning; each default is the preset's)")
    baseline.add_argument(
        "--pt-paper", action="store_true", default=None,
        help="the reference's baseline: the 20 longest of 25 responses per query, no-prompt negatives, token-level means, "
        "unlikelihood weight 5 for Llama-2-chat / CodeLlama-Instruct (1 otherwise), 5 epochs; the options below override it",
    )
    baseline.add_argument("--pt-responses", type=positive_int, metavar="N", help="responses per query to train on (default: 2; --pt-paper: 20)")
    baseline.add_argument("--pt-samples", type=positive_int, metavar="N",
                          help="responses sampled per query, of which the --pt-responses longest are kept (default: --pt-responses; --pt-paper: 25)")
    baseline.add_argument("--pt-negatives", action=argparse.BooleanOptionalAction,
                          help="add the unwanted no-prompt responses (compliant answers to harmful queries, refusals of harmless ones) "
                          "as unlikelihood rows (default: off; --pt-paper: on)")
    baseline.add_argument("--pt-token-mean", action=argparse.BooleanOptionalAction,
                          help="average over all scored tokens of the batch (wanted and unwanted rows apart) instead of per "
                          "sequence (default: off; --pt-paper: on)")
    baseline.add_argument("--unlikelihood-weight", type=float, metavar="W", help="weight of the unlikelihood term (default: 1; --pt-paper: 5 or 1 by model)")
    baseline.add_argument("--response-tokens", type=positive_int, default=100, help="responses are cut to this many tokens (default: %(default)s, the reference's)")
    train.add_argument("--checkpoint-every", type=positive_int, default=10, help="steps between checkpoints (default: %(default)s)")
    train.add_argument("--remat", action="store_true", help="recompute activations in the backward pass (less memory, for large models)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.add_argument("--out", required=True, help="run directory: anchors, checkpoints/, metrics.jsonl, soft_prompt.safetensors "
                       "(with several processes, one directory every process reaches)")
    add_mesh_args(train, training=True)
    train.set_defaults(run=_run_train)

    export = commands.add_parser("export", help="write a checkpoint's soft prompt as safetensors (tensor 'soft_prompt' [N, hidden])")
    export.add_argument("--checkpoint", required=True, help="a training run directory or its checkpoints/ directory")
    export.add_argument("--step", type=positive_int, help="which step (default: the latest)")
    export.add_argument("--out", required=True, help="output .safetensors file")
    export.set_defaults(run=_run_export)

    evaluate = commands.add_parser("evaluate", help="greedy refusals, refusal log-odds and refusal-direction shift per prompt setting")
    add_model_args(evaluate)
    # Named as the main job's fields (see `stage_config`): the evaluation is the main job's, on these sets.
    evaluate.add_argument("--harmful", dest="harmful_test", default="harmful_test", help="held-out harmful queries (default: %(default)s)")
    evaluate.add_argument("--harmless", dest="harmless_test", default="harmless_test", help="held-out harmless queries (default: %(default)s)")
    add_field_arg(evaluate)
    evaluate.add_argument(
        "--settings", nargs="+", default=list(PROMPT_SETTINGS),
        help="prompt settings: none, default, short, mistral, soft:FILE or text (default: the four human ones)",
    )
    evaluate.add_argument("--soft-prompt", metavar="FILE", action="append", default=[], help="also evaluate this soft prompt (repeatable)")
    evaluate.add_argument("--anchors", help="anchor file: adds the mean refusal-probe logit and its shift against no prompt")
    add_suffix_arg(evaluate)
    evaluate.add_argument("--max-new-tokens", type=positive_int, default=64, help="greedy response length (default: %(default)s)")
    evaluate.add_argument("--batch-size", dest="eval_batch_size", type=positive_int, default=32, help="(default: %(default)s)")
    add_openings_arg(evaluate)
    add_phrases_arg(evaluate)
    add_judge_args(evaluate, "a response to a --harmful query (harmless ones: the string judge alone)")
    evaluate.add_argument("--out", required=True, help="output .md table; a .csv and a .json with the same rows are written next to it")
    add_mesh_args(evaluate)
    evaluate.set_defaults(run=_run_evaluate)


def stage_config(args: argparse.Namespace, **resolved):
    """The main job's config of what `dro-jax anchor`, `train` or `evaluate` was told (`resolved`: values worked out
    from several options), so that these commands build the anchor space, train and evaluate as the main job's own
    stages do. Options named alike are the same field; a command's missing ones keep RunConfig's defaults, which
    its stages do not read. A sampled label keeps these commands' decoding (`LABEL_SAMPLING`: 10 to 64 new tokens)."""
    from dro_jax.anchors.collect import LABEL_SAMPLING
    from dro_jax.judging.judges import read_judge_template
    from dro_jax.run.config import RunConfig

    fields = {field.name for field in dataclasses.fields(RunConfig)}
    given = {RUN_FIELDS.get(name, name): value for name, value in vars(args).items()}
    given = {name: tuple(value) if isinstance(value, list) else value for name, value in given.items() if name in fields}
    decoding = dict(max_new_tokens_harmful=LABEL_SAMPLING.max_new_tokens, max_new_tokens_harmless=LABEL_SAMPLING.max_new_tokens,
                    min_new_tokens=LABEL_SAMPLING.min_new_tokens)
    return RunConfig(**{**decoding, **given, "judge_template": read_judge_template(args.judge_template), **resolved})


def train_run_config(args: argparse.Namespace, baseline=None):
    """`stage_config` of `dro-jax train`: the epochs trained (the baseline's own, else --epochs or the paper's) and
    the loss weights with the --ablate terms at 0."""
    weights = LossWeights.from_sequence(args.loss_weights).ablate(*args.ablate)
    epochs = baseline.epochs if baseline else args.epochs or PAPER_TRAINING.epochs
    return stage_config(args, epochs=epochs, loss_weights=weights.as_tuple())


def evaluate_run_config(args: argparse.Namespace):
    """`stage_config` of `dro-jax evaluate`: the main job's evaluation of its sets, one greedy reply of
    --max-new-tokens per query."""
    both = dict.fromkeys(("max_new_tokens_harmful", "max_new_tokens_harmless"), args.max_new_tokens)
    return stage_config(args, **both, min_new_tokens=0)


def _build_anchors(args: argparse.Namespace, config, model, pairs, out: Path, mesh=None):
    from dro_jax.anchors.collect import check_judged_label
    from dro_jax.run.pipeline import anchor_stage

    check_judged_label(config.anchor_config(), bool(args.judge_model))
    judge_model = model_judge(args, args.batch_size_eval, mesh, policy=model)
    return anchor_stage(model, config, pairs, out, mesh=mesh, judge_model=judge_model)[0]


def _run_anchor(args: argparse.Namespace) -> None:
    from dro_jax.common.files import check_writable
    from dro_jax.data.queries import QueryPairs
    from dro_jax.loading import load_model

    out = check_writable(args.out)
    pairs = QueryPairs.read(args.harmful, args.harmless, args.field)
    check_judge_args(args)
    config = stage_config(args)
    model = load_model(args.model, args.dtype, attention=args.attention)
    _build_anchors(args, config, model, pairs, out)
    print(f"wrote {out}", file=sys.stderr)


def _run_settings(args: argparse.Namespace) -> dict:
    """Everything that must stay the same for --resume to continue a run: every option but those that say where
    and how the run computes (`EXECUTION_OPTIONS`), so that an option added later counts without being listed."""
    return {key: value for key, value in vars(args).items() if key not in EXECUTION_OPTIONS}


def baseline_config(args: argparse.Namespace):
    """The prompt-tuning baseline's settings: the quick default or, with --pt-paper, the reference's for
    this model, with the options given on the command line on top."""
    from dro_jax.dro.prompt_tuning import PromptTuningConfig

    given = {name: getattr(args, name) for name in BASELINE_OPTIONS if getattr(args, name) is not None}
    if not args.baseline:
        stray = [name for name in BASELINE_ONLY if getattr(args, name) is not None]
        if stray:
            raise DroJaxError(f"--{stray[0].replace('_', '-')} shapes the prompt-tuning baseline: use it with --baseline prompt-tuning")
        return None
    given = {BASELINE_OPTIONS[name]: value for name, value in given.items()}
    return PromptTuningConfig.reference(args.model, **given) if args.pt_paper else PromptTuningConfig(**given)


def _training_in_progress(run_dir: Path) -> str | None:
    return "a training run" if any((run_dir / "checkpoints").glob("*")) else None


def _run_train(args: argparse.Namespace) -> None:
    from dro_jax.anchors.space import AnchorSpace
    from dro_jax.common.run_directory import claim_run_directory
    from dro_jax.data.queries import QueryPairs
    from dro_jax.dro.prompt_tuning import prepare_response_set, prompt_tuning_objective
    from dro_jax.dro.task import TrainingTask
    from dro_jax.dro.train import TrainingFiles, train_soft_prompt
    from dro_jax.inference.batched import Batching
    from dro_jax.loading import load_model, resolve_model_path
    from dro_jax.parallel.distributed import is_writer, process_zero_decides
    from dro_jax.run.pipeline import starting_prompt, train_stage

    baseline = baseline_config(args)
    config = train_run_config(args, baseline)
    pairs = QueryPairs.read(args.harmful, args.harmless, args.field)
    if args.batch_size > len(pairs):
        raise DroJaxError(f"batch size {args.batch_size} is larger than the {len(pairs)} training queries")
    anchors = AnchorSpace.load(args.anchors) if args.anchors else None
    check_judge_args(args)
    resolve_model_path(args.model)  # every input checked before the run directory is made
    mesh = start_job(args)
    settings = {**_run_settings(args), "epochs": config.epochs}  # the count trained: DRO runs made while 40 was --epochs' default resume
    claimed = process_zero_decides(lambda: str(claim_run_directory(args.out, settings, args.resume, _training_in_progress)))
    files = TrainingFiles(claimed, args.profile)
    model = load_model(args.model, args.dtype, attention=args.attention, mesh=mesh)
    if baseline:
        if is_writer():
            print(f"prompt-tuning baseline: {baseline.describe()}", file=sys.stderr)
        initial = starting_prompt(model, config)
        data = prepare_response_set(model, pairs, config.base_prompt, len(initial), baseline, args.seed, Batching(mesh=mesh))
        task = TrainingTask(initial, data, prompt_tuning_objective(model.config, baseline, args.remat, args.microbatch))
        result = train_soft_prompt(model, task, config.train_config(), files, args.resume, mesh=mesh)
    else:
        if anchors is None:
            anchor_path = files.root / "anchors.safetensors"
            built = process_zero_decides(anchor_path.exists)  # before process 0 may write it
            anchors = AnchorSpace.load(anchor_path) if built else _build_anchors(args, config, model, pairs, anchor_path, mesh)
        result = train_stage(model, config, pairs, anchors, files, args.resume, mesh)
    if not is_writer():
        return
    last = result.metrics[-1] if result.metrics else {}
    summary = ", ".join(f"{k} {last[k]:.4g}" for k in result.objective.shown if k in last)
    print(f"trained {result.steps} steps ({summary}); wrote {files.soft_prompt}", file=sys.stderr)


def _run_export(args: argparse.Namespace) -> None:
    from dro_jax.common.files import check_writable
    from dro_jax.common.paths import as_path
    from dro_jax.dro.checkpoints import TrainCheckpoints
    from dro_jax.inference.settings import save_soft_prompt

    out = check_writable(args.out)
    directory = as_path(args.checkpoint)
    if (directory / "checkpoints").is_dir():
        directory = directory / "checkpoints"
    if not directory.is_dir():
        raise DroJaxError(f"{directory}: no such checkpoint directory")
    checkpoints = TrainCheckpoints(directory)
    try:
        state, record = checkpoints.restore(None, checkpoints.resolve_step(args.step))
    finally:
        checkpoints.close()
    soft_prompt = state[0]
    save_soft_prompt(out, soft_prompt, {"step": str(record["step"])})
    print(f"wrote {out}: step {record['step']}, soft prompt {tuple(soft_prompt.shape)}", file=sys.stderr)


def _run_evaluate(args: argparse.Namespace) -> None:
    from dro_jax.anchors.space import AnchorSpace
    from dro_jax.common.files import check_writable
    from dro_jax.common.tables import write_tables
    from dro_jax.data.queries import read_queries
    from dro_jax.evaluation.evaluate import evaluate_settings
    from dro_jax.evaluation.measure import judge_note
    from dro_jax.evaluation.rows import EvalRow, results_markdown
    from dro_jax.inference.batched import Batching
    from dro_jax.inference.settings import SOFT_PREFIX, parse_prompt_setting
    from dro_jax.loading import load_model
    from dro_jax.parallel.distributed import is_writer

    if Path(args.out).suffix != ".md":
        raise DroJaxError(f"--out {args.out}: name the markdown table (.md); the .csv and .json are written beside it")
    out = check_writable(args.out)
    for suffix in (".csv", ".json"):
        check_writable(out.with_suffix(suffix))
    settings = [parse_prompt_setting(spec) for spec in args.settings + [SOFT_PREFIX + p for p in args.soft_prompt]]
    check_judge_args(args)
    config = evaluate_run_config(args)
    datasets = {"harmful": read_queries(config.harmful_test, args.field), "harmless": read_queries(config.harmless_test, args.field)}
    anchors = AnchorSpace.load(args.anchors) if args.anchors else None
    suffix = suffix_of(args)
    if suffix is not None:
        suffix.per_set(datasets)  # a wrong count of per-query suffixes fails before the model loads
    mesh = start_job(args)
    model = load_model(args.model, args.dtype, attention=args.attention, mesh=mesh)
    judge_model = model_judge(args, config.eval_batch_size, mesh, policy=model)
    evaluation = config.evaluation(suffix)
    rows = evaluate_settings(model, datasets, settings, evaluation, anchors, judge_model=judge_model, batching=Batching(config.eval_batch_size, mesh)).rows
    if not is_writer():
        return
    table = results_markdown(rows) + "\n\n" + judge_note(args.judge_model, evaluation.harmful_sets)
    write_tables(out, rows, EvalRow, table)
    print(table)
