"""The method and selection-rule registries (what each method trains, its defaults; a duplicate name is
refused) and the `kl` rule against a hand-computed example: score = p·log(p/q), p the batch's read
shares, q the background's with add-one smoothing, top-t of the slots the batch read."""

from __future__ import annotations

import math

import pytest
import torch

from smviz.errors import ConfigError
from smviz.stats import SlotStats, rank
from smviz.train import (
    FinetuneConfig,
    Method,
    RowSelector,
    SelectionRule,
    get_method,
    get_rule,
    method_names,
    register_method,
    register_rule,
    rule_names,
)
from smviz.train.methods import ADAPTERS, ALL_PARAMETERS, VALUE_ROWS

CPU = torch.device("cpu")


def test_registries_hold_the_methods_as_named_in_run_configs():
    assert method_names() == ("sparse", "tf-only", "memory-all", "random-t", "kl", "grad-norm", "sparse-tf-ties", "full", "lora")
    assert rule_names() == ("tf-idf", "tf-only", "memory-all", "random-t", "kl", "grad-norm", "tf-idf-tf-ties")
    assert get_rule("grad-norm").ranks_gradient and not get_rule("tf-idf").ranks_gradient
    sparse, kl, full, lora = (get_method(m) for m in ("sparse", "kl", "full", "lora"))
    assert (sparse.trains, sparse.rule, sparse.needs_stats, sparse.uses_top_t) == (VALUE_ROWS, "tf-idf", True, True)
    assert (kl.trains, kl.rule, kl.needs_stats) == (VALUE_ROWS, "kl", True)
    assert not get_method("tf-only").needs_stats and not get_method("memory-all").uses_top_t
    assert (full.trains, lora.trains) == (ALL_PARAMETERS, ADAPTERS)
    # the defaults runs have always recorded
    assert FinetuneConfig(method="sparse").resolved().lr == 1000.0 and FinetuneConfig(method="kl").resolved().optimizer == "sgd"
    assert (FinetuneConfig(method="full").resolved().optimizer, FinetuneConfig(method="full").resolved().lr) == ("adamw", 5e-5)
    assert FinetuneConfig(method="lora").resolved().lr == 3e-4
    assert FinetuneConfig(method="sparse", optimizer="adamw").resolved().lr == 0.1
    assert "every parameter" in full.audit_allows and "lora_targets" in lora.audit_allows


def test_duplicate_names_are_refused():
    before = method_names(), rule_names()
    with pytest.raises(ConfigError, match="'kl' is already registered"):
        register_rule(SelectionRule("kl", get_rule("kl").choose, "again"))
    with pytest.raises(ConfigError, match="method named 'sparse' is already registered"):
        register_rule(SelectionRule("tf-idf-2", get_rule("tf-idf").choose, "again", method="sparse"))
    with pytest.raises(ConfigError, match="method named 'full' is already registered"):
        register_method(Method("full", ALL_PARAMETERS, "again", "adamw", {"sgd": 1.0, "adamw": 1.0}))
    assert (method_names(), rule_names()) == before
    with pytest.raises(ConfigError, match="unknown method 'dense'; choose one of sparse, tf-only"):
        FinetuneConfig(method="dense")


def kl_background() -> SlotStats:
    counts = torch.tensor([[6, 0, 3, 1, 0]])  # Σ = 10, N = 5
    return SlotStats((1,), 5, "batch", counts, (counts > 0).long() * 2, n_docs=4)


def test_kl_rule_by_hand():
    counts = torch.tensor([2, 1, 0, 1, 4])  # Σ = 8; slot 2 is not read
    # p = c / 8 = (0.25, 0.125, -, 0.125, 0.5); q = (b + 1) / (10 + 5) = (7, 1, 4, 2, 1) / 15
    #   slot 0: 0.25  · ln(0.25  / (7/15)) = -0.1560386
    #   slot 1: 0.125 · ln(0.125 / (1/15)) =  0.0785761
    #   slot 3: 0.125 · ln(0.125 / (2/15)) = -0.0080673
    #   slot 4: 0.5   · ln(0.5   / (1/15)) =  1.0074515
    hand = {0: 0.25 * math.log(0.25 * 15 / 7), 1: 0.125 * math.log(0.125 * 15), 3: 0.125 * math.log(0.125 * 15 / 2),
            4: 0.5 * math.log(0.5 * 15)}
    assert [round(hand[i], 7) for i in (0, 1, 3, 4)] == [-0.1560386, 0.0785761, -0.0080673, 1.0074515]
    stats = kl_background()
    sel = RowSelector("kl", 2, 5, stats, CPU).select(1, counts, step=0)
    assert sel.rows.tolist() == [4, 1]
    assert sel.score.tolist() == pytest.approx([hand[4], hand[1]], rel=1e-12)
    assert sel.tf.tolist() == [0.5, 0.125] and sel.df.tolist() == [0, 0] and sel.accessed == 4
    every = RowSelector("kl", 5, 5, stats, CPU).select(1, counts, step=0)
    assert every.rows.tolist() == [4, 1, 3, 0]  # t beyond the reads: every read slot; slot 2 (p = 0) never
    assert every.score.tolist() == pytest.approx([hand[i] for i in (4, 1, 3, 0)], rel=1e-12)
    # equal p and q: a tie, to the lower slot id
    tie = RowSelector("kl", 1, 5, stats, CPU).select(1, torch.tensor([0, 3, 0, 0, 3]), step=0)
    assert tie.rows.tolist() == [1]
    with pytest.raises(ConfigError, match="kl selection needs the model's background slot statistics"):
        RowSelector("kl", 2, 5, None, CPU)


def test_tf_ties_rule_by_hand():
    # 6 slots, background of 4 batches: slots 1, 2 and 4 were read in every one (idf 0)
    df = torch.tensor([[1, 4, 4, 0, 4, 2]])
    stats = SlotStats((1,), 6, "batch", df * 3, df, n_docs=4)
    counts = torch.tensor([1, 1, 5, 2, 3, 0])  # Σ = 12; slot 5 not read
    idf = [math.log(5 / 2), 0.0, 0.0, math.log(5), 0.0]
    tf = [c / 12 for c in (1, 1, 5, 2, 3)]
    # nonzero scores: slot 3 (2/12·ln 5 = 0.268), slot 0 (1/12·ln 2.5 = 0.076); then the zero-IDF ties:
    # sparse fills them by slot id (1, 2, 4), this rule by TF (2: 5/12, 4: 3/12, 1: 1/12)
    assert [round(t * i, 3) for t, i in zip(tf, idf)] == [0.076, 0.0, 0.0, 0.268, 0.0]
    ties = RowSelector("sparse-tf-ties", 4, 6, stats, CPU).select(1, counts, step=0)
    plain = RowSelector("sparse", 4, 6, stats, CPU).select(1, counts, step=0)
    assert ties.rows.tolist() == [3, 0, 2, 4] and plain.rows.tolist() == [3, 0, 1, 2]
    assert ties.score.tolist() == pytest.approx([tf[3] * idf[3], tf[0] * idf[0], 0.0, 0.0])
    assert RowSelector("sparse-tf-ties", 5, 6, stats, CPU).select(1, counts, step=0).rows.tolist() == [3, 0, 2, 4, 1]


def test_kl_rule_against_brute_force():
    g = torch.Generator().manual_seed(0)
    n = 64
    for trial in range(20):
        bg = torch.randint(0, 5, (1, n), generator=g) * (torch.rand(1, n, generator=g) < 0.7)
        stats = SlotStats((3,), n, "batch", bg, (bg > 0).long(), n_docs=1)
        counts = torch.randint(0, 4, (n,), generator=g) * (torch.rand(n, generator=g) < 0.5)
        read = [i for i in range(n) if counts[i] > 0]
        total, bg_total = int(counts.sum()), int(bg.sum())
        score = {i: counts[i].item() / total * math.log((counts[i].item() / total) / ((bg[0, i].item() + 1) / (bg_total + n)))
                 for i in read}
        t = int(torch.randint(1, n, (1,), generator=g))
        ranked = sorted(read, key=lambda i: (-round(score[i], 12), i))[:t]
        sel = RowSelector("kl", t, n, stats, CPU).select(3, counts, step=trial)
        assert sel.rows.tolist() == ranked, trial
        assert sel.score.tolist() == pytest.approx([score[i] for i in ranked], rel=1e-12)


def test_a_new_rule_is_one_register_call(monkeypatch):
    """What adding a rule takes: a function and a `register_rule` call; finetune, the CLI and the audit
    then know the method (here: the t least-read slots, ties to the lower id)."""
    import smviz.train.methods
    import smviz.train.selection

    # registered for this test only: the registries are restored afterwards
    monkeypatch.setattr(smviz.train.methods, "_METHODS", dict(smviz.train.methods._METHODS))
    monkeypatch.setattr(smviz.train.selection, "_RULES", dict(smviz.train.selection._RULES))

    def least_read(reads):
        return -reads.tf, rank(-reads.tf, reads.top_t)

    register_rule(SelectionRule("test-least-read", least_read, "t least-read slots (a test rule)"))
    assert method_names()[-1] == "test-least-read" and get_method("test-least-read").trains == VALUE_ROWS
    config = FinetuneConfig(method="test-least-read", top_t=2).resolved()
    assert (config.optimizer, config.lr, config.sparse) == ("sgd", 1000.0, True)
    sel = RowSelector("test-least-read", 2, 5, None, CPU).select(1, torch.tensor([2, 1, 0, 1, 4]), step=0)
    assert sel.rows.tolist() == [1, 3]
