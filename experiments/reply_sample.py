"""Replies to label by reading: a stratified sample of real replies under many prompt settings.

For every setting (no prompt, the human prompts, and the soft prompts given
with --prompt NAME=FILE, e.g. trained by experiments/objectives.py with
several objectives) and both validation sets, one greedy and one sampled
reply (temperature 1, top-p 0.9, top-k 50) per query, 64 new tokens; then
`--per-setting` of them per setting, half to harmful and half to harmless
queries, drawn at random (seeded). The file holds the replies without
labels; docs/judging.md gives the rules by which they are labelled.

    python experiments/reply_sample.py --prompt openings-apologies=experiment-runs/objectives/trained/... --out replies.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np

from common import main_guard
from dro_jax.common.files import write_jsonl
from dro_jax.data.queries import read_queries
from dro_jax.inference.batched import Batching
from dro_jax.inference.encoding import encode_queries
from dro_jax.inference.sampling import REFERENCE_SAMPLING, SamplingConfig
from dro_jax.inference.settings import load_soft_prompt
from dro_jax.inference.settings import PROMPT_SETTINGS, PromptSetting
from dro_jax.judging.responses import generate_responses
from dro_jax.loading import load_model

DECODINGS = {"greedy": SamplingConfig(max_new_tokens=64), "sampled": dataclasses.replace(REFERENCE_SAMPLING, max_new_tokens=64)}


def main() -> None:
    arguments = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    arguments.add_argument("--model", default="smollm2")
    arguments.add_argument("--prompt", action="append", default=[], metavar="NAME=FILE", help="a soft prompt to sample under (repeatable)")
    arguments.add_argument("--sets", nargs=2, default=["harmful_val", "harmless_val"], metavar=("HARMFUL", "HARMLESS"))
    arguments.add_argument("--per-setting", type=int, default=40, help="replies kept per setting (default: %(default)s)")
    arguments.add_argument("--settings", nargs="*", default=list(PROMPT_SETTINGS), help="text settings sampled under (default: %(default)s)")
    arguments.add_argument("--first-id", type=int, default=0, help="the first reply's id (to extend an existing file)")
    arguments.add_argument("--seed", type=int, default=7)
    arguments.add_argument("--out", required=True)
    args = arguments.parse_args()
    model = load_model(args.model)
    settings = [PromptSetting.from_text(name) for name in args.settings]
    for spec in args.prompt:
        name, path = spec.split("=", 1)
        settings.append(PromptSetting.soft(name, load_soft_prompt(path, model.config.hidden_size)))
    rng = np.random.default_rng(args.seed)
    records = []
    for setting in settings:
        pool = {"harmful": [], "harmless": []}
        for kind, name in zip(("harmful", "harmless"), args.sets):
            queries = read_queries(name)
            encoded = encode_queries(model, queries, setting, name)
            for decoding, sampling in DECODINGS.items():
                for reply in generate_responses(model, encoded, sampling, seed=args.seed, batching=Batching(progress=False)):
                    pool[kind].append({"setting": setting.name, "set": name, "kind": kind, "decoding": decoding,
                                       "query": reply.query, "reply": reply.text})
        for kind, replies in pool.items():
            chosen = rng.choice(len(replies), size=min(args.per_setting // 2, len(replies)), replace=False)
            records += [replies[i] for i in sorted(chosen)]
        print(f"{setting.name}: {len(records)} replies so far")
    for number, record in enumerate(records, start=args.first_id):
        record["id"] = number
    write_jsonl(args.out, records)
    print(f"wrote {args.out}: {len(records)} replies ({json.dumps({s.name: args.per_setting for s in settings})})")


if __name__ == "__main__":
    main_guard(main)
