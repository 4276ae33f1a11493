"""The editing benchmarks' formats (`counterfact`, `zsre`) read samples written in the public layouts
(ROME/MEMIT's counterfact.json, MEND's zsre_mend_eval.json) into EditRecords equal to hand-written ones;
the canonical EditRecord JSON round-trips; each malformed input is a one-line InputError naming the file
and the record (or line)."""

from __future__ import annotations

import copy
import dataclasses
import json
import re

import pytest

from smviz.data.edits import EditRecord
from smviz.data.formats import canonical, counterfact, load_records, smviz_edits, zsre
from smviz.errors import InputError

COUNTERFACT = [
    {"case_id": 0, "pararel_idx": 2796,
     "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                           "target_new": {"str": "English", "id": "Q1860"}, "target_true": {"str": "French", "id": "Q150"},
                           "subject": "Danielle Darrieux"},
     "paraphrase_prompts": ["Shayna does this and Yossel goes still and dies. Danielle Darrieux, a native",
                            "An album was recorded for Capitol Nashville but never released. Danielle Darrieux spoke the language"],
     "neighborhood_prompts": ["The mother tongue of Léon Blum is", "The native language of Montesquieu is"],
     "attribute_prompts": ["J. R. R. Tolkien is a native speaker of"],
     "generation_prompts": ["Danielle Darrieux's mother tongue is"]},
    {"case_id": 1, "pararel_idx": 1101,
     "requested_rewrite": {"prompt": "{} is affiliated with the religion of", "relation_id": "P140",
                           "target_new": {"str": "Christianity", "id": "Q5043"}, "target_true": {"str": "Islam", "id": "Q432"},
                           "subject": "Edwin of Northumbria"},
     "paraphrase_prompts": ["The school chiefly served tribal students. Edwin of Northumbria follows the religion of"],
     "neighborhood_prompts": ["Abdul Qadeer Khan is affiliated with the religion of"],
     "attribute_prompts": [], "generation_prompts": []},
    {"case_id": 2,
     "requested_rewrite": {"prompt": "{}, the", "relation_id": "P1303",
                           "target_new": {"str": "piano", "id": "Q5994"}, "target_true": {"str": "guitar", "id": "Q6607"},
                           "subject": "Toko Yasuda"},
     "paraphrase_prompts": ["Toko Yasuda performs on the", "Toko Yasuda plays the"],
     "neighborhood_prompts": ["Jimi Hendrix, performing on the", "Eric Clapton plays the"]},
]

EXPECTED_CF = [
    EditRecord("0", "Danielle Darrieux", "The mother tongue of {} is", "English", "French",
               ("Shayna does this and Yossel goes still and dies. Danielle Darrieux, a native",
                "An album was recorded for Capitol Nashville but never released. Danielle Darrieux spoke the language"),
               (("The mother tongue of Léon Blum is", "French"), ("The native language of Montesquieu is", "French")),
               "counterfact"),
    EditRecord("1", "Edwin of Northumbria", "{} is affiliated with the religion of", "Christianity", "Islam",
               ("The school chiefly served tribal students. Edwin of Northumbria follows the religion of",),
               (("Abdul Qadeer Khan is affiliated with the religion of", "Islam"),), "counterfact"),
    EditRecord("2", "Toko Yasuda", "{}, the", "piano", "guitar", ("Toko Yasuda performs on the", "Toko Yasuda plays the"),
               (("Jimi Hendrix, performing on the", "guitar"), ("Eric Clapton plays the", "guitar")), "counterfact"),
]

ZSRE = [
    {"subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?", "pred": "Trinity College",
     "rephrase": "What university did Watts Humphrey take part in?", "alt": "University of Michigan",
     "answers": ["Illinois Institute of Technology"], "loc": "nq question: who played desmond doss father in hacksaw ridge",
     "loc_ans": "Hugo Weaving",
     "cond": "Trinity College >> University of Michigan || What university did Watts Humphrey attend?"},
    {"subject": "Ramalinaceae", "src": "Which family does Ramalinaceae belong to?", "pred": "Lamiinae",
     "rephrase": "What family are Ramalinaceae?", "alt": "Lamiinae", "answers": ["Lecanorales", "Lecanoromycetes"],
     "loc": "nq question: types of skiing in the winter olympics 2018", "loc_ans": "Downhill",
     "cond": "Lamiinae >> Lamiinae || Which family does Ramalinaceae belong to?"},
]

EXPECTED_ZSRE = [
    EditRecord("0", "Watts Humphrey", "What university did {} attend?", "University of Michigan",
               "Illinois Institute of Technology", ("What university did Watts Humphrey take part in?",),
               (("nq question: who played desmond doss father in hacksaw ridge", "Hugo Weaving"),), "zsre"),
    EditRecord("1", "Ramalinaceae", "Which family does {} belong to?", "Lamiinae", "Lecanorales",
               ("What family are Ramalinaceae?",),
               (("nq question: types of skiing in the winter olympics 2018", "Downhill"),), "zsre"),
]


def write_json(path, records):
    path.write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_counterfact_reads_the_public_layout(tmp_path):
    records = load_records(write_json(tmp_path / "counterfact.json", COUNTERFACT))
    assert counterfact.FORMAT.sniff(records) and not zsre.FORMAT.sniff(records)
    assert counterfact.FORMAT.read(records) == EXPECTED_CF
    assert EXPECTED_CF[0].rewrite_prompt == "The mother tongue of Danielle Darrieux is"
    assert EXPECTED_CF[2].rewrite_prompt == "Toko Yasuda, the"


def test_counterfact_also_reads_jsonl(tmp_path):
    records = load_records(write_jsonl(tmp_path / "cf.jsonl", COUNTERFACT))
    assert counterfact.FORMAT.sniff(records)
    assert counterfact.FORMAT.read(records) == EXPECTED_CF


def test_zsre_reads_the_public_layout(tmp_path):
    records = load_records(write_json(tmp_path / "zsre_mend_eval.json", ZSRE))
    assert zsre.FORMAT.sniff(records) and not counterfact.FORMAT.sniff(records)
    assert zsre.FORMAT.read(records) == EXPECTED_ZSRE
    assert EXPECTED_ZSRE[0].rewrite_prompt == ZSRE[0]["src"]
    with_ids = [dict(r, case_id=10 + i) for i, r in enumerate(ZSRE)]
    assert [r.id for r in zsre.FORMAT.read(load_records(write_jsonl(tmp_path / "z.jsonl", with_ids)))] == ["10", "11"]


def test_zsre_replaces_only_the_first_occurrence_of_the_subject(tmp_path):
    rec = dict(ZSRE[0], subject="Kent", src="Which river flows through Kent, Kent?")
    [edit] = zsre.FORMAT.read(load_records(write_json(tmp_path / "z.json", [rec])))
    assert edit.prompt == "Which river flows through {}, Kent?"


def test_neither_sniffs_a_facts_file(tmp_path):
    fact = {"id": "f0", "subject": "Ada", "relation": "birthplace", "answer": "Paris", "statements": ["Ada was born in Paris."],
            "questions": ["Where was Ada born?"]}
    records = load_records(write_jsonl(tmp_path / "facts.jsonl", [fact]))
    assert not counterfact.FORMAT.sniff(records) and not zsre.FORMAT.sniff(records)
    assert not smviz_edits.FORMAT.sniff(records)


def test_edit_record_round_trips_through_its_canonical_json():
    for record in EXPECTED_CF + EXPECTED_ZSRE:
        line = json.dumps(record.to_dict(), allow_nan=False)
        assert EditRecord.from_dict(json.loads(line)) == record
    assert EXPECTED_CF[1].to_dict() == {
        "id": "1", "subject": "Edwin of Northumbria", "prompt": "{} is affiliated with the religion of",
        "target_new": "Christianity", "target_true": "Islam",
        "paraphrase_prompts": ["The school chiefly served tribal students. Edwin of Northumbria follows the religion of"],
        "neighborhood": [{"prompt": "Abdul Qadeer Khan is affiliated with the religion of", "answer": "Islam"}],
        "source": "counterfact"}


@pytest.mark.parametrize("change, message", [
    (dict(prompt="The mother tongue of Danielle Darrieux is"), "must contain '{}' exactly once"),
    (dict(prompt="{} and {} speak"), "exactly once"),
    (dict(subject=""), "subject must be a non-empty string"),
    (dict(target_new="", target_true="French"), "target_new must be a non-empty string"),
    (dict(source="wiki"), "source must be one of"),
])
def test_edit_record_validates(change, message):
    fields = dict(id="0", subject="Danielle Darrieux", prompt="The mother tongue of {} is", target_new="English",
                  target_true="French", paraphrase_prompts=(), neighborhood=(), source="counterfact")
    with pytest.raises(InputError, match=re.escape(message)):
        EditRecord(**(fields | change))


def bad_counterfact(edit):
    cases = copy.deepcopy(COUNTERFACT)
    edit(cases)
    return cases


@pytest.mark.parametrize("edit, message", [
    (lambda c: c[1]["requested_rewrite"].update(prompt="Edwin of Northumbria is affiliated with the religion of"),
     "record 1: requested_rewrite.prompt 'Edwin of Northumbria is affiliated with the religion of' has no '{}' where the subject goes"),
    (lambda c: c[2].pop("paraphrase_prompts"), "record 2: a CounterFact case lacks ['paraphrase_prompts']"),
    (lambda c: c[0]["requested_rewrite"].pop("subject"), "record 0: requested_rewrite lacks ['subject']"),
    (lambda c: c[0]["requested_rewrite"]["target_new"].update(str=" "), "record 0: requested_rewrite.target_new.str is empty"),
    (lambda c: c[2].update(case_id=0), "record 2: duplicate id '0' (first at "),
    (lambda c: c[1].update(neighborhood_prompts="Abdul Qadeer Khan is"), "record 1: neighborhood_prompts must be a list"),
    (lambda c: c.__setitem__(1, ["not", "an", "object"]), "record 1: a CounterFact case must be a JSON object, got list"),
])
def test_bad_counterfact_is_one_line_naming_file_and_record(tmp_path, edit, message):
    path = write_json(tmp_path / "counterfact.json", bad_counterfact(edit))
    with pytest.raises(InputError) as e:
        counterfact.FORMAT.read(load_records(path))
    assert str(e.value).startswith(f"{path}, {message}") and "\n" not in str(e.value)


def test_bad_counterfact_jsonl_names_the_line(tmp_path):
    cases = bad_counterfact(lambda c: c[1]["requested_rewrite"].update(prompt="Edwin is affiliated with the religion of"))
    path = tmp_path / "cf.jsonl"
    path.write_text("\n" + "".join(json.dumps(r) + "\n" for r in cases))  # a blank first line: the case is on line 3
    with pytest.raises(InputError, match=r"cf\.jsonl, line 3: requested_rewrite\.prompt .* has no '\{\}'"):
        counterfact.FORMAT.read(load_records(path))


@pytest.mark.parametrize("edit, message", [
    (lambda r: r[1].update(answers=[]), "record 1: answers is empty"),
    (lambda r: r[0].update(subject="Watts Humfrey"),
     "record 0: subject 'Watts Humfrey' does not occur in its prompt (src 'What university did Watts Humphrey attend?')"),
    (lambda r: r[1].pop("loc_ans"), "record 1: a zsRE record lacks ['loc_ans']"),
    (lambda r: r[0].update(alt=""), "record 0: alt must be a non-empty string (the new answer), got ''"),
    (lambda r: r[0].update(answers=["Illinois Institute of Technology", 3]), "record 0: answers must be non-empty strings"),
    (lambda r: [x.update(case_id=7) for x in r], "record 1: duplicate id '7'"),
])
def test_bad_zsre_is_one_line_naming_file_and_record(tmp_path, edit, message):
    records = copy.deepcopy(ZSRE)
    edit(records)
    path = write_json(tmp_path / "zsre.json", records)
    with pytest.raises(InputError) as e:
        zsre.FORMAT.read(load_records(path))
    assert str(e.value).startswith(f"{path}, {message}") and "\n" not in str(e.value)


def test_canonical_edits_are_read_back(tmp_path):
    edits = EXPECTED_CF + [dataclasses.replace(r, id=f"zsre-{r.id}") for r in EXPECTED_ZSRE]
    out = tmp_path / "edits.jsonl"
    canonical.write_canonical(out, "edits", edits)
    records = load_records(out)
    assert smviz_edits.FORMAT.sniff(records) and not counterfact.FORMAT.sniff(records)
    assert smviz_edits.FORMAT.read(records) == edits


def test_write_canonical_refuses_an_unknown_kind_and_writes_nothing(tmp_path):
    from smviz.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown kind of data 'pictures'"):
        canonical.write_canonical(tmp_path / "out.jsonl", "pictures", EXPECTED_CF)
    assert not (tmp_path / "out.jsonl").exists()


def test_read_data_detects_both_by_content_and_follows_format(tmp_path):
    from smviz.data.formats import read_data

    cf, zs = write_json(tmp_path / "a.json", COUNTERFACT), write_jsonl(tmp_path / "b.data", ZSRE)
    assert read_data(cf) == (counterfact.FORMAT, EXPECTED_CF)
    assert read_data(zs) == (zsre.FORMAT, EXPECTED_ZSRE)
    assert read_data(cf, format="counterfact")[1] == EXPECTED_CF
    with pytest.raises(InputError, match=r"a\.json, record 0: a zsRE record lacks"):
        read_data(cf, format="zsre")
