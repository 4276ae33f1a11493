"""`smviz demo --model SRC` (smviz.workspace.stages.real_demo) end to end on a micro Llama standing in for
SmolLM2: imported, retrofitted with the smollm2 recipe (shortened), probed, recorded, finetuned three ways,
reported; a second run skips every stage and changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from smviz.data.formats import read_data
from smviz.data.prompts import get_prompt_format
from smviz.data.tokenizer import train_tokenizer
from smviz.evaluate.probe import answering_model, provenance_path
from smviz.model import MemoryModel, import_model, load_base_model
from smviz.train import FinetuneConfig
from smviz.train.recipes import RETROFIT_RECIPES
from smviz.workspace import Workspace
from smviz.workspace.stages import run_real_demo
from test_evaluate import greedy_ids_reference
from test_import import TEXTS, micro_llama, write_hf_dir

SHORT = dict(steps=6, batch_size=4, eval_every=3, eval_facts=4, usage_rows=4, log_every=3, checkpoint_every=3,
             prompt_format="qa", replay=0, replay_share=0.0,  # replay: test_retrofit (a micro model answers a qa prompt with nothing)
             memory={"n_keys": 16, "knn": 8, "heads": 2, "value_lr_mult": 10})
STREAM = dict(max_facts=2, known_facts=4, heldout_rows=4, config=dict(batch_size=4, steps_per_fact=2, eval_every=2, top_t=16),
              per_method={"sparse": {"lr": 500.0}})


QUESTIONS = ["Who wrote Emma?", "What is the capital of France?", "Where did the cat sit?"]


def probe_set(tmp, src) -> tuple[str, list[str]]:
    """A QA file the micro model answers in part: its own greedy answers as golds for the first two
    questions (asked of a separate import of the same source), a wrong one for the last."""
    import_model(src, tmp / "probe-base")
    model = answering_model(tmp / "probe-base")
    fmt = get_prompt_format("qa")
    answers = [greedy_ids_reference(model, model.tokenizer, fmt.encode_prompt(model.tokenizer, q)) for q in QUESTIONS[:2]]
    assert all(answers)
    path = tmp / "probe-set.jsonl"
    golds = [*answers, "zzqx"]
    path.write_text("".join(json.dumps({"id": f"q{i}", "question": q, "answer": a}) + "\n"
                            for i, (q, a) in enumerate(zip(QUESTIONS, golds))))
    return str(path), ["q0", "q1"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real-demo")
    tokenizer = train_tokenizer(TEXTS, vocab_size=300)
    src = write_hf_dir(tmp / "micro-llama", micro_llama(tokenizer), tokenizer)
    qa_set, expected = probe_set(tmp, src)
    stream = STREAM | {"probe_set": qa_set}
    lines: list[str] = []
    result = run_real_demo(tmp / "ws", src=str(src), device="cpu", say=lines.append, stream=stream, stats_batches=2, **SHORT)
    return tmp / "ws", src, stream, result, lines, expected


def test_the_real_model_demo_builds_every_stage(demo):
    root, src, stream, result, lines, expected = demo
    ws = Workspace(root)
    base, _, metadata = load_base_model(ws.model("micro-llama"))
    assert metadata["source"]["kind"] == "hf-dir"
    model = MemoryModel.from_pretrained(ws.model("micro-llama-memory"))
    assert list(model.memory_layers) == [1]  # not the recipe's block 24: the default, two thirds of 2 blocks
    config = json.loads((ws.pretrain_run("micro-llama-memory") / "config.json").read_text())["config"]
    assert config["steps"] == 6 and config["fact_share"] == RETROFIT_RECIPES["smollm2"]["config"]["fact_share"]
    provenance = json.loads(provenance_path(ws.data / "probe-real.jsonl").read_text())
    assert provenance["model_hash"] == metadata["model_hash"] and provenance["asked"] == 3
    assert [i.id for i in read_data(ws.data / "probe-real.jsonl")[1]] == expected and result["probe"] == 2
    for method in ("sparse", "full", "lora"):
        summary = result["runs"][method]
        assert summary["base_model_hash"] == model.model_hash
        assert summary["protocol"]["known"].startswith("held-out question templates of 4 known facts")
        assert summary["metrics"]["forget"]["real"]["contained"]["start"] == 1.0  # the probe: what the base answers
        assert summary["config"]["lr"] == (500.0 if method == "sparse" else FinetuneConfig(method=method).resolved().lr)
    assert (ws.trace("new-facts") / "meta.json").is_file()
    assert all(Path(p).is_file() for p in result["reports"].values())
    assert any(line.startswith("[3/10] retrofitting") for line in lines)


def test_a_second_run_skips_every_stage(demo):
    root, src, stream, *_ = demo
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    lines: list[str] = []
    run_real_demo(root, src=str(src), device="cpu", say=lines.append, stream=stream, stats_batches=2, **SHORT)
    stage_lines = [line for line in lines if line.startswith("[")]
    assert len(stage_lines) == 10 and all(line.endswith("skipped") for line in stage_lines)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before
