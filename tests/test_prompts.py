"""Tests of smviz.data.prompts (each prompt format's prompt, ids and training text against hand-written
strings and separately tokenised pieces) and of the QA answering through them: `answer_qa_items`
against an independent unbatched greedy loop, its multi-answer EM/F1 on hand-computed rows, and the
chat format's template prompts."""

from __future__ import annotations

import copy

import pytest
import torch
from tokenizers import processors

import smviz.evaluate.qa as qa_module
from smviz.data.facts import Fact, Question, qa_prompt
from smviz.data.formats.qa import QAItem
from smviz.data.prompts import PROMPT_FORMATS, get_prompt_format
from smviz.data.tokenizer import EOT, train_tokenizer
from smviz.errors import ConfigError
from smviz.evaluate import answer_contained, answer_qa_items, answer_questions, qa_metrics
from smviz.model import MemoryModel

from test_evaluate import MAX_NEW, greedy_ids_reference  # the unbatched greedy reference, shared
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
FIRST = "Ada Alan Grace Marie Niels Emmy Carl Lise Paul Rosalind Enrico Dorothy Max Barbara Werner Chien Srinivasa Sofia Henri Mary".split()
LAST = "Lovelace Turing Hopper Curie Bohr Noether Gauss Meitner Dirac Franklin Fermi Hodgkin Planck McClintock Heisenberg".split()
CITIES = "London Paris Vienna Rome Berlin Copenhagen Warsaw Madras Moscow Boston".split()
TEMPLATES = ["Where was {} born?", "Which city did {} live in?", "{} worked in which city?"]
ITEMS = [
    QAItem("q1", "Where was Ada Lovelace born?", ("London",)),
    QAItem("q2", "Which city did Grace Hopper live in?", ("New York", "NYC")),
    QAItem("q3", "Max Planck worked in which city, according to the old letters he wrote?", ("Berlin",)),
    QAItem("q4", "Rome?", ("Rome", "the eternal city")),
    QAItem("q5", "Where was Niels Bohr born and where did he work for most of his long life?", ("Copenhagen",)),
]


@pytest.fixture(scope="module")
def tokenizer():
    """The project's byte-level BPE on a few hundred short Q/A strings; no chat template."""
    texts = [
        "Question: " + TEMPLATES[(i + j) % 3].format(f"{f} {l}") + f"\nAnswer: {CITIES[(3 * i + j) % 10]}"
        for i, f in enumerate(FIRST) for j, l in enumerate(LAST)
    ]
    return train_tokenizer(texts, vocab_size=512, min_frequency=1)


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def bos_tokenizer(chat_tokenizer):
    """A copy that prepends <|endoftext|> as its default special token, so that whether a format adds
    special tokens shows in the ids."""
    tok = copy.deepcopy(chat_tokenizer)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single=f"{EOT} $A", special_tokens=[(EOT, 0)])
    assert tok("Rome")["input_ids"][0] == 0 and tok("Rome", add_special_tokens=False)["input_ids"][0] != 0
    return tok


def babbler(tokenizer, seed: int = 0) -> MemoryModel:
    """A micro model with varied greedy output: a random untied output head (a fresh tied one just
    repeats its last token), newline rows scaled up so that some answers stop early."""
    model = MemoryModel.from_preset("micro", seed=seed, vocab_size=len(tokenizer))
    model.tokenizer = tokenizer
    weight = torch.randn(model.lm.lm_head.weight.shape, generator=torch.Generator().manual_seed(seed))
    for i in range(len(tokenizer)):
        if "\n" in tokenizer.decode([i]):
            weight[i] *= 2.5
    model.lm.lm_head.weight = torch.nn.Parameter(weight)
    return model.eval()


# --------------------------------------------------------------------------- the formats


def test_prompt_texts(chat_tokenizer):
    q = "Where was Ada Lovelace born?"
    assert PROMPT_FORMATS == ("qa", "completion", "chat")
    assert get_prompt_format("qa").prompt(chat_tokenizer, q) == "Question: Where was Ada Lovelace born?\nAnswer:"
    assert get_prompt_format("completion").prompt(chat_tokenizer, "The mother tongue of Danielle Darrieux is") == (
        "The mother tongue of Danielle Darrieux is"
    )
    assert get_prompt_format("chat").prompt(chat_tokenizer, q) == "<|user|>Where was Ada Lovelace born?\n<|assistant|>"


def test_training_texts(chat_tokenizer):
    q, a = "Where was Ada Lovelace born?", "London"
    assert get_prompt_format("qa").training_text(chat_tokenizer, q, a) == "Question: Where was Ada Lovelace born?\nAnswer: London"
    assert get_prompt_format("completion").training_text(chat_tokenizer, "The capital of France is", "Paris") == (
        "The capital of France is Paris"
    )
    assert get_prompt_format("chat").training_text(chat_tokenizer, q, a) == (
        "<|user|>Where was Ada Lovelace born?\n<|assistant|>London\n"
    )


def test_encode_prompt_and_pair_special_tokens(bos_tokenizer):
    tok, q, a = bos_tokenizer, "Where was Ada Lovelace born?", "London"
    plain = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    qa_ids = [0] + plain("Question: Where was Ada Lovelace born?\nAnswer:")
    completion_ids = [0] + plain(q)
    chat_ids = plain("<|user|>Where was Ada Lovelace born?\n<|assistant|>")  # the template holds its own tokens
    assert get_prompt_format("qa").encode_prompt(tok, q) == qa_ids
    assert get_prompt_format("completion").encode_prompt(tok, q) == completion_ids
    assert get_prompt_format("chat").encode_prompt(tok, q) == chat_ids
    # the answer after one space (ROME's convention) for qa/completion, right after the prompt for chat
    assert plain(" London") != plain("London")
    assert get_prompt_format("qa").encode_pair(tok, q, a) == (qa_ids, plain(" London"))
    assert get_prompt_format("completion").encode_pair(tok, q, a) == (completion_ids, plain(" London"))
    assert get_prompt_format("chat").encode_pair(tok, q, a) == (chat_ids, plain("London"))


def test_chat_without_template_and_unknown_name(tokenizer):
    chat = get_prompt_format("chat")
    for call in (lambda: chat.check(tokenizer), lambda: chat.prompt(tokenizer, "Hi?"),
                 lambda: chat.training_text(tokenizer, "Hi?", "Yes")):
        with pytest.raises(ConfigError, match="use prompt format 'qa' or 'completion'"):
            call()
    get_prompt_format("qa").check(tokenizer)
    get_prompt_format("completion").check(tokenizer)
    with pytest.raises(ConfigError, match="qa, completion, chat"):
        get_prompt_format("instruct")
    model = babbler(tokenizer)
    with pytest.raises(ConfigError, match="chat_template"):
        answer_qa_items(model, ITEMS, prompt_format="chat")
    with pytest.raises(ConfigError, match="unknown prompt format"):
        answer_qa_items(model, ITEMS, prompt_format="instruct")


# --------------------------------------------------------------------------- answering


@pytest.mark.parametrize("seed", [0, 1])
def test_answer_qa_items_match_unbatched_greedy(tokenizer, seed):
    model = babbler(tokenizer, seed)
    ids = [tokenizer(qa_prompt(item.question))["input_ids"] for item in ITEMS]
    assert len({len(x) for x in ids}) == len(ITEMS)  # prompts of different lengths: batches really are padded
    rows = answer_qa_items(model, ITEMS, batch_size=3, max_new_tokens=MAX_NEW)
    expected = [greedy_ids_reference(model, tokenizer, x) for x in ids]
    assert [r["prediction"] for r in rows] == expected
    assert len(set(expected)) > 1 and any(expected)  # the model says varied, non-empty things
    assert [r["fact_id"] for r in rows] == [item.id for item in ITEMS]
    for r, item in zip(rows, ITEMS):
        assert set(r) == {"fact_id", "relation", "template", "question", "gold", "golds", "prediction", "em", "f1", "contained"}
        assert r["contained"] == max(answer_contained(r["prediction"], a) for a in item.answers)
        assert (r["relation"], r["template"], r["question"]) == ("qa", None, item.question)
        assert r["gold"] == item.answers[0] and r["golds"] == list(item.answers)
    assert [r["prediction"] for r in answer_qa_items(model, ITEMS, batch_size=1)] == expected
    assert answer_qa_items(model, []) == []


def test_completion_format_puts_the_text_as_is(tokenizer):
    model = babbler(tokenizer)
    rows = answer_qa_items(model, ITEMS, batch_size=2, prompt_format="completion")
    assert [r["prediction"] for r in rows] == [greedy_ids_reference(model, tokenizer, tokenizer(i.question)["input_ids"]) for i in ITEMS]


def test_multi_answer_scores_hand_computed(tokenizer, monkeypatch):
    predictions = ["city of Paris", "London area", "NYC"]
    monkeypatch.setattr(qa_module, "generate_answers", lambda model, prompt_ids, **kw: predictions[: len(prompt_ids)])
    items = [
        QAItem("a", "Capital of France?", ("Paris", "the city of Paris")),  # only the second matches
        QAItem("b", "Capital of England?", ("London", "Greater London area")),
        QAItem("c", "Biggest US city?", ("New York", "NYC")),
    ]
    rows = answer_qa_items(babbler(tokenizer), items)
    assert [r["prediction"] for r in rows] == predictions
    assert [r["em"] for r in rows] == [1.0, 0.0, 1.0]
    # b: vs 'London' P = 1/2, R = 1 -> 2/3; vs 'Greater London area' P = 1, R = 2/3 -> 0.8; max 0.8
    assert [r["f1"] for r in rows] == pytest.approx([1.0, 0.8, 1.0])
    m = qa_metrics(rows)
    assert m["n"] == 3 and m["em"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(2.8 / 3)
    assert m["per_relation"] == {"qa": {"em": pytest.approx(2 / 3), "f1": pytest.approx(2.8 / 3), "n": 3}}


def test_chat_format_answers_from_the_template(chat_tokenizer):
    model = babbler(chat_tokenizer, seed=1)
    chat = get_prompt_format("chat")
    ids = [chat_tokenizer(f"<|user|>{i.question}\n<|assistant|>", add_special_tokens=False)["input_ids"] for i in ITEMS]
    assert [chat.encode_prompt(chat_tokenizer, i.question) for i in ITEMS] == ids
    rows = answer_qa_items(model, ITEMS, batch_size=2, prompt_format="chat")
    expected = [greedy_ids_reference(model, chat_tokenizer, x) for x in ids]
    assert [r["prediction"] for r in rows] == expected
    qa_rows = answer_qa_items(model, ITEMS, batch_size=2)
    assert [r["prediction"] for r in qa_rows] != expected  # a different prompt, different answers


def test_answer_questions_prompt_format_reaches_the_model(chat_tokenizer):
    facts = [Fact("f1", "Ada Lovelace", "birthplace", "London", ("Ada Lovelace was born in London.",),
                  (Question("Where was Ada Lovelace born?", "birthplace/h0", True),))]
    model = babbler(chat_tokenizer)
    [row] = answer_questions(model, facts, prompt_format="chat")
    ids = chat_tokenizer("<|user|>Where was Ada Lovelace born?\n<|assistant|>", add_special_tokens=False)["input_ids"]
    assert row["prediction"] == greedy_ids_reference(model, chat_tokenizer, ids)
