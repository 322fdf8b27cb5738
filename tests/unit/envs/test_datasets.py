"""Dataset loaders, bad-row errors, checkpointable order, and the shared benchmark sets."""

import csv
import json
from pathlib import Path

import pytest

from opefo_rllib.envs import DatasetError, ProblemDataset, load_problems
from opefo_rllib.envs.verifier import _parse
from paths import SHARED_BENCHMARKS

BENCHMARKS = SHARED_BENCHMARKS
BENCHMARK_SETS = ["math500", "aime24", "aime25", "amc23", "minerva_math", "olympiadbench"]
ROWS = [{"id": f"q{i}", "problem": f"What is {i}+1?", "answer": str(i + 1), "level": i % 3} for i in range(10)]


def _write_jsonl(path, rows, raw_lines=()):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return path


def test_jsonl_csv_parquet_load_the_same_problems(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = _write_jsonl(tmp_path / "d.jsonl", ROWS)
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(ROWS[0]))
        w.writeheader()
        w.writerows(ROWS)
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    loaded = [load_problems(p) for p in (jsonl, tmp_path / "d.csv", tmp_path / "d.parquet")]
    for lp in loaded:
        assert [(p.id, p.prompt, p.answer) for p in lp.problems] == [(r["id"], r["problem"], r["answer"]) for r in ROWS]
        assert lp.skipped == []
    assert loaded[0].problems[4].meta == {"level": 1}


def test_field_names_are_configurable(tmp_path):
    path = _write_jsonl(tmp_path / "g.jsonl", [{"question": "2+2?", "final": 4}])
    lp = load_problems(path, problem_field="question", answer_field="final", id_field=None)
    assert lp.problems[0].answer == "4" and lp.problems[0].id == "g-1"


def test_a_file_without_an_id_column_is_numbered_by_file_stem_and_line(tmp_path):
    path = _write_jsonl(tmp_path / "mine.jsonl", [{"problem": "1+1", "answer": "2"}, {"problem": "2+2", "answer": 4}])
    assert [p.id for p in load_problems(path).problems] == ["mine-1", "mine-2"]
    with open(tmp_path / "mine.csv", "w") as f:
        f.write("question,final\n3+3,6\n")
    csv_rows = load_problems(tmp_path / "mine.csv", problem_field="question", answer_field="final").problems
    assert [p.id for p in csv_rows] == ["mine-2"]  # the csv line number
    # A column named on purpose must be there: a misspelt id_field is an error, not silent numbering.
    with pytest.raises(DatasetError, match=r"mine.jsonl:1: field 'qid': missing"):
        load_problems(path, id_field="qid")
    # A row that has the id column keeps its id; one with an empty id is a bad row, as before.
    bad = _write_jsonl(tmp_path / "ids.jsonl", [{"id": "a", "problem": "p", "answer": "1"},
                                                {"id": "", "problem": "q", "answer": "2"}])
    with pytest.raises(DatasetError, match=r"ids.jsonl:2: field 'id': empty"):
        load_problems(bad)


def test_hugging_face_dataset_directory(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the `data` extra is not installed")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "hf"))
    lp = load_problems(tmp_path / "hf")
    assert len(lp) == 10 and lp.problems[3].answer == "4"


@pytest.mark.parametrize("bad_line, field, message", [
    ('{"id": "b", "answer": "3"}', "problem", "missing"),
    ('{"id": "b", "problem": "p", "answer": ""}', "answer", "empty"),
    ('{"id": "b", "problem": "p", "answer": [1, 2]}', "answer", "wrong type list"),
    ('{"id": "b", "problem": 7, "answer": "1"}', "problem", "wrong type int"),
    ('{"id": "b", "problem": "p", "answer": true}', "answer", "wrong type bool"),
    ('{"id": "b", "problem": "p", "answer": "1"', None, "invalid JSON"),
    ('["not", "an", "object"]', None, "expected an object"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, bad_line, field, message):
    path = _write_jsonl(tmp_path / "bad.jsonl", ROWS[:3], raw_lines=[bad_line] + [json.dumps(ROWS[3])])
    with pytest.raises(DatasetError) as err:
        load_problems(path)
    assert err.value.source == str(path) and err.value.line == 4 and err.value.field == field
    assert f"{path}:4" in str(err.value) and message in str(err.value)
    if field:
        assert repr(field) in str(err.value)
    lp = load_problems(path, on_bad_row="skip")
    assert len(lp.problems) == 4 and len(lp.skipped) == 1  # skipped and counted, nothing lost silently
    assert lp.skipped[0].line == 4 and message in lp.skipped[0].message


def test_csv_bad_row_reports_its_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("id,problem,answer\na,1+1,2\nb,,3\n")
    with pytest.raises(DatasetError, match=r"bad.csv:3: field 'problem': empty"):
        load_problems(path)


def test_missing_file_and_unknown_format_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_problems(tmp_path / "nope.jsonl", fmt="jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DatasetError, match="cannot tell the format"):
        load_problems(tmp_path / "x.txt")


def _problems(n=7):
    return load_problems(_write_jsonl(Path("/tmp") / f"opefo_ds_{n}.jsonl", ROWS[:n])).problems


def test_dataset_order_is_deterministic_and_covers_each_epoch():
    a, b = ProblemDataset(_problems(), seed=3), ProblemDataset(_problems(), seed=3)
    first = [p.id for p in a.take(21)]
    assert first == [p.id for p in b.take(21)]
    for epoch in range(3):
        assert sorted(first[epoch * 7:(epoch + 1) * 7]) == sorted(r["id"] for r in ROWS[:7])
    assert first[:7] != first[7:14]  # each epoch reshuffles
    assert [p.id for p in ProblemDataset(_problems(), seed=4).take(7)] != first[:7]


def test_dataset_position_round_trips_through_state_dict():
    ds = ProblemDataset(_problems(), seed=1)
    ds.take(10)
    state = json.loads(json.dumps(ds.state_dict()))  # must survive a JSON checkpoint
    expected = [p.id for p in ds.take(9)]
    resumed = ProblemDataset(_problems(), seed=99)
    resumed.load_state_dict(state)
    assert [p.id for p in resumed.take(9)] == expected
    with pytest.raises(ValueError, match="different dataset"):
        ProblemDataset(_problems(5)).load_state_dict(state)
    with pytest.raises(KeyError, match="position"):
        ProblemDataset(_problems()).load_state_dict({k: v for k, v in state.items() if k != "position"})


def _reference_parses(answer: str) -> bool:
    parsed = _parse(answer, 5)
    return bool(parsed) and not isinstance(parsed[0], str)


def test_benchmark_sets_load_and_every_reference_answer_parses(capsys):
    """Loads the six benchmark sets through the loaders; lists every answer math-verify cannot
    parse into a mathematical object (those can only match by string comparison)."""
    sizes = {"math500": 500, "aime24": 30, "aime25": 30, "amc23": 40, "minerva_math": 272, "olympiadbench": 675}
    unparsable = {}
    for name in BENCHMARK_SETS:
        lp = load_problems(BENCHMARKS / f"{name}.jsonl")
        assert len(lp.problems) == sizes[name] and not lp.skipped
        unparsable[name] = [(p.id, p.answer) for p in lp.problems if not _reference_parses(p.answer)]
    with capsys.disabled():
        for name, bad in unparsable.items():
            print(f"\n{name}: {sizes[name] - len(bad)}/{sizes[name]} reference answers parse", end="")
            for pid, ans in bad:
                print(f"\n  does not parse: {pid}: {ans!r}", end="")
        print()
    # Competition answers (AIME, AMC) are integers: all must parse.
    assert not unparsable["aime24"] and not unparsable["aime25"] and not unparsable["amc23"]
    total = sum(sizes.values())
    assert sum(map(len, unparsable.values())) <= 0.02 * total, unparsable
