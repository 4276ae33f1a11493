"""Checkpoint diffs: per-slot ‖ΔV‖ against a direct torch computation, the audit catching a
deliberately moved frozen value row and dense weight (and nothing else), run steps rebuilt from
deltas, access-shift Jaccard against sets computed by hand from recorded traces, fact shift, and
clear errors for incomparable models, bad steps and bad slot ids.

A micro model (memory at block 1) with a hand-made 3-fact world, its own tokenizer and background
statistics, and a sparse SGD run of 3 steps (top_t=8)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smviz.analysis.diff import allowed_rows, diff_models, diff_run_model, diff_run_steps
from smviz.analysis.runs import Run
from smviz.analysis.shift import access_shift, fact_shift
from smviz.data.facts import Fact, Question, qa_text
from smviz.data.tokenizer import pack_documents, train_tokenizer
from smviz.model import MemoryModel
from smviz.record import AccessRecorder
from smviz.stats import SlotStats, collect_stats
from smviz.errors import AnalysisError, ConfigError, RunError
from smviz.train import EvalSets, Stream, FinetuneConfig, finetune

CITIES = ["Paris", "Lima", "Oslo", "Cairo", "Quito", "Accra"]


def make_facts(n: int = 3) -> list[Fact]:
    facts = []
    for i in range(n):
        name, city = f"Ada Number{i}", CITIES[i]
        facts.append(Fact(
            id=f"f{i}", subject=name, relation="birthplace", answer=city,
            statements=(f"{name} was born in {city}.", f"The birthplace of {name} is {city}."),
            questions=(Question(f"Where was {name} born?", "birthplace/q1", False),
                       Question(f"In which city was {name} born?", "birthplace/q2", True)),
        ))
    return facts


def make_model(seed: int = 0, **memory) -> MemoryModel:
    facts = make_facts(6)
    texts = [s for f in facts for s in f.statements] + [qa_text(q.text, f.answer) for f in facts for q in f.questions]
    tokenizer = train_tokenizer(texts * 3, vocab_size=300)
    model = MemoryModel.from_preset("micro", seed=seed, vocab_size=len(tokenizer), **memory)
    model.tokenizer = tokenizer
    return model


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """base model dir, a sparse run dir of 3 steps (3 facts, 1 step each), the facts."""
    root = tmp_path_factory.mktemp("diff")
    model = make_model()
    model.save_pretrained(root / "base")
    model = MemoryModel.from_pretrained(root / "base")
    facts = make_facts(3)
    rows = pack_documents(model.tokenizer, [s for f in make_facts(6) for s in f.statements], 16)[:8]
    stats = collect_stats(model, [{"input_ids": rows[i : i + 4]} for i in range(0, len(rows), 4)])
    stats.save_to_model_dir(root / "base")
    stats = SlotStats.load_for_model(root / "base", model)
    config = FinetuneConfig(method="sparse", top_t=8, batch_size=4, steps_per_fact=1, eval_every=2)
    stream = Stream(facts, model.tokenizer, config.batch_size, config.steps_per_fact, config.composition, config.seed)
    sets = EvalSets(facts, make_facts(6)[3:4], rows[:2], sources={"test": "diff"})
    finetune(model, stream, config=config, run_dir=root / "run", eval_sets=sets, stats=stats, progress=False)
    return {"base": root / "base", "run": root / "run", "facts": facts}


def test_slot_norms_against_direct_torch(ws):
    run = Run(ws["run"])
    before = MemoryModel.from_pretrained(ws["base"])
    after = MemoryModel.from_pretrained(ws["run"] / "model")
    slots, audit = diff_models(before, after, allowed=allowed_rows(run), method="sparse")
    assert not audit["violation"].any()
    vb, va = before.values[1].detach().double(), after.values[1].detach().double()
    changed = torch.nonzero((vb != va).any(1)).flatten()
    assert len(changed) > 0
    assert set(slots["slot"]) == set(changed.tolist())
    assert (slots["layer"] == 1).all()
    ref = torch.linalg.vector_norm(va - vb, dim=1)
    for row in slots.itertuples():
        assert row.delta_norm == pytest.approx(ref[row.slot].item(), rel=1e-12)
        assert row.before_norm == pytest.approx(torch.linalg.vector_norm(vb[row.slot]).item(), rel=1e-12)
        assert row.relative_change == pytest.approx(row.delta_norm / row.before_norm)
    assert slots["delta_norm"].is_monotonic_decreasing
    # a sparse run touches only its selected rows: the audit is clean, changed rows ⊆ selected
    assert slots["allowed"].all()
    selected = set(np.concatenate(list(run.selected().values())).tolist())
    assert set(slots["slot"]) <= selected
    assert diff_models(before, after, allowed=allowed_rows(run)).violations.empty


def test_audit_catches_moved_frozen_row_and_dense_weight(ws):
    run = Run(ws["run"])
    before = MemoryModel.from_pretrained(ws["base"])
    after = MemoryModel.from_pretrained(ws["run"] / "model")
    allowed = allowed_rows(run)
    frozen = int(np.setdiff1d(np.arange(before.memory_config.n_slots), allowed[1].numpy())[0])
    with torch.no_grad():
        after.values[1][frozen, 3] += 1e-6
        after.lm.model.layers[0].self_attn.q_proj.weight[2, 5] += 1e-7
    slots, audit = diff_models(before, after, allowed=allowed, method="sparse")
    bad = diff_models(before, after, allowed=allowed, method="sparse").violations
    assert sorted(bad["parameter"]) == sorted(["model.layers.0.self_attn.q_proj.weight",
                                               "model.layers.1.mlp.memory.values.weight"])
    value = bad[bad["kind"] == "value rows"].iloc[0]
    assert value["part"] == "other rows" and value["changed"] == 1
    assert value["max_abs_change"] == pytest.approx(1e-6, rel=1e-2)
    dense = bad[bad["kind"] == "dense"].iloc[0]
    assert dense["changed"] == 1 and dense["max_abs_change"] == pytest.approx(1e-7, rel=1e-1)
    # every other parameter is reported bit-identical
    others = audit[~audit["parameter"].isin(bad["parameter"]) & (audit["part"] == "all")]
    assert others["bit_identical"].all() and len(others) > 5
    moved = slots[slots["slot"] == frozen].iloc[0]
    assert not moved["allowed"]
    # method='full' allows everything; nothing declared: every change is a violation
    assert diff_models(before, after, method="full").violations.empty
    strict = diff_models(before, after).violations  # nothing allowed: all changed rows are 'other rows'
    assert len(strict) == 2
    assert strict[strict["kind"] == "value rows"].iloc[0]["changed"] == int((before.values[1] != after.values[1]).sum())


def test_run_steps_rebuilt_from_deltas(ws):
    run = Run(ws["run"])
    slots, audit = diff_run_steps(run, ws["base"], 1, 3)
    assert audit["violation"].sum() == 0
    # the reference: rebuild by hand from the delta files
    ref_a = run.rebuild(MemoryModel.from_pretrained(ws["base"]), 1).values[1].detach()
    ref_b = run.rebuild(MemoryModel.from_pretrained(ws["base"]), 3).values[1].detach()
    changed = torch.nonzero((ref_a != ref_b).any(1)).flatten().tolist()
    assert sorted(slots["slot"]) == sorted(changed)
    allowed = set(allowed_rows(run, 1, 3)[1].tolist())
    assert allowed == set(run.selected()[2].tolist()) | set(run.selected()[3].tolist())
    # the final model equals step 3 rebuilt; diff_run_model agrees with the base → step 3 diff
    full_slots, full_audit = diff_run_model(run, ws["base"])
    step_slots, _ = diff_run_steps(run, ws["base"], 0, 3)
    assert full_slots.equals(step_slots) and not full_audit["violation"].any()


def test_bad_input_is_refused(ws, tmp_path):
    run = Run(ws["run"])
    for a, b in ((2, 2), (3, 1), (0, 9), (-1, 2)):
        with pytest.raises(AnalysisError):
            diff_run_steps(run, ws["base"], a, b)
    other = make_model(seed=1)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(RunError, match="started from model"):
        diff_run_steps(run, tmp_path / "other", 0, 1)
    before = MemoryModel.from_pretrained(ws["base"])
    with pytest.raises(AnalysisError, match="memory configs"):
        diff_models(before, make_model(knn=2))
    gpt2 = MemoryModel.from_preset("micro-gpt2", seed=0)
    with pytest.raises(AnalysisError, match="gpt2"):
        diff_models(before, gpt2)
    with pytest.raises(AnalysisError, match="out of range"):
        diff_models(before, before, allowed={1: [256]})
    with pytest.raises(ConfigError, match=r"^the model has no memory layer 0; its memory layers are \[1\]$"):
        diff_models(before, before, allowed={0: [1]})
    with pytest.raises(AnalysisError, match="allowed="):
        diff_models(before, before, method="sparse")


def test_access_shift_against_hand_sets(ws):
    before = MemoryModel.from_pretrained(ws["base"])
    after = MemoryModel.from_pretrained(ws["run"] / "model")
    with torch.no_grad():  # move the queries too, so the slot sets change (values alone do not change reads)
        after.memory_layers[1].query.weight.mul_(-1.0)
    texts = ["Ada Number0 was born in Paris.", "Where was Ada Number1 born?"]
    shift = access_shift(before, after, texts)
    assert list(shift.columns) == ["doc", "position", "token_id", "layer", "n_before", "n_after", "n_common", "jaccard"]
    ids = [before.tokenizer(t)["input_ids"] for t in texts]
    assert len(shift) == sum(map(len, ids))
    for doc, seq in enumerate(ids):  # reference: each text alone, its reads recorded, sets by hand
        sets = []
        for model in (before, after):
            with torch.no_grad(), AccessRecorder(model) as rec:
                model(input_ids=torch.tensor([seq]))
            sets.append(rec.batches[0].slots[:, 0].reshape(len(seq), -1))
        for pos in range(len(seq)):
            a, b = set(sets[0][pos].tolist()), set(sets[1][pos].tolist())
            row = shift[(shift["doc"] == doc) & (shift["position"] == pos)].iloc[0]
            assert row["token_id"] == seq[pos]
            assert row["jaccard"] == pytest.approx(len(a & b) / len(a | b), abs=1e-12)
            assert row["n_before"] == len(a) and row["n_common"] == len(a & b)
    assert shift["jaccard"].min() < 1.0
    same = access_shift(before, before, texts)
    assert (same["jaccard"] == 1.0).all()


def test_fact_shift(ws):
    before = MemoryModel.from_pretrained(ws["base"])
    after = MemoryModel.from_pretrained(ws["run"] / "model")
    df = fact_shift(before, after, ws["facts"])
    assert len(df) == 3 and list(df["fact_id"]) == ["f0", "f1", "f2"]
    assert (df["delta_f1"] == df["f1_after"] - df["f1_before"]).all()
    assert df["gold"].tolist() == CITIES[:3]
    with pytest.raises(AnalysisError):
        fact_shift(before, after, [])


def test_question_access_shift_probes_the_held_out_questions(ws):
    """The one access shift of a diff (report and app page): `access_shift` on the facts' held-out
    questions as qa_prompt text — not on their statements."""
    from smviz.analysis import question_access_shift
    from smviz.data.facts import qa_prompt

    before = MemoryModel.from_pretrained(ws["base"])
    after = MemoryModel.from_pretrained(ws["run"] / "model")
    with torch.no_grad():
        after.memory_layers[1].query.weight.mul_(-1.0)
    facts = ws["facts"]
    shift = question_access_shift(before, after, facts)
    probe = [qa_prompt(f"In which city was {f.subject} born?") for f in facts]  # the held-out template, by hand
    assert shift.equals(access_shift(before, after, probe))
    assert shift.attrs["probe_size"] == 3 and "held-out questions" in shift.attrs["protocol"]
    statements = access_shift(before, after, [s for f in facts for s in f.statements[:2]])  # the page's old probe
    assert len(statements) != len(shift)
    with pytest.raises(AnalysisError, match="no facts"):
        question_access_shift(before, after, [])


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_question_access_shift_in_a_prompt_format(ws):
    """qa (the default, and named): exactly the qa_prompt texts' prompt_access_shift, attrs included;
    chat: the probe is the chat template's prompts of the held-out questions, written out by hand."""
    from smviz.analysis import question_access_shift
    from smviz.analysis.shift import prompt_access_shift
    from smviz.data.facts import qa_prompt

    before = MemoryModel.from_pretrained(ws["base"])
    after = MemoryModel.from_pretrained(ws["run"] / "model")
    with torch.no_grad():
        after.memory_layers[1].query.weight.mul_(-1.0)
    facts = ws["facts"]
    held_out = [f"In which city was {f.subject} born?" for f in facts]
    qa_ref = prompt_access_shift(before, after, [qa_prompt(q) for q in held_out],
                                 what="the 3 facts' held-out questions as qa_prompt text")
    for shift in (question_access_shift(before, after, facts), question_access_shift(before, after, facts, prompt_format="qa")):
        assert shift.equals(qa_ref) and shift.attrs == qa_ref.attrs
    with pytest.raises(ConfigError, match="chat_template"):  # the micro tokenizer has no chat template
        question_access_shift(before, after, facts, prompt_format="chat")
    before.tokenizer.chat_template = CHAT_TEMPLATE
    chat = question_access_shift(before, after, facts, prompt_format="chat")
    chat_prompts = [f"<|user|>{q}\n<|assistant|>" for q in held_out]
    assert chat.equals(access_shift(before, after, chat_prompts))
    assert not chat.equals(qa_ref)
    assert chat.attrs["probe_size"] == 3 and "held-out questions as chat prompt text (3 prompts)" in chat.attrs["protocol"]
    with pytest.raises(ConfigError, match="unknown prompt format"):
        question_access_shift(before, after, facts, prompt_format="yaml")


def test_fact_shift_in_a_prompt_format(ws):
    """fact_shift's answers are answer_questions' in the format asked: qa with its 12 answer tokens by
    default, chat through the template (24 tokens); the chat answers are not the qa ones."""
    from smviz.evaluate import answer_questions

    before = MemoryModel.from_pretrained(ws["base"])
    after = MemoryModel.from_pretrained(ws["run"] / "model")
    facts = ws["facts"]
    qa = fact_shift(before, after, facts)
    assert qa.equals(fact_shift(before, after, facts, prompt_format="qa", max_new_tokens=12))
    for m in (before, after):
        m.tokenizer.chat_template = CHAT_TEMPLATE
    chat = fact_shift(before, after, facts, prompt_format="chat")
    for side, m in (("before", before), ("after", after)):
        rows = answer_questions(m, facts, prompt_format="chat", max_new_tokens=24)
        assert chat[f"answer_{side}"].tolist() == [r["prediction"] for r in rows]
        assert chat[f"f1_{side}"].tolist() == [r["f1"] for r in rows]
    assert chat[["answer_before", "answer_after"]].to_numpy().tolist() != qa[["answer_before", "answer_after"]].to_numpy().tolist()


def test_audit_with_a_run_needs_its_own_final_model(ws, tmp_path):
    from smviz.analysis import check_run_model, run_diff

    run = Run(ws["run"])
    before = MemoryModel.from_pretrained(ws["base"])
    after = MemoryModel.from_pretrained(ws["run"] / "model")
    assert run_diff(run, before, after).violations.empty
    other = make_model(seed=1)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(AnalysisError, match=f"ended with model {run.model_hash}, but the model compared is"):
        check_run_model(run, before, MemoryModel.from_pretrained(tmp_path / "other"))
    with pytest.raises(RunError, match="started from model"):
        check_run_model(run, MemoryModel.from_pretrained(tmp_path / "other"), after)


def test_prompt_access_shift_on_prompt_texts(ws):
    """The access shift of an editing diff: `access_shift` on the prompts given, its size and what was
    probed in attrs; the facts' version keeps its protocol word for word."""
    from smviz.analysis import question_access_shift
    from smviz.analysis.shift import prompt_access_shift

    before = MemoryModel.from_pretrained(ws["base"])
    after = MemoryModel.from_pretrained(ws["run"] / "model")
    with torch.no_grad():
        after.memory_layers[1].query.weight.mul_(-1.0)
    prompts = ["Ada Number0 was born in", "The birthplace of Ada Number1 is"]
    shift = prompt_access_shift(before, after, prompts, what="two rewrite prompts")
    assert shift.equals(access_shift(before, after, prompts))
    assert shift.attrs == {"probe_size": 2, "protocol": "probe: two rewrite prompts (2 prompts); per token and memory layer "
                                                        "the Jaccard of the slot sets read before vs after (access_shift)"}
    assert question_access_shift(before, after, ws["facts"]).attrs["protocol"] == (
        "probe: the 3 facts' held-out questions as qa_prompt text (3 prompts); per token and memory layer the Jaccard of "
        "the slot sets read before vs after (access_shift)")
    with pytest.raises(AnalysisError, match="no prompts"):
        prompt_access_shift(before, after, [])
