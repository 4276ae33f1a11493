"""Entity labels for facts that name their entities without one (the `simple` format's plain strings,
label ""): `label_entities` gives each such entity the label spaCy's NER most often gives that exact text
in the fact's own statements (ties: the label seen first); failing that, the label spaCy gives the
entity text read on its own, when it sees the whole text as one entity; else the entity stays
unlabelled. Entities that have a label keep it. What `smviz data convert --label-entities` runs."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from smviz.data.schema import Entity, Fact

if TYPE_CHECKING:
    from spacy.language import Language


def label_entities(facts: Sequence[Fact], nlp: Language) -> tuple[list[Fact], dict[str, int]]:
    """The facts with their unlabelled entities labelled by `nlp` (see the module docstring), and the
    counts: "in_statements", "alone" (labelled by each rule), "unlabelled" (left "")."""
    todo = [i for i, f in enumerate(facts) if any(not e.label for e in f.entities)]
    statements = [(i, s) for i in todo for s in facts[i].statements]
    seen: dict[tuple[int, str], Counter[str]] = {}
    for (i, _), doc in zip(statements, nlp.pipe(s for _, s in statements)):
        for ent in doc.ents:
            seen.setdefault((i, ent.text), Counter())[ent.label_] += 1
    wanted = sorted({e.text for i in todo for e in facts[i].entities if not e.label and (i, e.text) not in seen})
    alone = {}
    for text, doc in zip(wanted, nlp.pipe(wanted)):
        if len(doc.ents) == 1 and doc.ents[0].text == text.strip():
            alone[text] = doc.ents[0].label_
    counts = {"in_statements": 0, "alone": 0, "unlabelled": 0}
    out = list(facts)
    for i in todo:
        entities = []
        for e in facts[i].entities:
            label = e.label
            if not label and (i, e.text) in seen:
                label, _ = seen[(i, e.text)].most_common(1)[0]
                counts["in_statements"] += 1
            elif not label and e.text in alone:
                label = alone[e.text]
                counts["alone"] += 1
            elif not label:
                counts["unlabelled"] += 1
            entities.append(Entity(e.text, label))
        out[i] = dataclasses.replace(facts[i], entities=tuple(entities))
    return out, counts


def describe_counts(counts: dict[str, Any]) -> str:
    return (f"entity labels from spaCy: {counts['in_statements']} from the statements, {counts['alone']} from the "
            f"entity alone, {counts['unlabelled']} left unlabelled")
