"""Tests of smviz.data.world: determinism, population structure, text constraints checked on the
generated texts (held-out questions never in training text), and the on-disk contract of a world dir."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from smviz.data.facts import read_facts
from smviz.errors import ConfigError, InputError, WriteError
from smviz.data.world import (
    FAMOUS_NAMES,
    FIRST_NAMES,
    MAX_PEOPLE,
    POPULATION_FILES,
    POPULATIONS,
    RELATION_NAMES,
    RELATIONS,
    SURNAMES,
    World,
    WorldConfig,
    _draw_names,
    generate_world,
    read_world,
    world_fingerprint,
    write_world,
)
from smviz.errors import SmvizError

LABELS = {"birthplace": "GPE", "university": "ORG", "employer": "ORG", "occupation": None, "birth_year": "DATE"}
PRONOUNS = re.compile(r"\b(he|she|him|his|her|hers|they|them|their|theirs)\b", re.IGNORECASE)


@pytest.fixture(scope="module")
def world() -> World:
    return generate_world(WorldConfig())


def small(seed: int = 0, **kw) -> World:
    return generate_world(WorldConfig(seed=seed, n_known=4, n_bio_only=3, n_new=2, **kw))


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


# ----------------------------------------------------------------------------------- determinism


def test_same_config_gives_identical_world(world):
    again = generate_world(WorldConfig())
    assert again == world
    assert world_fingerprint(again) == world_fingerprint(world)


def test_default_world_is_pinned(world):
    # Computed in another process: guards against any dependence on hash seeds or process state.
    # Update only when deliberately changing the generator (names, answers, templates or sampling);
    # a changed value means every seed now gives a different world than before.
    assert world.config == WorldConfig() and world_fingerprint(world) == "f1c8ca5192ecaae6"


def test_different_seeds_differ(world):
    other = generate_world(WorldConfig(seed=1))
    assert world_fingerprint(other) != world_fingerprint(world)
    names0 = [p.name for p in world.people()]
    names1 = [p.name for p in other.people()]
    assert sum(a != b for a, b in zip(names0, names1)) > 0.9 * len(names0)
    answers0 = [f.answer for f in world.facts() if f.relation == "birthplace"]
    answers1 = [f.answer for f in other.facts() if f.relation == "birthplace"]
    assert sum(a != b for a, b in zip(answers0, answers1)) > 0.8 * len(answers0)


def test_world_does_not_share_the_callers_config():
    config = WorldConfig(n_known=2, n_bio_only=1, n_new=1)
    w = generate_world(config)
    config.seed = 5
    assert w.config.seed == 0


def test_relation_subset_is_a_sub_world(world):
    sub = generate_world(WorldConfig(relations=["employer", "birthplace"]))
    assert sub.config.relations == ("birthplace", "employer")  # canonical order
    full = {f.id: f for f in world.facts()}
    assert {f.relation for f in sub.facts()} == {"birthplace", "employer"}
    for fact in sub.facts():
        assert fact == full[fact.id]


# ------------------------------------------------------------------------------------- structure


def test_sizes_as_configured(world):
    assert world.sizes() == {
        "known": {"people": 150, "facts": 750},
        "bio_only": {"people": 100, "facts": 500},
        "new": {"people": 100, "facts": 500},
    }
    w = generate_world(WorldConfig(seed=3, n_known=7, n_bio_only=0, n_new=2, relations=("occupation",)))
    assert (len(w.known), len(w.bio_only), len(w.new)) == (7, 0, 2)
    assert [p.population for p in w.people()] == ["known"] * 7 + ["new"] * 2


def test_populations_disjoint_by_person_and_fact_id(world):
    subjects = {p: {f.subject for f in world.population(p)} for p in POPULATIONS}
    ids = {p: {f.id for f in world.population(p)} for p in POPULATIONS}
    pids = {p: {f.id.split("/")[0] for f in world.population(p)} for p in POPULATIONS}
    for i, a in enumerate(POPULATIONS):
        for b in POPULATIONS[i + 1 :]:
            assert not subjects[a] & subjects[b]
            assert not ids[a] & ids[b]
            assert not pids[a] & pids[b]
    assert len({f.id for f in world.facts()}) == len(world.facts())


def test_people_and_fact_ids(world):
    people = world.people()
    assert len(people) == 350 == len({p.name for p in people}) == len({p.id for p in people})
    assert [p.id for p in people] == [f"p{i:04d}" for i in range(350)]
    by_person: dict[str, list[str]] = {}
    for fact in world.facts():
        pid, relation = fact.id.split("/")
        assert relation == fact.relation and re.fullmatch(r"p\d{4}", pid)
        by_person.setdefault(pid, []).append(relation)
    assert all(rels == list(RELATION_NAMES) for rels in by_person.values())


def test_names_are_unique_unrelated_and_not_famous(world):
    names = [p.name for p in world.people()]
    for a in names:
        for b in names:
            assert a == b or a not in b, (a, b)
    answer_words = {w.lower() for r in RELATIONS.values() for a in r.answers for w in a.split()}
    answers = [a.lower() for r in RELATIONS.values() for a in r.answers]
    for part in FIRST_NAMES + SURNAMES:
        assert part.lower() not in answer_words, part
        assert not any(a in part.lower() for a in answers), part
    # list-level guarantee that no full name is a substring of another, for every world size
    assert all(n.isascii() and n.isalpha() and n[0].isupper() and n[1:].islower() for n in FIRST_NAMES)
    assert not [(a, b) for a in SURNAMES for b in SURNAMES if a != b and b.startswith(a)]
    assert len(set(FIRST_NAMES)) == len(FIRST_NAMES) >= 150 and len(set(SURNAMES)) == len(SURNAMES) >= 150
    most = _draw_names(7, MAX_PEOPLE)
    assert len(set(most)) == MAX_PEOPLE and not FAMOUS_NAMES & set(most)


def test_answers_short_and_in_range(world):
    for fact in world.facts():
        assert 1 <= len(fact.answer.split()) <= 4 and fact.answer == fact.answer.strip()
        assert fact.answer in RELATIONS[fact.relation].answers
        if fact.relation == "birth_year":
            assert 1940 <= int(fact.answer) <= 2000
    assert len(RELATIONS["birthplace"].answers) >= 80 and len(RELATIONS["university"].answers) >= 50
    assert len(RELATIONS["employer"].answers) >= 60 and len(RELATIONS["occupation"].answers) >= 40
    # answers are spread, not stuck on a few values
    assert len({f.answer for f in world.facts() if f.relation == "birthplace"}) > 60


# ---------------------------------------------------------------------------------------- texts


def test_statements(world):
    for fact in world.facts():
        assert len(fact.statements) == 16 == len(set(fact.statements))
        for s in fact.statements:
            assert fact.subject in s and fact.answer in s, (fact.id, s)
            assert not PRONOUNS.search(s), s
            assert s.endswith(".") and "?" not in s and "{" not in s
    for relation in RELATIONS.values():
        assert len(relation.statements) >= 20 and len(set(relation.statements)) == len(relation.statements)


def test_statements_are_varied(world):
    # different facts of a relation draw different template subsets, so every template gets used
    for relation in RELATION_NAMES:
        facts = [f for f in world.facts() if f.relation == relation]
        shapes = {s.replace(f.subject, "{name}").replace(f.answer, "{x}") for f in facts for s in f.statements}
        assert len(shapes) >= len(RELATIONS[relation].statements) >= 20
        assert any(s.startswith("{name}") for s in shapes) and any(not s.startswith("{name}") for s in shapes)
        assert any(not s.endswith("{x}.") for s in shapes)  # the answer is not always last
        assert len({tuple(f.statements) for f in facts}) == len(facts)
    answer_first = [s for f in world.facts() for s in f.statements if s.startswith(f.answer)]
    assert answer_first


def test_questions(world):
    for fact in world.facts():
        assert len(fact.questions) >= 3 and fact.training_questions and fact.heldout_questions
        relation = RELATIONS[fact.relation]
        assert len(fact.training_questions) >= 3 and len(fact.heldout_questions) >= 2
        assert [q.template for q in fact.questions] == [f"{fact.relation}/q{i}" for i in range(len(relation.questions))]
        assert [q.heldout for q in fact.questions] == [h for _, h in relation.questions]
        for q in fact.questions:
            assert fact.subject in q.text and q.text.endswith("?") and fact.answer not in q.text
        texts = [q.text for q in fact.questions]
        assert len(set(texts)) == len(texts)


def _training_texts(facts):
    return [t for f in facts for t in (*f.statements, *(q.text for q in f.training_questions))]


def test_heldout_questions_never_in_training_text_exhaustive():
    w = small(seed=11)
    training = [t.lower() for t in _training_texts(w.facts())]
    for fact in w.facts():
        for q in fact.heldout_questions:
            for probe in (q.text.lower(), q.text.lower().rstrip("?")):
                assert not any(probe in t for t in training), (q, probe)


def test_heldout_questions_never_in_training_text_full_world(world):
    """Exact on every generated text of the default world: a training text containing a held-out
    question must contain that question's longest literal part, so only those texts are compared."""
    training = [t.lower() for t in _training_texts(world.facts())]
    by_part: dict[str, list[str]] = {}
    for fact in world.facts():
        for q in fact.heldout_questions:
            probe = q.text.lower().rstrip("?")
            part = max(probe.split(fact.subject.lower()), key=len)
            assert len(part) >= 5
            by_part.setdefault(part, []).append(probe)
    assert len(by_part) == sum(len(r.heldout_questions) for r in RELATIONS.values())
    for part, probes in by_part.items():
        candidates = [t for t in training if part in t]
        leaks = [(p, t) for t in candidates for p in probes if p in t]
        assert not leaks, leaks[:3]


def test_entities(world):
    for fact in world.facts():
        label = LABELS[fact.relation]
        expected = {(fact.subject, "PERSON")} | ({(fact.answer, label)} if label else set())
        assert {(e.text, e.label) for e in fact.entities} == expected
        assert fact.entities[0].text == fact.subject and fact.entities[0].label == "PERSON"


# ----------------------------------------------------------------------------------------- disk


def test_write_read_round_trip(tmp_path, world):
    assert write_world(tmp_path / "w", world) is True
    files = sorted(p.name for p in (tmp_path / "w").iterdir())
    assert files == sorted([*POPULATION_FILES.values(), "world.json"])
    back = read_world(tmp_path / "w")
    assert back == world and world_fingerprint(back) == world_fingerprint(world)
    meta = json.loads((tmp_path / "w" / "world.json").read_text())
    assert meta == {
        "format": "smviz-world/1",
        "config": WorldConfig().to_dict(),
        "sizes": world.sizes(),
        "fingerprint": world_fingerprint(world),
    }
    assert read_facts(tmp_path / "w" / "facts-bio.jsonl") == world.bio_only


def test_writing_the_same_world_again_is_a_no_op(tmp_path):
    w = small()
    write_world(tmp_path, w)
    before = snapshot(tmp_path)
    assert write_world(tmp_path, small()) is False
    assert snapshot(tmp_path) == before


def test_refuses_a_different_world_and_changes_nothing(tmp_path):
    write_world(tmp_path, small(seed=0))
    before = snapshot(tmp_path)
    with pytest.raises(WriteError, match="force"):
        write_world(tmp_path, small(seed=1))
    assert snapshot(tmp_path) == before
    assert read_world(tmp_path) == small(seed=0)


def test_force_overwrites(tmp_path):
    write_world(tmp_path, small(seed=0))
    assert write_world(tmp_path, small(seed=1), force=True) is True
    assert read_world(tmp_path) == small(seed=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*POPULATION_FILES.values(), "world.json"])


def test_unreadable_world_json_is_refused_without_force(tmp_path):
    (tmp_path / "world.json").write_text("{not json")
    before = snapshot(tmp_path)
    with pytest.raises(WriteError, match="not readable JSON"):
        write_world(tmp_path, small())
    assert snapshot(tmp_path) == before
    write_world(tmp_path, small(), force=True)
    assert read_world(tmp_path) == small()


def test_read_detects_changed_or_missing_files(tmp_path):
    w = small()
    write_world(tmp_path, w)
    path = tmp_path / "facts-known.jsonl"
    path.write_text(path.read_text().replace(w.known[0].statements[0], "Someone else was born somewhere."))
    with pytest.raises(InputError, match="fingerprint"):
        read_world(tmp_path)
    assert write_world(tmp_path, w) is True  # same world recorded, damaged files: repaired
    assert read_world(tmp_path) == w
    (tmp_path / "facts-new.jsonl").unlink()
    with pytest.raises(InputError, match="facts-new.jsonl"):
        read_world(tmp_path)
    (tmp_path / "world.json").unlink()
    with pytest.raises(InputError, match="world.json"):
        read_world(tmp_path)
    with pytest.raises(InputError):
        read_world(tmp_path / "nowhere")


def test_read_rejects_a_foreign_world_json(tmp_path):
    write_world(tmp_path, small())
    meta = json.loads((tmp_path / "world.json").read_text())
    (tmp_path / "world.json").write_text(json.dumps({**meta, "format": "other/1"}))
    with pytest.raises(InputError, match="format"):
        read_world(tmp_path)


def test_write_into_a_file_path_fails(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(WriteError, match="not a directory"):
        write_world(tmp_path / "f", small())


# --------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kw",
    [
        {"statements_per_fact": 10},
        {"statements_per_fact": 25},  # more than the templates
        {"n_known": -1},
        {"n_bio_only": -3},
        {"n_new": -5},
        {"n_known": 0, "n_bio_only": 0, "n_new": 0},
        {"n_known": MAX_PEOPLE + 1},
        {"n_known": 1.5},
        {"n_known": True},
        {"seed": "0"},
        {"relations": ("height",)},
        {"relations": ()},
        {"relations": "birthplace"},
        {"relations": ("birthplace", "birthplace")},
    ],
)
def test_invalid_config_raises(kw):
    with pytest.raises(ConfigError) as info:
        WorldConfig(**kw)
    assert isinstance(info.value, SmvizError) and isinstance(info.value, ValueError)
    assert next(iter(kw)) in str(info.value) or "n_known + n_bio_only" in str(info.value)


def test_invalid_config_is_rechecked_on_generate():
    config = WorldConfig()
    config.statements_per_fact = 10
    with pytest.raises(ConfigError, match="statements_per_fact"):
        generate_world(config)


def test_config_dict_round_trip(caplog):
    config = WorldConfig(seed=4, n_known=3, n_bio_only=2, n_new=1, relations=("university",), statements_per_fact=20)
    d = config.to_dict()
    assert json.loads(json.dumps(d)) == d and d["relations"] == ["university"]
    assert WorldConfig.from_dict(d) == config
    assert WorldConfig.from_dict({}) == WorldConfig()
    with caplog.at_level(logging.WARNING):
        assert WorldConfig.from_dict({**d, "n_old": 3}) == config  # a newer smviz's key: ignored, with a warning
    assert "n_old" in caplog.text
    with pytest.raises(ConfigError, match="WorldConfig.n_known must be an integer"):
        WorldConfig.from_dict({**d, "n_known": "three"})
    w = generate_world(config)
    assert all(len(f.statements) == 20 == len(set(f.statements)) for f in w.facts())


def test_read_names_the_facts_file_and_line_of_a_malformed_fact(tmp_path):
    write_world(tmp_path, small())
    path = tmp_path / "facts-bio.jsonl"
    lines = path.read_text().splitlines()
    bad = json.loads(lines[1]) | {"questions": ["Where?"]}
    path.write_text("\n".join([lines[0], json.dumps(bad), *lines[2:]]) + "\n")
    before = snapshot(tmp_path)
    with pytest.raises(InputError, match=r"facts-bio\.jsonl, line 2: questions must be objects \{text, template, heldout\}") as err:
        read_world(tmp_path)
    assert "\n" not in str(err.value)
    assert snapshot(tmp_path) == before
