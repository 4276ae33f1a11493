"""Retrofit (`smviz retrofit`, smviz.workspace.stages.retrofit with a RetrofitConfig through pretraining's
loop): a micro Llama imported as a base model starts unchanged when its memory is attached, trains only
its memory (every base tensor bit-identical, no base gradient or optimizer state), resumes bit for bit,
logs diagnostics that equal their recomputation (NLL with the memory off = the base's), writes its Q/A
texts in the chat format when asked, and refuses bad input in one line with nothing written."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import transformers

from smviz.cli import main
from smviz.data.prompts import get_prompt_format
from smviz.data.tokenizer import train_tokenizer
from smviz.data.world import WorldConfig
from smviz.errors import ConfigError, ModelFileError, RunError
from smviz.evaluate import heldout_nll, memory_activity
from smviz.data.corpus import Article
from smviz.evaluate.probe import answering_model
from smviz.model import MemoryModel, import_model, load_base_model, model_dir_hash, preset
from smviz.train.data import world_documents
from smviz.train.distill import distillation_loss
from smviz.train.pretrain import RetrofitConfig, build_model
from smviz.train.rundir import PretrainRunDir
from smviz.workspace import Workspace
from smviz.workspace.stages import (
    background_stats, build_data, heldout_rows, load_data, make_stream, pretrain_config_of, run_retrofit,
)
from smviz.workspace.stages.data import WorkspaceData
from smviz.workspace.stages.replay import REPLAY_FILE, REPLAY_TEMPLATES, REPLAY_TOKENS, replay_questions, replay_texts
from test_evaluate import greedy_ids_reference  # the unbatched greedy reference, shared

MEMORY = {"n_keys": 16, "heads": 2, "knn": 4, "k_dim": 32, "value_lr_mult": 10}
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    """A micro workspace (world and corpus) holding a base model imported from a plain micro Llama
    HF directory with a chat-template tokenizer, at WS/models/base."""
    ws = Workspace(tmp_path_factory.mktemp("retrofit"))
    build_data(ws.data, WorldConfig(n_known=4, n_bio_only=1, n_new=2))
    data = load_data(ws.data)
    tokenizer = train_tokenizer([a.text for a in data.corpus_train[:200]] + data.training_world_texts(copies=4, seed=0),
                                vocab_size=512)
    tokenizer.chat_template = CHATML
    hf = dict(preset("micro").hf, vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
              eos_token_id=tokenizer.eos_token_id, pad_token_id=None)
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf))
    src = ws.root / "hf-micro"
    lm.save_pretrained(src)
    tokenizer.save_pretrained(src)
    import_model(src, ws.model("base"))
    return ws


def config(ws: Workspace, **kw) -> RetrofitConfig:
    base = dict(base=str(ws.model("base")), memory=MEMORY, seq_len=32, batch_size=4, steps=8, lr=3e-3, warmup_steps=2,
                eval_every=4, eval_facts=2, log_every=2, checkpoint_every=4, usage_rows=4)
    return RetrofitConfig(**(base | kw))


@pytest.fixture(scope="module")
def trained(ws):
    """The model of an uninterrupted 8-step retrofit, run "whole"."""
    return run_retrofit(ws, "whole", config(ws), device=CPU, progress=False)


def base_state(ws: Workspace) -> dict[str, torch.Tensor]:
    lm, _, _ = load_base_model(ws.model("base"))
    return lm.state_dict()


def lm_state_without_memory(model: MemoryModel) -> dict[str, torch.Tensor]:
    """The LM tensors of a memory model under the base's names (a parallel memory keeps the FFN at mlp.ffn)."""
    return {k.replace("mlp.ffn.", "mlp."): v for k, v in model.lm.state_dict().items() if ".mlp.memory." not in k}


def evals(ws: Workspace, name: str) -> list[dict]:
    return [r for r in PretrainRunDir(ws.pretrain_run(name)).metrics() if "eval" in r]


# --------------------------------------------------------------------------- the model a retrofit starts from


def test_attached_model_starts_as_the_base_exactly(ws):
    base, tokenizer, _ = load_base_model(ws.model("base"))
    start = build_model(config(ws), None).eval()
    assert list(start.memory_layers) == [1] and start.memory_config.mode == "parallel"  # 2 blocks: 2·2//3 = 1
    ids = tokenizer("Question: Where was the author born?\nAnswer: in the city", return_tensors="pt").input_ids
    with torch.no_grad():
        assert (start(input_ids=ids).logits - base(input_ids=ids).logits).abs().max().item() == 0.0
    # the memory is a function of the seed alone
    again, other = build_model(config(ws), None), build_model(config(ws, seed=1), None)
    assert all(torch.equal(a, b) for a, b in zip(start.state_dict().values(), again.state_dict().values()))
    assert not torch.equal(start.values[1], other.values[1])


# --------------------------------------------------------------------------- training only the memory


def test_only_the_memory_trains_and_the_base_takes_no_gradient(ws, trained):
    assert lm_state_without_memory(trained).keys() == base_state(ws).keys()
    for name, tensor in base_state(ws).items():
        assert torch.equal(lm_state_without_memory(trained)[name], tensor), name
    memory = {id(p) for layer in trained.memory_layers.values() for p in layer.parameters()}
    for name, p in trained.named_parameters():
        if id(p) not in memory:
            assert not p.requires_grad and p.grad is None, name
    start = build_model(config(ws), None)
    assert not torch.equal(trained.values[1], start.values[1])
    assert not torch.equal(trained.memory_layers[1].w2.weight, start.memory_layers[1].w2.weight)
    # optimizer state exists for the memory's parameters only
    run = PretrainRunDir(ws.pretrain_run("whole"))
    saved = run.checkpoint_optimizer()
    moments = sorted(tuple(t.shape) for k, t in saved.items() if k.endswith(".exp_avg"))
    assert moments == sorted(tuple(p.shape) for p in trained.parameters() if p.requires_grad)
    assert sum(p.numel() for p in trained.parameters() if p.requires_grad) == sum(
        p.numel() for layer in trained.memory_layers.values() for p in layer.parameters())
    # the saved model is the trained one, and it loads as an ordinary memory model
    loaded = MemoryModel.from_pretrained(ws.model("whole"))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), trained.state_dict().values()))


def test_unfreezing_the_base_trains_it_at_its_multiplier(ws):
    model = run_retrofit(ws, "unfrozen", config(ws, steps=2, eval_every=0, checkpoint_every=2, dense_lr_mult=0.5),
                         device=CPU, progress=False)
    state = lm_state_without_memory(model)
    assert any(not torch.equal(state[k], v) for k, v in base_state(ws).items())
    assert all(p.requires_grad for p in model.parameters())


# --------------------------------------------------------------------------- resume


def test_interrupted_retrofit_resumes_to_the_uninterrupted_one(ws, trained):
    run_retrofit(ws, "parts", config(ws), device=CPU, stop_after=4, progress=False)
    assert not ws.model("parts").exists()  # saved only once finished
    resumed = run_retrofit(ws, "parts", config(ws), device=CPU, progress=False)
    for (name, x), (_, y) in zip(trained.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(x, y), name

    def lines(name: str) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in PretrainRunDir(ws.pretrain_run(name)).metrics()]

    # value movement after the resume is measured against the same initial values
    assert lines("parts") == lines("whole") and [r["step"] for r in evals(ws, "parts")] == [4, 8]


# --------------------------------------------------------------------------- diagnostics


def test_logged_diagnostics_equal_their_recomputation(ws, trained):
    data = load_data(ws.data)
    rows = heldout_rows(data, trained.tokenizer, 32)[:4]
    base, _, _ = load_base_model(ws.model("base"))
    base_nll = heldout_nll(base, rows)["nll"]
    for record in evals(ws, "whole"):
        health = record["eval"]["health"]
        assert health["nll_memory_off"] == base_nll  # the memory off is the base, exactly
        assert health["tokens"] == 4 * 31
        assert set(record["eval"]) >= {"heldout_usage", "known_em", "bio_only_em", "new_em", "known_train_em",
                                       "known_em_memory_off", "health"}
    final = evals(ws, "whole")[-1]["eval"]
    assert final["health"]["nll_memory_on"] == heldout_nll(trained, rows)["nll"] != base_nll
    v, v0 = trained.values[1].double(), build_model(config(ws), None).values[1].double()
    block = final["health"]["blocks"]["1"]
    assert block["value_movement"] == pytest.approx(((v - v0) ** 2).sum().sqrt().item() / (v0 ** 2).sum().sqrt().item(), rel=1e-9)
    assert block["value_movement"] > 0
    assert block == pytest.approx(memory_activity(trained, rows)["1"] | {"value_movement": block["value_movement"]})
    assert block["memory_ffn_ratio"] > 0  # trained, the memory is heard
    first = evals(ws, "whole")[0]["eval"]["heldout_usage"]["1"]
    assert 0 < first["used_share"] <= 1 and first["dead"] == round(first["slots"] * (1 - first["used_share"]))


# --------------------------------------------------------------------------- chat-format world texts


def test_chat_format_writes_one_conversation_per_qa_pair(ws):
    data = load_data(ws.data)
    tokenizer = build_model(config(ws), None).tokenizer
    world = data.world
    docs = world_documents(world.known + world.bio_only, world.known, copies=2, seed=0, prompt_format="chat",
                           tokenizer=tokenizer)
    chat = get_prompt_format("chat")
    conversations = [d for d in docs if d.startswith("<|im_start|>")]
    assert len(conversations) == 2 * len(world.known) and len(docs) - len(conversations) == 2 * len(
        {f.subject for f in world.known + world.bio_only})
    pairs = {chat.training_text(tokenizer, q.text, f.answer) for f in world.known for q in f.training_questions}
    assert set(conversations) <= pairs
    heldout = {q.text for f in world.facts() for q in f.heldout_questions}
    assert not any(q in d for q in heldout for d in docs)
    with pytest.raises(ConfigError, match="chat_template"):
        world_documents(world.known, world.known, copies=1, seed=0, prompt_format="chat",
                        tokenizer=train_tokenizer(["a b c"] * 10, vocab_size=300))


def test_replay_questions_skip_what_the_probe_asks():
    titles = ["Paris", "Mona Lisa", "Zebra crossing", "Tokyo", "Quartz"]  # a probe answer, in a question, neither...
    data = WorkspaceData(world=None, corpus_train=[Article(f"a{i}", t, "text") for i, t in enumerate(titles)], corpus_heldout=[])
    questions = replay_questions(data, 10, seed=0)
    asked = sorted(title for q in questions for t in REPLAY_TEMPLATES for title in ("Quartz", "Zebra crossing")
                   if q == t.format(title))
    assert len(questions) == 2 and asked == ["Quartz", "Zebra crossing"]
    assert replay_questions(data, 1, seed=0)[0] in questions
    assert replay_questions(data, 10, seed=0) == questions  # seeded: order and templates
    many = WorkspaceData(world=None, corpus_train=[Article(f"a{i}", f"Topic {i}", "t") for i in range(60)], corpus_heldout=[])
    used = {t for q in replay_questions(many, 60, seed=1) for t in REPLAY_TEMPLATES
            if any(q == t.format(f"Topic {i}") for i in range(60))}
    assert used == set(REPLAY_TEMPLATES)  # 60 questions draw every shape


@pytest.fixture(scope="module")
def talkative(ws) -> Path:
    """The base with its output rows of newline-bearing tokens and eos zeroed: a random micro Llama
    otherwise answers every chat question with a newline, i.e. nothing."""
    lm, tokenizer, _ = load_base_model(ws.model("base"))
    quiet = [i for i in range(len(tokenizer)) if "\n" in tokenizer.decode([i])] + [tokenizer.eos_token_id]
    lm.config.tie_word_embeddings = False
    lm.lm_head.weight = torch.nn.Parameter(lm.lm_head.weight.detach().clone())
    with torch.no_grad():
        lm.lm_head.weight[quiet] = 0.0
    src = ws.root / "hf-talkative"
    lm.save_pretrained(src)
    tokenizer.save_pretrained(src)
    import_model(src, ws.model("talkative"))
    return ws.model("talkative")


def test_replay_trains_on_the_base_models_own_answers(ws, talkative):
    cfg = config(ws, base=str(talkative), replay=3, prompt_format="chat", steps=4, eval_every=4, checkpoint_every=4,
                 seq_len=128)  # whole replay texts, answers included
    run_retrofit(ws, "replay", cfg, device=CPU, progress=False)
    path = ws.pretrain_run("replay") / REPLAY_FILE
    head, *records = [json.loads(line) for line in path.read_text().splitlines()]
    assert head["base_model_hash"] == model_dir_hash(talkative) and head["questions"] == 3
    assert len(records) == 3 and all(r["answer"] for r in records)
    base = answering_model(talkative)
    chat = get_prompt_format("chat")
    expected = []
    for q in replay_questions(load_data(ws.data), 3, seed=0):
        answer = greedy_ids_reference(base, base.tokenizer, chat.encode_prompt(base.tokenizer, q), REPLAY_TOKENS)
        stop = answer.rfind(".")
        if answer:
            expected.append({"question": q, "answer": answer[: stop + 1] if stop > 0 else answer})
    assert records == expected
    texts = replay_texts(path.parent, base, head["base_model_hash"], load_data(ws.data), n=3, seed=0, prompt_format="chat")
    assert texts == [chat.training_text(base.tokenizer, r["question"], r["answer"]) for r in records]
    # the stream trains on them beside the world's documents
    without, with_replay = make_stream(load_data(ws.data), base.tokenizer, cfg), make_stream(load_data(ws.data), base.tokenizer, cfg, texts)
    def holds(stream, ids: list[int]) -> bool:
        rows = stream.world_ids.tolist()
        return any(row[i : i + len(ids)] == ids for row in rows for i in range(len(row) - len(ids) + 1))

    for r, ids in zip(records, base.tokenizer(texts, add_special_tokens=False)["input_ids"]):
        start = len(chat.encode_prompt(base.tokenizer, r["question"]))
        answer_ids = ids[start : start + 8]  # the answer's first tokens, right after the question's prompt
        assert holds(with_replay, answer_ids) and not holds(without, answer_ids)
    # with a replay_share the replay has its own pool: that share of every batch, the world's untouched
    own = dataclasses.replace(cfg, fact_share=0.5, replay_share=0.25, batch_size=8)
    split = make_stream(load_data(ws.data), base.tokenizer, own, texts)
    assert torch.equal(split.world_ids, without.world_ids)
    replay_rows = {tuple(row) for row in split.replay_ids.tolist()}
    assert replay_rows and not replay_rows & {tuple(row) for row in split.world_ids.tolist()}
    world_rows = {tuple(row) for row in split.world_ids.tolist()}
    for step in range(3):
        rows = [tuple(row) for row in split.batch(step)["input_ids"].tolist()]
        assert sum(r in replay_rows for r in rows) == 2 and sum(r in world_rows for r in rows) == 4
    # a base that answers nothing leaves a replay share nothing to draw: said so, before any step
    with pytest.raises(RunError, match="answered none of the 2 replay questions"):
        run_retrofit(ws, "silent-replay", config(ws, replay=2, replay_share=0.25, prompt_format="chat", seq_len=128),
                     device=CPU, progress=False)
    assert not PretrainRunDir(ws.pretrain_run("silent-replay")).metrics()
    # a resumed (here: finished) run reads the file back and changes nothing
    before = path.stat().st_mtime_ns
    run_retrofit(ws, "replay", cfg, device=CPU, progress=False)
    assert path.stat().st_mtime_ns == before


def test_distillation_loss_is_world_cross_entropy_plus_weighted_kl_from_the_base(ws, trained):
    data = load_data(ws.data)
    cfg = config(ws, batch_size=6, fact_share=0.5)
    stream = make_stream(data, trained.tokenizer, cfg)
    batch, n_world = stream.batch(3), stream.world_rows()
    assert n_world == 3
    base, _, _ = load_base_model(ws.model("base"))
    trained.eval()
    with torch.no_grad():
        logits = trained(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        teacher = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = distillation_loss(trained, batch, logits, n_world, weight=0.7).item()
    # the reference, token by token: cross-entropy on world rows, 0.7 × KL(base || model) on the rest
    terms = []
    for row in range(len(batch["input_ids"])):
        for t in range(batch["input_ids"].shape[1] - 1):
            label = batch["labels"][row, t + 1].item()
            if label == -100:
                continue
            log_q = logits[row, t].log_softmax(-1)
            if row < n_world:
                terms.append(torch.nn.functional.cross_entropy(logits[row, t][None], torch.tensor([label])).item())
            else:
                log_p = teacher[row, t].log_softmax(-1)
                kl = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="sum").item()
                terms.append(0.7 * kl)
    assert loss == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    # a silent memory is the base: nothing to distil
    start = build_model(cfg, None).eval()
    with torch.no_grad():
        fresh = start(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert distillation_loss(start, batch, fresh, 0, weight=1.0).item() == pytest.approx(0.0, abs=1e-6)
    # a distilling retrofit trains only the memory, and its logged loss is this loss
    model = run_retrofit(ws, "distil", config(ws, steps=2, eval_every=0, checkpoint_every=2, log_every=1, distill=1.0),
                         device=CPU, progress=False)
    for name, tensor in base_state(ws).items():
        assert torch.equal(lm_state_without_memory(model)[name], tensor), name
    assert not torch.equal(model.values[1], start.values[1])
    logged = [r["loss"] for r in PretrainRunDir(ws.pretrain_run("distil")).metrics() if "loss" in r]
    assert len(logged) == 2 and logged[0] > 0
    with pytest.raises(ConfigError, match="distill needs the base frozen"):
        RetrofitConfig(base="b", distill=1.0, dense_lr_mult=0.1)
    with pytest.raises(ConfigError, match="distill must be >= 0"):
        RetrofitConfig(base="b", distill=-1.0)
    with pytest.raises(ConfigError, match="fact_share 1 leaves a batch none"):
        RetrofitConfig(base="b", distill=1.0, fact_share=1.0)


# --------------------------------------------------------------------------- command line and bad input


def test_cli_retrofit_writes_a_memory_model_and_records_its_config(ws, capsys):
    args = ["retrofit", "--base", str(ws.model("base")), "--name", "cli", "--workspace", str(ws.root), "--layers", "0",
            "--steps", "2", "--seq-len", "32", "--batch-size", "4", "--prompt-format", "chat", "--device", "cpu",
            "--memory", "n_keys=16", "heads=2", "knn=4", "k_dim=32",
            "--set", "eval_facts=1", "usage_rows=2", "warmup_steps=1", "log_every=1", "checkpoint_every=2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "retrofitted" in out and "held-out NLL" in out and "block 0: slots read" in out
    model = MemoryModel.from_pretrained(ws.model("cli"))
    assert list(model.memory_layers) == [0] and model.memory_config.n_keys == 16
    config = pretrain_config_of(ws, "cli")
    assert isinstance(config, RetrofitConfig) and config.prompt_format == "chat"
    assert Path(config.base).is_absolute() and config.memory["layers"] == [0] and config.memory["mode"] == "parallel"
    assert json.loads((ws.pretrain_run("cli") / "config.json").read_text())["config"]["memory"]["knn"] == 4
    # background statistics of the retrofitted model run on its own mixture: the chat-format world texts
    stats = background_stats(ws, ws.model("cli"), n_batches=2, batch_size=2, progress=False)
    chat_rows = len(make_stream(load_data(ws.data), model.tokenizer, config).world_ids)
    assert stats.protocol["pretrain_run"] == "cli" and stats.protocol["seq_len"] == 32
    assert stats.protocol["world_rows"] == chat_rows != len(
        make_stream(load_data(ws.data), model.tokenizer, dataclasses.replace(config, prompt_format="qa")).world_ids)


def refused(ws: Workspace, capsys, name: str, *extra: str, base: str | None = None) -> str:
    code = main(["retrofit", "--base", base or str(ws.model("base")), "--name", name, "--workspace", str(ws.root),
                 "--steps", "2", "--memory", "n_keys=16", "heads=2", "knn=4", "k_dim=32", *extra])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert not ws.pretrain_run(name).exists() and not ws.model(name).exists()
    return err


def test_bad_input_is_refused_in_one_line_with_nothing_written(ws, capsys, tmp_path):
    MemoryModel.from_preset("micro").save_pretrained(tmp_path / "with-memory")
    assert "not a base model" in refused(ws, capsys, "b1", base=str(tmp_path / "with-memory"))
    assert "out of range: the base model has 2 blocks" in refused(ws, capsys, "b2", "--layers", "2")
    assert "does not exist" in refused(ws, capsys, "b3", base=str(tmp_path / "nowhere"))
    assert "cannot be set with --set" in refused(ws, capsys, "b4", "--set", "base=x")
    assert "given twice" in refused(ws, capsys, "b5", "--layers", "1", "--memory", "layers=1")
    assert "has no field slots" in refused(ws, capsys, "b6", "--memory", "slots=3")
    assert "longer than the model's maximum" in refused(ws, capsys, "b7", "--seq-len", "4096")
    with pytest.raises(ConfigError, match="must name a base model"):
        RetrofitConfig()
    with pytest.raises(ConfigError, match="preset and .model must be left empty"):
        RetrofitConfig(base="b", model={"intermediate_size": 8})
    with pytest.raises(ConfigError, match="no dense phase"):
        RetrofitConfig(base="b", steps=10, dense_phase_steps=2)
    with pytest.raises(ConfigError, match="unknown prompt format"):
        RetrofitConfig(base="b", prompt_format="json")
    with pytest.raises(ConfigError, match=r"replay_share > 0 needs a replay"):
        RetrofitConfig(base="b", replay_share=0.2)
    with pytest.raises(ConfigError, match=r"replay_share must lie in \[0, 1 - fact_share\]"):
        RetrofitConfig(base="b", replay=10, fact_share=0.9, replay_share=0.2)
    with pytest.raises(ModelFileError, match="not a base model"):
        build_model(RetrofitConfig(base=str(tmp_path / "with-memory")), None)
