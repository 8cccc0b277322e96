import io

import pytest

from producer.sources import Input, iter_sources, read_jsonl, resolve
from shared.errors import ConfigError
from shared.messages import DeadLetter, SourceDoc


def test_directories_globs_and_files_get_stable_relative_ids(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "one.md").write_text("one")
    (tmp_path / "a" / "b" / "two.txt").write_text("two")
    (tmp_path / "a" / ".hidden").write_text("no")
    assert [i.doc_id for i in resolve([str(tmp_path / "a")])] == ["one.md", "b/two.txt"]
    assert [i.doc_id for i in resolve([str(tmp_path / "a" / "**" / "*.txt")])] == ["b/two.txt"]
    assert [i.doc_id for i in resolve([str(tmp_path / "a" / "one.md")])] == ["one.md"]
    assert [i.doc_id for i in resolve([str(tmp_path / "a")], exclude=("*.md",))] == ["b/two.txt"]
    with pytest.raises(ConfigError, match="no such file"):
        resolve([str(tmp_path / "missing")])
    with pytest.raises(ConfigError, match="no file matches"):
        resolve([str(tmp_path / "*.pdf")])


def test_jsonl_bad_lines_are_reported_with_line_numbers_and_good_lines_go_through():
    lines = io.StringIO(
        '{"id": "r1", "text": "one"}\n\nnot json\n{"text": "no id"}\n'
        '{"id": "r2", "text": "two", "metadata": {"k": 1}}\n'
    )
    out = list(read_jsonl(lines, "in.jsonl"))
    assert [o.id for o in out if isinstance(o, SourceDoc)] == ["r1", "r2"]
    assert [(o.doc_id, o.reason) for o in out if isinstance(o, DeadLetter)] == [
        ("in.jsonl:3", "decode_error"),
        ("in.jsonl:4", "decode_error"),
    ]


def test_duplicate_ids_in_one_submission_are_reported(tmp_path):
    f = tmp_path / "recs.jsonl"
    f.write_text('{"id": "x", "text": "first"}\n{"id": "x", "text": "second"}\n')
    out = list(iter_sources([Input("file", str(f), "recs.jsonl")], 1000))
    assert isinstance(out[0], SourceDoc) and out[0].text == "first"
    assert isinstance(out[1], DeadLetter) and "duplicate" in out[1].message


def test_too_large_files_are_not_read(tmp_path):
    f = tmp_path / "big.txt"
    f.write_text("x" * 2000)
    [out] = iter_sources([Input("file", str(f), "big.txt")], 1000)
    assert isinstance(out, DeadLetter) and out.reason == "too_large"
