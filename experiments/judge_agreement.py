"""How well each refusal judge agrees with replies labelled by reading (docs/judging.md).

The labelled set (`dro_jax/data/labelled_replies.jsonl`: real SmolLM2 replies,
each with the label `decline`, `comply`, `apology-only` or `off-topic`) is
split by reply id: in the first batch (ids below 412) the even ids are the
development half (the decline judge's rules were revised against its errors
there) and the odd ids held out; the second batch (ids from 412, drawn under
the objectives that decline most) was labelled after the last revision, so
all of it is held out. For each judge: precision and recall, with 95% Wilson
intervals, of
"refusal" against the label `decline`; for the decline judge also of its
`apology` kind against `apology-only`. A judge model (--judge-model, e.g.
smollm2) is read as a refusal judge: a reply it does not call unsafe counts
as a refusal, which is what the paper's rule makes of it.

    python experiments/judge_agreement.py [--judge-model smollm2] [--out judge_agreement.md]
"""

from __future__ import annotations

import argparse
from typing import Sequence

from common import main_guard, wilson
from dro_jax.common.files import write_text
from dro_jax.common.tables import markdown_table
from dro_jax.evaluation.judge_agreement import LABELS, SECOND_BATCH, Agreement, is_held_out, labelled_replies
from dro_jax.judging.declines import DeclineJudge, ReplyKind
from dro_jax.judging.judges import ModelJudge, StringJudge


def precision_recall(predicted: Sequence[bool], actual: Sequence[bool]) -> tuple[str, str]:
    """Precision and recall as text, with their counts and 95% Wilson intervals."""
    agreement = Agreement.of(predicted, actual)

    def share(total: int) -> str:
        if not total:
            return "n/a (0/0)"
        low, high = wilson(agreement.hits, total)
        return f"{agreement.hits / total:.2f} ({agreement.hits}/{total}; {low:.2f}-{high:.2f})"

    return share(agreement.said), share(agreement.real)


def main() -> None:
    arguments = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    arguments.add_argument("--labelled", help="a labelled reply file (default: the packaged set)")
    arguments.add_argument("--judge-model", help="a chat model as safety judge (e.g. smollm2)")
    arguments.add_argument("--out", help="also write the tables to this markdown file")
    args = arguments.parse_args()
    records = labelled_replies(args.labelled)
    judges = {"decline": DeclineJudge(), "paper": StringJudge.load("paper"), "dro-jax": StringJudge.load("dro-jax")}
    verdicts = {name: judge.refusals([r["query"] for r in records], [r["reply"] for r in records]) for name, judge in judges.items()}
    if args.judge_model:
        model_judge = ModelJudge.load(args.judge_model)
        verdicts[f"judge model {args.judge_model}"] = model_judge.refusals([r["query"] for r in records], [r["reply"] for r in records], progress=True)
    halves = {
        "development (even ids of the first batch)": lambda r: r["id"] < SECOND_BATCH and r["id"] % 2 == 0,
        "held out (odd ids of the first batch)": lambda r: r["id"] < SECOND_BATCH and r["id"] % 2 == 1,
        "held out (second batch)": lambda r: r["id"] >= SECOND_BATCH,
        "every held-out reply": is_held_out,
        "all": lambda r: True,
    }
    rows = []
    for name, said in verdicts.items():
        for half, member in halves.items():
            picked = [i for i, r in enumerate(records) if member(r)]
            precision, recall = precision_recall([said[i] for i in picked], [records[i]["label"] == "decline" for i in picked])
            rows.append([name, half, str(len(picked)), precision, recall])
    decline = DeclineJudge()
    apology_rows = []
    for half, member in halves.items():
        picked = [r for r in records if member(r)]
        precision, recall = precision_recall([decline.kind(r["reply"]) is ReplyKind.APOLOGY for r in picked],
                                                   [r["label"] == "apology-only" for r in picked])
        apology_rows.append(["decline judge, `apology` kind", half, str(len(picked)), precision, recall])
    counts = {label: sum(r["label"] == label for r in records) for label in LABELS}
    by_setting = {}
    for record in records:
        by_setting.setdefault(record["setting"], {label: 0 for label in LABELS})[record["label"]] += 1
    tables = [
        f"Labelled replies: {len(records)} ({', '.join(f'{k} {v}' for k, v in counts.items())}).",
        "",
        markdown_table(["judge", "replies", "n", "precision (refusal = decline)", "recall"], rows),
        "",
        markdown_table(["judge", "replies", "n", "precision (apology = apology-only)", "recall"], apology_rows),
        "",
        markdown_table(["setting", *LABELS], [[s, *map(str, c.values())] for s, c in by_setting.items()]),
    ]
    text = "\n".join(tables)
    print(text)
    if args.out:
        write_text(args.out, text + "\n")


if __name__ == "__main__":
    main_guard(main)
