"""Query sets: the packaged pairs, the txt/csv/jsonl readers with their errors, and checked harmful/harmless pairs."""

import json

import pytest

from dro_jax.common.errors import DroJaxError
from dro_jax.data import QUERY_SETS
from dro_jax.data.queries import QueryPairs, everyday_queries, read_queries


def test_packaged_sets_are_paired_and_split():
    sets = {name: read_queries(name) for name in QUERY_SETS}
    assert len(sets["harmful_train"]) == len(sets["harmless_train"]) == 100
    assert len(sets["harmful_val"]) == len(sets["harmless_val"]) == 25
    assert len(sets["harmful_test"]) == len(sets["harmless_test"]) >= 100
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


def test_query_pairs_are_checked_once_when_made(tmp_path):
    pairs = QueryPairs(["a", "b"], ["c", "d"])
    assert pairs.queries == ["a", "b", "c", "d"] and len(pairs) == 4
    assert pairs.harmless_flags.tolist() == [0, 0, 1, 1]
    with pytest.raises(DroJaxError, match="same size"):
        QueryPairs(["a", "b"], ["c"])
    with pytest.raises(DroJaxError, match="got 0 harmful"):
        QueryPairs([], ["c"])
    (tmp_path / "h.txt").write_text("x\ny\n", encoding="utf-8")
    with pytest.raises(DroJaxError, match="same size"):
        QueryPairs.read(tmp_path / "h.txt", "harmless_train")
    train = QueryPairs.read("harmful_train", "harmless_train")
    assert len(train.harmful) == 100


def test_everyday_queries_are_fixed_and_varied():
    queries = everyday_queries(24)
    assert queries == everyday_queries(24) and len(set(queries)) == 24


def test_the_packaged_helpful_instructions_are_many_and_distinct():
    instructions = read_queries("helpful_instructions")
    assert len(instructions) >= 50
    assert len({" ".join(i.lower().split()) for i in instructions}) == len(instructions)


def test_the_labelled_replies_are_complete_and_use_the_four_labels():
    """The packaged labelled set (docs/judging.md): distinct ids, every reply labelled, queries from the validation sets."""
    from importlib import resources

    path = resources.files("dro_jax.data") / "labelled_replies.jsonl"
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(records) >= 300 and len({r["id"] for r in records}) == len(records)
    assert {r["label"] for r in records} == {"decline", "comply", "apology-only", "off-topic"}
    validation = set(read_queries("harmful_val")) | set(read_queries("harmless_val"))
    assert all(r["query"] in validation and r["reply"] for r in records)
