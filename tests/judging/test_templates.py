"""Judge templates: the named fields filled in once, every other brace kept, lookups refused."""

import pytest

from dro_jax.common.errors import DroJaxError
from dro_jax.judging.judges import check_judge_template
from dro_jax.judging.pairwise import check_template
from dro_jax.judging.templates import JudgeTemplate

FIELDS = ("query", "response")


def test_fields_are_filled_and_other_braces_kept():
    template = JudgeTemplate('Q: {query}\nA: {response}\nAnswer as {"verdict": "safe" | "unsafe"}; {0} {} {{x}}', FIELDS)
    text = template.render({"query": "hi {response}", "response": "{query} there"})
    assert text == 'Q: hi {response}\nA: {query} there\nAnswer as {"verdict": "safe" | "unsafe"}; {0} {} {{x}}'


@pytest.mark.parametrize("field", ["{query.__class__}", "{query.__class__.__mro__}", "{response[0]}", "{query!r}", "{response:>9}"])
def test_lookups_conversions_and_formats_are_refused_in_one_line(field):
    with pytest.raises(DroJaxError) as err:
        check_judge_template(f"{{query}} {{response}} {field}")
    message = str(err.value)
    assert "\n" not in message and repr(field) in message and "plain fields {query}, {response}" in message


def test_missing_fields_are_named():
    with pytest.raises(DroJaxError, match="must contain {query}, {response}; it lacks {response}"):
        check_judge_template("only {query}")
    with pytest.raises(DroJaxError, match="pairwise judge template must contain .* it lacks {answer_b}"):
        check_template("{instruction} {answer_a}")
    check_judge_template(None)  # no template: the judge's own chat template
