"""Pretraining: world texts never contain held-out questions, packing keeps documents whole, the batch
stream is a function of the step, a micro run lowers held-out loss, and an interrupted run resumes to
exactly the state of an uninterrupted one."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from smviz.data.corpus import load_articles
from smviz.data.facts import qa_prompt
from smviz.data.tokenizer import pack_documents, train_tokenizer
from smviz.data.world import WorldConfig, generate_world
from smviz.errors import ConfigError, SmvizError
from smviz.evaluate import heldout_nll
from smviz.train.data import IGNORE_INDEX, PretrainStream, pack_whole_documents, world_documents
from smviz.train.pretrain import PretrainConfig, lr_factor, pretrain


@pytest.fixture(scope="module")
def world():
    return generate_world(WorldConfig(n_known=6, n_bio_only=3, n_new=2))


@pytest.fixture(scope="module")
def setting(world):
    articles = load_articles()[:120]
    train_texts, heldout_texts = [a.text for a in articles[:100]], [a.text for a in articles[100:]]
    docs = world_documents(world.known + world.bio_only, world.known, copies=4, seed=0)
    tokenizer = train_tokenizer(train_texts + docs, vocab_size=512)
    seq_len = 32
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    world_ids, world_labels = pack_whole_documents(ids, seq_len, tokenizer.eos_token_id, tokenizer.pad_token_id)
    stream = PretrainStream(pack_documents(tokenizer, train_texts, seq_len), world_ids, world_labels, 8, 0.5, seed=0)
    heldout = pack_documents(tokenizer, heldout_texts, seq_len)
    return tokenizer, stream, heldout


def micro_config(**kw) -> PretrainConfig:
    base = dict(preset="micro", seq_len=32, batch_size=8, steps=12, lr=3e-3, warmup_steps=2, eval_every=0,
                log_every=2, checkpoint_every=4, usage_rows=4)
    return PretrainConfig(**(base | kw))


def test_world_documents_hold_no_heldout_question(world):
    docs = world_documents(world.known + world.bio_only, world.known, copies=3, seed=1)
    text = "\n".join(docs)
    heldout = {q.text for f in world.facts() for q in f.heldout_questions}
    assert heldout and not any(q in text for q in heldout)
    # every known fact's answer is asked with a training template, bio-only people are never asked
    for f in world.known:
        assert any(qa_prompt(q.text) in text for q in f.training_questions)
    for f in world.bio_only:
        assert "Question: " not in "".join(d for d in docs if f.subject in d)
        assert any(s in text for s in f.statements)
    # new people never appear
    assert not any(f.subject in text for f in world.new)
    # one biography per person and copy holds one statement of each relation
    people = {f.subject for f in world.known + world.bio_only}
    bios = [d for d in docs if "Question:" not in d]
    assert len(bios) == 3 * len(people)


def test_pack_whole_documents_never_splits():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    ids, labels = pack_whole_documents(docs, seq_len=6, eos=0, pad=99)
    # by hand: a document (with its eos) that does not fit the rest of a row starts the next row
    expected = [[1, 2, 3, 0, 99, 99], [4, 5, 0, 99, 99, 99], [6, 7, 8, 9, 0, 99], [10, 0, 99, 99, 99, 99]]
    assert ids.tolist() == expected
    assert (labels[ids == 99] == IGNORE_INDEX).all() and (labels[ids != 99] == ids[ids != 99]).all()


def test_stream_is_a_function_of_the_step(setting):
    _, stream, _ = setting
    a, b = stream.batch(5), stream.batch(5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(stream.batch(6)["input_ids"], a["input_ids"])
    assert torch.equal(a["attention_mask"], (a["labels"] != IGNORE_INDEX).long())
    corpus_only = stream.batch(5, fact_share=0.0)
    assert (corpus_only["attention_mask"] == 1).all()


def test_stream_draws_its_replay_share_from_the_replay_pool_and_nothing_else_changes(setting):
    _, stream, _ = setting
    replay = torch.full((3, stream.world_ids.shape[1]), 7)
    with_replay = dataclasses.replace(stream, fact_share=0.5, replay_ids=replay, replay_labels=replay, replay_share=0.25)
    no_share = dataclasses.replace(stream, replay_ids=replay, replay_labels=replay)  # a pool but no share: unused
    for step in range(4):
        plain, batch = stream.batch(step), with_replay.batch(step)
        assert all(torch.equal(plain[k], no_share.batch(step)[k]) for k in plain)
        # the same generator draws the world and corpus rows first: 4 world rows as before, 2 corpus, 2 replay
        assert torch.equal(batch["input_ids"][:4], plain["input_ids"][:4])
        assert torch.equal(batch["input_ids"][4:6], plain["input_ids"][4:6])
        assert (batch["input_ids"][6:] == 7).all() and not (batch["input_ids"][:6] == 7).all(dim=1).any()
    dataclasses.replace(stream, fact_share=0.9, replay_ids=replay, replay_labels=replay, replay_share=0.1)  # sums to 1
    with pytest.raises(SmvizError, match="no replay rows"):
        dataclasses.replace(stream, replay_share=0.25)
    with pytest.raises(SmvizError, match=r"replay_share must lie in \[0, 1 - fact_share\]"):
        dataclasses.replace(stream, fact_share=0.9, replay_ids=replay, replay_labels=replay, replay_share=0.25)


def test_lr_schedule_by_hand():
    c = micro_config(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, c) == pytest.approx(0.1)
    assert lr_factor(9, c) == pytest.approx(1.0)
    assert lr_factor(10, c) == pytest.approx(1.0)
    assert lr_factor(60, c) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert lr_factor(110, c) == pytest.approx(0.1)
    d = micro_config(steps=110, warmup_steps=10, dense_phase_steps=50)
    assert lr_factor(50, d) == pytest.approx(0.1)  # warmup restarts when the memory comes in


def test_micro_pretraining_lowers_heldout_loss(tmp_path, setting):
    tokenizer, stream, heldout = setting
    config = micro_config(steps=40, checkpoint_every=40)
    from smviz.train.pretrain import build_model

    before = heldout_nll(build_model(config, tokenizer), heldout)["nll"]
    model = pretrain(tmp_path / "run", config, tokenizer=tokenizer, stream=stream, usage_rows=heldout[:4], progress=False)
    after = heldout_nll(model, heldout)["nll"]
    assert after < before - 0.5
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    final = [x for x in lines if "eval" in x][-1]
    assert final["step"] == 40 and "heldout_usage" in final["eval"]


def test_resume_equals_uninterrupted(tmp_path, setting):
    tokenizer, stream, heldout = setting
    config = micro_config(steps=12, log_every=2, checkpoint_every=4, dense_phase_steps=3, dense_lr_mult=0.5)
    whole = pretrain(tmp_path / "a", config, tokenizer=tokenizer, stream=stream, progress=False)
    pretrain(tmp_path / "b", config, tokenizer=tokenizer, stream=stream, stop_after=4, progress=False)
    # a run killed after logging step 6 but before its next checkpoint: that line is written again
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 6, "loss": 123.0}) + "\n")
    resumed = pretrain(tmp_path / "b", config, tokenizer=tokenizer, stream=stream, progress=False)
    for (name, x), (_, y) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(x, y), name
    strip = lambda p: [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"} for x in p.read_text().splitlines()]
    assert strip(tmp_path / "a" / "metrics.jsonl") == strip(tmp_path / "b" / "metrics.jsonl")


def test_run_dir_refuses_another_config(tmp_path, setting):
    tokenizer, stream, _ = setting
    pretrain(tmp_path / "r", micro_config(steps=2, checkpoint_every=2), tokenizer=tokenizer, stream=stream, progress=False)
    before = (tmp_path / "r" / "config.json").read_bytes()
    with pytest.raises(SmvizError, match="different config"):
        pretrain(tmp_path / "r", micro_config(steps=3), tokenizer=tokenizer, stream=stream, progress=False)
    assert (tmp_path / "r" / "config.json").read_bytes() == before


def test_bad_config(caplog):
    with pytest.raises(ConfigError):
        micro_config(preset="huge")
    with pytest.raises(ConfigError):
        micro_config(fact_share=1.5)
    with pytest.raises(ConfigError):
        micro_config(steps=5, dense_phase_steps=5)
    for bad in ({"lr": float("inf")}, {"lr": float("nan")}, {"lr": 0}):
        with pytest.raises(ConfigError, match="PretrainConfig.lr must be"):
            PretrainConfig.from_dict({"preset": "micro", **bad})
    with pytest.raises(ConfigError, match="PretrainConfig.steps must be an integer"):
        PretrainConfig.from_dict({"preset": "micro", "steps": "many"})
    with pytest.raises(ConfigError, match="PretrainConfig.memory must be an object"):
        PretrainConfig.from_dict({"preset": "micro", "memory": "big"})
    # a config read from disk may come from a newer smviz: unknown keys are ignored, with a warning
    with caplog.at_level("WARNING"):
        config = PretrainConfig.from_dict({"preset": "micro", "stepz": 3, "memory": {"knn": 2}})
    assert config == PretrainConfig(preset="micro", memory={"knn": 2}) and "ignoring unknown fields ['stepz']" in caplog.text


def test_every_config_field_has_help():
    from smviz.config import field_help
    from smviz.train import FinetuneConfig

    for cls in (PretrainConfig, FinetuneConfig):
        assert all(f.help for f in field_help(cls)), cls


def test_dense_twin_uses_as_many_parameters_per_token_and_pretrains(tmp_path, setting):
    from smviz.model import MemoryModel
    from smviz.record import AccessRecorder
    from smviz.train.recipes import active_parameters, dense_twin

    tokenizer, stream, heldout = setting
    config = micro_config(steps=6, checkpoint_every=6, memory={"value_lr_mult": 10})
    memory = MemoryModel.from_preset("micro", vocab_size=len(tokenizer))
    c = memory.memory_config
    # by hand: every parameter, but of the value table only the rows a token reads (heads × knn of them)
    by_name = {n: p.numel() for n, p in memory.named_parameters()}
    values = [n for n in by_name if n.endswith("values.weight")]
    assert len(values) == 1
    active = sum(by_name.values()) - by_name[values[0]] + c.heads * c.knn * (c.v_dim or memory.lm.config.hidden_size)
    assert active_parameters(memory) == active
    twin = dense_twin(config, len(tokenizer))
    assert twin.memory == {"layers": []} and twin.steps == config.steps and twin.lr == config.lr
    width = twin.model["intermediate_size"]
    dense = MemoryModel.from_preset("micro", vocab_size=len(tokenizer), hf_overrides=twin.model, layers=[])
    assert not dense.memory_layers and dense.lm.config.intermediate_size == width
    per_width = 3 * memory.lm.config.hidden_size * memory.lm.config.num_hidden_layers  # gate, up, down per block
    assert abs(sum(p.numel() for p in dense.parameters()) - active) <= per_width / 2  # the nearest width
    # it pretrains, and what needs a memory says the model has none
    model = pretrain(tmp_path / "dense", twin, tokenizer=tokenizer, stream=stream, usage_rows=heldout[:4], progress=False)
    assert not model.memory_layers and heldout_nll(model, heldout)["nll"] > 0
    with pytest.raises(ConfigError, match="no memory layers \\(a dense model\\), and recording memory reads needs one"):
        AccessRecorder(model)
    with pytest.raises(ConfigError, match="dense already"):
        dense_twin(twin, len(tokenizer))
    from smviz.train.finetune import FinetuneConfig, check_inputs

    model.save_pretrained(tmp_path / "dense-model")
    saved = MemoryModel.from_pretrained(tmp_path / "dense-model")
    check_inputs(saved, FinetuneConfig(method="full", optimizer="adamw"), None)  # dense baselines run
    check_inputs(saved, FinetuneConfig(method="lora", optimizer="adamw"), None)
    with pytest.raises(ConfigError, match="and sparse finetuning needs one"):
        check_inputs(saved, FinetuneConfig(method="sparse"), None)
    with pytest.raises(ConfigError, match="and full finetuning with freeze_memory or value_lr_mult needs one"):
        check_inputs(saved, FinetuneConfig(method="full", optimizer="adamw", freeze_memory=True), None)
