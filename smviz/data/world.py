"""A seeded generator of a world of fictional people, the facts a tiny model must memorise.

Every person gets one fact per relation (birthplace, university, employer, occupation, birth_year),
each answer drawn with a seeded RNG from a short list of real-world values. Each fact carries
`statements_per_fact` distinct statement paraphrases (sampled without replacement from the relation's
statement templates) and every question template of its relation, split into TRAINING templates and
HELD-OUT templates; a held-out question's text never occurs in any training text (statements and
training questions of any fact), which the tests check on the generated texts.

People fall into three disjoint populations:

- `known`: their facts are in pretraining, as statements and as training questions;
- `bio_only`: their facts are in pretraining as statements only (does QA transfer to them?);
- `new`: unseen in pretraining, to be learned later by sparse memory finetuning.

Everything is a pure function of `WorldConfig`: `random.Random` seeded with strings (hashed with
SHA-512, independent of PYTHONHASHSEED), no set iteration. A person's answer for a relation depends
only on (seed, person id, relation), so restricting `relations` gives a sub-world of the full one.

On disk (`write_world` / `read_world`): `facts-known.jsonl`, `facts-bio.jsonl`, `facts-new.jsonl`
(the `smviz.data.facts` JSONL format) and `world.json`, which records the config, the sizes and the
fingerprint of the facts; a directory holding a different world is never overwritten without force.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from smviz.config import from_dict
from smviz.data.facts import Entity, Fact, Question, read_facts, write_facts
from smviz.data.lexicon import (  # re-exported: the world's public vocabulary
    BIRTH_YEARS,
    CITIES,
    EMPLOYERS,
    FAMOUS_NAMES,
    FIRST_NAMES,
    OCCUPATIONS,
    RELATION_NAMES,
    RELATIONS,
    SURNAMES,
    UNIVERSITIES,
    Relation,
)
from smviz.errors import ConfigError, InputError, WriteError
from smviz.io import json_text, write_text_atomic
from smviz.workspace.layout import POPULATION_FILES, WORLD_FILE

WORLD_FORMAT = "smviz-world/1"
POPULATIONS = ("known", "bio_only", "new")
MIN_STATEMENTS_PER_FACT = 16
MAX_PEOPLE = 10_000  # well under the FIRST_NAMES x SURNAMES combinations, so sampling names stays easy


def _article(noun: str) -> str:
    return ("an " if noun[0].lower() in "aeiou" else "a ") + noun


def render(template: str, name: str, answer: str) -> str:
    """A template with its person and answer filled in."""
    ax = _article(answer)
    return template.format(name=name, x=answer, ax=ax, Ax=ax[0].upper() + ax[1:])


# ---------------------------------------------------------------------------------------------- config


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class WorldConfig:
    """What world to generate. `relations` is a set in effect: it is stored in canonical order."""

    seed: int = field(default=0, metadata={"help": "world and corpus-split seed"})
    n_known: int = field(default=150, metadata={"help": "people in pretraining as statements and Q/A"})
    n_bio_only: int = field(default=100, metadata={"help": "people in pretraining as statements only"})
    n_new: int = field(default=100, metadata={"help": "people never seen in pretraining (the stream)"})
    relations: tuple[str, ...] = field(default=RELATION_NAMES, metadata={"help": "relations every person has a fact of"})
    statements_per_fact: int = field(default=16, metadata={"help": "statement paraphrases written per fact"})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming every invalid value; put `relations` in canonical order."""
        problems = []
        if not _is_int(self.seed):
            problems.append(f"seed must be an integer, got {self.seed!r}")
        for name in ("n_known", "n_bio_only", "n_new"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                problems.append(f"{name} must be an integer >= 0, got {value!r}")
        sizes_ok = all(_is_int(getattr(self, n)) for n in ("n_known", "n_bio_only", "n_new"))
        if sizes_ok and not 1 <= self.n_known + self.n_bio_only + self.n_new <= MAX_PEOPLE:
            total = self.n_known + self.n_bio_only + self.n_new
            problems.append(f"n_known + n_bio_only + n_new must be between 1 and {MAX_PEOPLE}, got {total}")
        relations = self.relations
        if isinstance(relations, str) or not isinstance(relations, (list, tuple)):
            problems.append(f"relations must be a list of relation names, got {relations!r}")
            relations = None
        else:
            unknown = [r for r in relations if r not in RELATIONS]
            if unknown:
                problems.append(f"unknown relations {unknown}; known: {list(RELATION_NAMES)}")
                relations = None
            elif not relations:
                problems.append("relations must not be empty")
                relations = None
            elif len(set(relations)) != len(relations):
                problems.append(f"relations must not repeat, got {list(relations)}")
                relations = None
        if relations is not None:
            self.relations = tuple(r for r in RELATION_NAMES if r in relations)
        most = min(len(RELATIONS[r].statements) for r in (relations or RELATION_NAMES))
        spf = self.statements_per_fact
        if not _is_int(spf) or not MIN_STATEMENTS_PER_FACT <= spf <= most:
            problems.append(
                f"statements_per_fact must be an integer between {MIN_STATEMENTS_PER_FACT} and {most} "
                f"(the number of statement templates), got {spf!r}"
            )
        if problems:
            raise ConfigError("invalid world config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorldConfig:
        """The inverse of `to_dict`, every value type-checked (ConfigError naming the field); a missing
        key takes its default, an unknown one (written by a newer smviz) is ignored with a warning."""
        return from_dict(cls, d)


# ----------------------------------------------------------------------------------------------- world


@dataclass(frozen=True)
class Person:
    id: str  # "p0042"
    name: str
    population: str  # one of POPULATIONS


@dataclass
class World:
    config: WorldConfig
    known: list[Fact] = field(default_factory=list)
    bio_only: list[Fact] = field(default_factory=list)
    new: list[Fact] = field(default_factory=list)

    def population(self, name: str) -> list[Fact]:
        if name not in POPULATIONS:
            raise ConfigError(f"unknown population {name!r}; populations: {list(POPULATIONS)}")
        return getattr(self, name)

    def facts(self) -> list[Fact]:
        """All facts: known, then bio_only, then new."""
        return [fact for population in POPULATIONS for fact in self.population(population)]

    def people(self) -> list[Person]:
        """Every person once, in population order then id order."""
        seen: dict[str, Person] = {}
        for population in POPULATIONS:
            for fact in self.population(population):
                pid = fact.id.split("/", 1)[0]
                seen.setdefault(pid, Person(pid, fact.subject, population))
        return list(seen.values())

    def sizes(self) -> dict[str, dict[str, int]]:
        return {
            p: {"people": len({f.subject for f in self.population(p)}), "facts": len(self.population(p))}
            for p in POPULATIONS
        }

    def validate(self) -> None:
        """Raise InputError unless the world is consistent: unique fact ids "<person>/<relation>", one
        name per person id and one id per name, every person in one population with every relation of
        the config, and population sizes as configured."""
        problems = []
        ids: set[str] = set()
        person_of: dict[str, tuple[str, str]] = {}  # pid -> (name, population)
        pid_of: dict[str, str] = {}
        relations: dict[str, list[str]] = {}
        for population in POPULATIONS:
            for fact in self.population(population):
                if not isinstance(fact, Fact):
                    problems.append(f"{population} holds a {type(fact).__name__}, not a Fact")
                    continue
                if fact.id in ids:
                    problems.append(f"duplicate fact id {fact.id!r}")
                ids.add(fact.id)
                pid, _, relation = fact.id.partition("/")
                if relation != fact.relation:
                    problems.append(f"fact id {fact.id!r} does not end in its relation {fact.relation!r}")
                if person_of.setdefault(pid, (fact.subject, population)) != (fact.subject, population):
                    problems.append(f"person {pid} appears as {person_of[pid]} and {(fact.subject, population)}")
                if pid_of.setdefault(fact.subject, pid) != pid:
                    problems.append(f"{fact.subject!r} has two person ids, {pid_of[fact.subject]} and {pid}")
                relations.setdefault(pid, []).append(fact.relation)
        for pid, rels in relations.items():
            if sorted(rels) != sorted(self.config.relations):
                problems.append(f"person {pid} has relations {rels}, expected {list(self.config.relations)}")
        sizes = self.sizes()
        for population, configured in zip(POPULATIONS, (self.config.n_known, self.config.n_bio_only, self.config.n_new)):
            if sizes[population]["people"] != configured:
                problems.append(f"{population} has {sizes[population]['people']} people, config says {configured}")
        if problems:
            shown = problems[:5] + ([f"... and {len(problems) - 5} more"] if len(problems) > 5 else [])
            raise InputError("inconsistent world: " + "; ".join(shown))


def _draw_names(seed: int, count: int) -> list[str]:
    rng = random.Random(f"smviz-world/{seed}/names")
    order = rng.sample(range(len(FIRST_NAMES) * len(SURNAMES)), len(FIRST_NAMES) * len(SURNAMES))
    names = []
    for k in order:
        name = f"{FIRST_NAMES[k // len(SURNAMES)]} {SURNAMES[k % len(SURNAMES)]}"
        if name not in FAMOUS_NAMES:
            names.append(name)
            if len(names) == count:
                return names
    raise AssertionError("unreachable: MAX_PEOPLE is far below the number of names")


def _make_fact(seed: int, pid: str, name: str, relation: Relation, statements_per_fact: int) -> Fact:
    rng = random.Random(f"smviz-world/{seed}/{pid}/{relation.name}")
    answer = rng.choice(relation.answers)
    statements = tuple(render(t, name, answer) for t in rng.sample(relation.statements, statements_per_fact))
    questions = tuple(
        Question(render(t, name, answer), f"{relation.name}/q{i}", heldout)
        for i, (t, heldout) in enumerate(relation.questions)
    )
    entities = (Entity(name, "PERSON"),) + ((Entity(answer, relation.label),) if relation.label else ())
    return Fact(f"{pid}/{relation.name}", name, relation.name, answer, statements, questions, entities)


def generate_world(config: WorldConfig | None = None) -> World:
    """The world of `config` (default: WorldConfig()); the same config always gives the same world."""
    config = WorldConfig() if config is None else config
    config.validate()
    sizes = (config.n_known, config.n_bio_only, config.n_new)
    total = sum(sizes)
    names = _draw_names(config.seed, total)
    width = max(4, len(str(total - 1)))
    populations: dict[str, list[Fact]] = {}
    start = 0
    for population, size in zip(POPULATIONS, sizes):
        facts = []
        for index in range(start, start + size):
            pid = f"p{index:0{width}d}"
            for relation in config.relations:
                facts.append(_make_fact(config.seed, pid, names[index], RELATIONS[relation], config.statements_per_fact))
        populations[population] = facts
        start += size
    return World(WorldConfig(**{f.name: getattr(config, f.name) for f in fields(config)}), **populations)


def world_fingerprint(world: World) -> str:
    """Short sha256 of the canonical JSON of all facts by population: equal iff the facts are equal."""
    canonical = {p: [f.to_dict() for f in world.population(p)] for p in POPULATIONS}
    text = json.dumps(canonical, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ disk


def _world_json(world: World) -> dict[str, Any]:
    return {
        "format": WORLD_FORMAT,
        "config": world.config.to_dict(),
        "sizes": world.sizes(),
        "fingerprint": world_fingerprint(world),
    }


def _read_world_json(directory: Path) -> dict[str, Any]:
    path = directory / WORLD_FILE
    if not path.is_file():
        raise InputError(f"{directory} holds no world ({WORLD_FILE} is missing); write one with write_world")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != WORLD_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise InputError(f"{path} is not an {WORLD_FORMAT} file (format {found!r})")
    missing = [k for k in ("config", "sizes", "fingerprint") if k not in meta]
    if missing:
        raise InputError(f"{path} lacks {missing}")
    if not isinstance(meta["fingerprint"], str):
        raise InputError(f"{path}: fingerprint must be a string, got {meta['fingerprint']!r}")
    return meta


def read_world(directory: str | os.PathLike) -> World:
    """Read a world written by `write_world`, checking world.json, the sizes and the fingerprint."""
    directory = Path(directory)
    meta = _read_world_json(directory)
    try:
        config = WorldConfig.from_dict(meta["config"])
    except ConfigError as e:
        raise InputError(f"{directory / WORLD_FILE}: bad config ({e})") from None
    populations = {}
    for population in POPULATIONS:
        try:
            populations[population] = read_facts(directory / POPULATION_FILES[population])
        except InputError as e:
            raise InputError(f"{directory} holds a broken world: {e}") from None
    world = World(config, **populations)
    try:
        world.validate()
    except InputError as e:
        raise InputError(f"{directory}: {e}") from None
    if meta["sizes"] != world.sizes():
        raise InputError(f"{directory / WORLD_FILE}: sizes {meta['sizes']} do not match the facts files {world.sizes()}")
    fingerprint = world_fingerprint(world)
    if fingerprint != meta["fingerprint"]:
        raise InputError(
            f"{directory}: the facts files (fingerprint {fingerprint}) are not the world {WORLD_FILE} records "
            f"({meta['fingerprint']}); they were changed or a write was interrupted — rewrite the world with "
            f"write_world(..., force=True)"
        )
    return world


def write_world(directory: str | os.PathLike, world: World, force: bool = False) -> bool:
    """Write `world` into `directory`; return True if files were written, False if it already held it.

    A directory whose world.json records a different world (or an unreadable world.json) is refused
    with WriteError, changing nothing, unless `force`. The facts files are written first and world.json
    last (a forced overwrite removes the old world.json first), so an interrupted write never leaves a
    world.json that vouches for facts files it does not match.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise WriteError(f"cannot write a world into {directory}: it exists and is not a directory")
    world.validate()
    meta = _world_json(world)
    meta_path = directory / WORLD_FILE
    if meta_path.exists():
        try:
            existing = _read_world_json(directory)["fingerprint"]
        except InputError as e:
            existing, reason = None, str(e)
        else:
            reason = f"it holds another world (fingerprint {existing}, this one is {meta['fingerprint']})"
        if existing == meta["fingerprint"]:
            try:
                if world_fingerprint(read_world(directory)) == existing:
                    return False
            except InputError:
                pass  # same world recorded but its files are damaged: rewrite them
        elif not force:
            raise WriteError(f"refusing to write a world into {directory}: {reason}; pass force=True to replace it")
        else:
            meta_path.unlink()
    for population in POPULATIONS:
        write_facts(directory / POPULATION_FILES[population], world.population(population))
    write_text_atomic(meta_path, json_text(meta, sort_keys=True) + "\n")
    return True
