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


def test_embedpipeignore_has_gitignore_semantics(tmp_path):
    root = tmp_path / "corpus"
    for path in (
        "a.md",
        "notes.log",
        "keep.log",
        "top.txt",
        "sub/top.txt",
        "build/out.md",
        "sub/build/deep.md",
        "sub/b.md",
        "drafts/x.md",
        "drafts/final.md",
    ):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text("text")
    (root / ".embedpipeignore").write_text(
        "# comments and blank lines are skipped\n\n"
        "*.log\n!keep.log\n"  # negation
        "/top.txt\n"  # anchored: only the root's
        "build/\n"  # a directory, at any depth
        "drafts/*\n!drafts/final.md\n"
    )
    expected = ["a.md", "keep.log", "drafts/final.md", "sub/b.md", "sub/top.txt"]
    assert sorted(i.doc_id for i in resolve([str(root)])) == sorted(expected)
    # the root's file applies to a subdirectory walked and to a glob, not to a file named on its own
    assert [i.doc_id for i in resolve([str(root / "sub")])] == ["sub/b.md", "sub/top.txt"]
    assert [i.doc_id for i in resolve([str(root / "**" / "*.log")])] == ["keep.log"]
    assert [i.doc_id for i in resolve([str(root / "notes.log")])] == ["notes.log"]


def test_ids_are_stable_however_the_path_is_typed(tmp_path, monkeypatch):
    (tmp_path / "docs" / "guide").mkdir(parents=True)
    (tmp_path / "docs" / "a.md").write_text("a")
    (tmp_path / "docs" / "guide" / "b.md").write_text("b")
    monkeypatch.chdir(tmp_path)
    for typed in ("./docs/a.md", "docs/a.md", str(tmp_path / "docs" / "a.md"), "docs/guide/../a.md", "docs//a.md"):
        [item] = resolve([typed])
        assert (item.doc_id, item.root) == ("a.md", str(tmp_path / "docs")), typed
    for typed in ("docs", "./docs/", str(tmp_path / "docs"), "docs/*.md"):
        assert resolve([typed])[0].doc_id == "a.md", typed
    # a .embedpipeignore marks the corpus root: one ID per file, whichever part of it is named
    (tmp_path / "docs" / ".embedpipeignore").write_text("")
    for typed in ("docs", "docs/guide", "docs/guide/b.md", "./docs/guide/*.md", str(tmp_path / "docs/**/b.md")):
        assert [i.doc_id for i in resolve([typed]) if i.doc_id.endswith("b.md")] == ["guide/b.md"], typed
    # --id-prefix, and the root and path in the metadata
    [source] = iter_sources(resolve(["docs/guide/b.md"], id_prefix="wiki/"), 1000)
    assert source.id == "wiki/guide/b.md"
    assert source.metadata == {"path": "guide/b.md", "root": str(tmp_path / "docs")}
    assert [i.doc_id for i in resolve(["docs"], exclude=("guide/*",), id_prefix="wiki/")] == ["wiki/a.md"]


def test_a_corpus_moved_to_another_directory_is_the_same_corpus(tmp_path):
    """The root is recorded in each document's metadata, but it is provenance, not content: the same
    files read from another directory keep their IDs and their content hashes, so a re-run after
    moving (or enqueuing from another checkout) re-embeds nothing."""
    from workers.load import load_batch

    loaded = {}
    for where in ("here", "moved"):
        (tmp_path / where / "sub").mkdir(parents=True)
        (tmp_path / where / "sub" / "a.md").write_text("# Title\n\nA paragraph about tea.\n")
        sources = [s.to_dict() for s in iter_sources(resolve([str(tmp_path / where)]), 1 << 20)]
        docs, dead = load_batch(sources, 1 << 20)
        assert dead == []
        loaded[where] = docs[0]
    here, moved = loaded["here"], loaded["moved"]
    assert here.metadata["root"] != moved.metadata["root"] and here.metadata["path"] == moved.metadata["path"]
    assert (here.id, here.content_hash) == (moved.id, moved.content_hash) == ("sub/a.md", here.content_hash)
