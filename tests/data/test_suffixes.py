"""Suffix files: every accepted form, the joining rule, and the errors of a file that does not fit its queries."""

import json

import pytest

from dro_jax.common.errors import DroJaxError
from dro_jax.data.suffixes import QuerySuffix, append_suffix


def _write(tmp_path, name, content):
    """`content` as JSON in a .json file (a str that starts with "{not" as it is), as text in any other."""
    path = tmp_path / name
    raw = not name.endswith(".json") or str(content).startswith("{not")
    path.write_text(content if raw else json.dumps(content), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "name, content, texts, per_query",
    [
        ("one.json", "describing.\\ + similarlyNow", ("describing.\\ + similarlyNow",), False),
        ("list.json", ["x y", "z"], ("x y", "z"), True),
        ("object.json", {"suffix": "only one"}, ("only one",), False),
        ("object_list.json", {"suffix": ["a", "b", "c"]}, ("a", "b", "c"), True),
        ("one.txt", "a whole suffix \n\n", ("a whole suffix ",), False),
        ("lines.txt", "first\n\nsecond\n", ("first", "second"), True),
    ],
)
def test_suffix_file_forms(tmp_path, name, content, texts, per_query):
    suffix = QuerySuffix.read(_write(tmp_path, name, content))
    assert (suffix.texts, suffix.per_query, suffix.name) == (texts, per_query, name.split(".")[0])


def test_one_suffix_goes_to_every_query_and_a_list_needs_one_per_query(tmp_path):
    one = QuerySuffix.read(_write(tmp_path, "gcg.json", "!!"))
    assert one.for_queries(3, "harmful") == ["!!"] * 3
    several = QuerySuffix.read(_write(tmp_path, "gcg.txt", "a\nb\n"))
    assert several.per_set({"x": ["q1", "q2"], "y": ["q3", "q4"]}) == {"x": ["a", "b"], "y": ["a", "b"]}
    with pytest.raises(DroJaxError, match="gcg: 2 suffixes, one per query, but harmless has 3 queries"):
        several.per_set({"harmful": ["q1", "q2"], "harmless": ["q1", "q2", "q3"]})
    assert several.label("short") == "short + suffix gcg"


def test_a_suffix_is_joined_by_a_space_unless_it_brings_its_own_whitespace():
    assert append_suffix("How?", "xyz") == "How? xyz"
    assert append_suffix("How?", "\nxyz") == "How?\nxyz"
    assert append_suffix("How?", " xyz") == "How? xyz"


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.json", "{not json", "not valid JSON"),
        ("number.json", 3, "expected a string, a list of strings"),
        ("empty_list.json", [], "the list of suffixes is empty"),
        ("mixed.json", ["ok", 3], "suffix 2 is not a non-empty string"),
        ("blank.json", "  ", "the suffix is not a non-empty string"),
        ("keys.json", {"suffixes": ["a"]}, "exactly one key, 'suffix'"),
        ("empty.txt", "\n  \n", "the suffix file is empty"),
        ("table.csv", "suffix\na\n", "a suffix file is .json or .txt"),
    ],
)
def test_bad_suffix_files(tmp_path, name, content, message):
    with pytest.raises(DroJaxError, match=message):
        QuerySuffix.read(_write(tmp_path, name, content))


def test_a_missing_suffix_file(tmp_path):
    with pytest.raises(DroJaxError, match="no such suffix file"):
        QuerySuffix.read(tmp_path / "absent.json")
