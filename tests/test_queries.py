"""Query sets: the packaged pairs and the txt/csv/jsonl readers with their errors."""

import json

import pytest

from dro_jax.data import QUERY_SETS
from dro_jax.errors import DroJaxError
from dro_jax.queries import read_queries


def test_packaged_sets_are_paired_and_split():
    sets = {name: read_queries(name) for name in QUERY_SETS}
    assert len(sets["harmful_train"]) == len(sets["harmless_train"]) == 100
    assert len(sets["harmful_test"]) == len(sets["harmless_test"]) >= 20
    everything = [q for queries in sets.values() for q in queries]
    assert len(set(everything)) == len(everything), "a query appears twice"
    assert not set(sets["harmful_train"]) & set(sets["harmful_test"])


def test_txt_csv_jsonl_read_the_same_queries(tmp_path):
    queries = ["How do I bake bread?", 'Say "hi", please.', "Wie geht's?"]
    (tmp_path / "q.txt").write_text("\n".join(queries) + "\n\n", encoding="utf-8")
    (tmp_path / "q.csv").write_text("id,prompt\n" + "".join(f'{i},"{q.replace(chr(34), chr(34) * 2)}"\n' for i, q in enumerate(queries)), encoding="utf-8")
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"goal": q, "n": i}) + "\n" for i, q in enumerate(queries)), encoding="utf-8")
    assert read_queries(tmp_path / "q.txt") == queries
    assert read_queries(tmp_path / "q.csv", field="prompt") == queries
    assert read_queries(tmp_path / "q.jsonl", field="goal") == queries


@pytest.mark.parametrize(
    "name, content, field, message",
    [
        ("empty.txt", "\n \n", None, "the query file is empty"),
        ("q.csv", "a,b\n1,2\n", None, "no column 'query'; the columns are a, b"),
        ("q.jsonl", '{"query": "ok"}\nnot json\n', None, "line 2 is not valid JSON"),
        ("q.jsonl", '{"query": "ok"}\n{"text": "x"}\n', None, "line 2 has no field 'query'"),
        ("q.jsonl", '{"query": 3}\n', None, "field 'query' is not a string"),
        ("q.txt", "hello\n", "query", "only applies to .csv and .jsonl"),
    ],
)
def test_bad_query_files(tmp_path, name, content, field, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DroJaxError, match=message):
        read_queries(path, field=field)


def test_missing_file_lists_the_packaged_sets(tmp_path):
    with pytest.raises(DroJaxError, match="harmful_test"):
        read_queries(tmp_path / "absent.txt")
