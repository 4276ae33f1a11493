"""The knowledge-editing metrics (smviz.evaluate.editing) against hand-computed values on a bigram model
whose next-token probabilities are chosen (so every NLL is a known logarithm), and against an independent
unbatched computation and `generate` on the micro model."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from smviz.data.edits import EditRecord
from smviz.data.tokenizer import train_tokenizer
from smviz.errors import ConfigError
from smviz.evaluate.editing import EDIT_METRICS, EDIT_PROTOCOL, edit_scores, mean_edit_metrics, score_continuations
from smviz.model import MemoryModel

WORDS = ["<pad>", "Danielle", "Pierre", "Marie", "speaks", "talks", "writes", "English", "French", "Dutch",
         "Which", "river", "is", "Watts", "near", "?", "Mill", "Creek", "Hudson", "River", "who", "sang", "hello",
         "Adele", "Adkins"]
ID = {w: i for i, w in enumerate(WORDS)}
V = len(WORDS)

# P(next word | word); the rest of each row's mass is spread evenly over the other words, and a word not
# listed predicts every word with 1/V
NEXT = {
    "speaks": {"English": 0.5, "French": 0.25},
    "talks": {"French": 0.5, "English": 0.25},
    "writes": {"Dutch": 0.5, "English": 0.4, "French": 0.05},
    "?": {"Mill": 0.4, "Hudson": 0.35},
    "Mill": {"Creek": 0.3},
    "Hudson": {"River": 0.9},
    "hello": {"Adele": 0.5},
    "Adele": {"Adkins": 0.5},
    "Adkins": {"?": 0.6},
}


def p(word: str, after: str) -> float:
    row = NEXT.get(after, {})
    return row[word] if word in row else (1 - sum(row.values())) / (V - len(row))


class WhitespaceTokenizer:
    """Words to fixed ids by splitting on whitespace; no special tokens to add."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [ID[w] for w in text.split()]}


class BigramModel(torch.nn.Module):
    """logits[b, t] = log P(· | input_ids[b, t]) from NEXT; records the inputs of every call."""

    def __init__(self) -> None:
        super().__init__()
        table = torch.tensor([[math.log(p(w, a)) for w in WORDS] for a in WORDS])
        self.table = torch.nn.Parameter(table, requires_grad=False)
        self.tokenizer = WhitespaceTokenizer()
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def device(self) -> torch.device:
        return self.table.device

    def require_tokenizer(self, purpose: str) -> WhitespaceTokenizer:
        return self.tokenizer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        assert not self.training and not torch.is_grad_enabled()  # run under eval_mode
        self.calls.append((input_ids.clone(), attention_mask.clone()))
        return SimpleNamespace(logits=self.table[input_ids])


def ids(text: str) -> list[int]:
    return [ID[w] for w in text.split()]


def nll(target: str, prompt_last: str) -> float:
    words = [prompt_last] + target.split()
    return -sum(math.log(p(w, a)) for a, w in zip(words, words[1:])) / (len(words) - 1)


# (prompt, target, hand-computed NLL, greedy match)
PAIRS = [
    ("Danielle speaks", "English", math.log(2), True),
    ("speaks", "French", math.log(4), False),
    ("Which river is Watts near ?", "Mill Creek", (-math.log(0.4) - math.log(0.3)) / 2, True),
    ("?", "Hudson River", (-math.log(0.35) - math.log(0.9)) / 2, False),  # wrong at the first token only
    ("who sang hello", "Adele Adkins ?", (2 * math.log(2) - math.log(0.6)) / 3, True),
    ("hello", "Adele Adkins Mill", (2 * math.log(2) - math.log(0.4 / (V - 1))) / 3, False),  # at the last only
]


def test_score_continuations_hand_computed() -> None:
    scores = score_continuations(BigramModel(), [(ids(q), ids(a)) for q, a, _, _ in PAIRS])
    assert len(scores) == len(PAIRS)
    for (q, a, expected_nll, expected_greedy), (got_nll, got_greedy) in zip(PAIRS, scores):
        assert expected_nll == pytest.approx(nll(a, q.split()[-1]))  # the table says what the list says
        assert got_nll == pytest.approx(expected_nll, abs=1e-5), (q, a)
        assert got_greedy is expected_greedy, (q, a)


def test_score_continuations_batches_right_padded() -> None:
    pairs = [(ids(q), ids(a)) for q, a, _, _ in PAIRS]
    model = BigramModel()
    by_three = score_continuations(model, pairs, batch_size=3)
    assert len(model.calls) == 2  # one forward per batch of 3 rows
    lengths = sorted(len(q) + len(a) for q, a in pairs)
    assert sorted(int(n) for _, mask in model.calls for n in mask.sum(dim=1)) == lengths
    for input_ids, mask in model.calls:
        assert input_ids.shape[1] == int(mask.sum(dim=1).max())
        assert all(row[: int(row.sum())].all() and not row[int(row.sum()):].any() for row in mask)  # right-padded
    model.calls.clear()
    one_by_one = score_continuations(model, pairs, batch_size=1)
    assert len(model.calls) == len(pairs)
    assert one_by_one == by_three


def test_score_continuations_rejects_empty_parts() -> None:
    model = BigramModel()
    with pytest.raises(ConfigError, match="empty target"):
        score_continuations(model, [(ids("speaks"), ids("English")), (ids("speaks"), [])])
    with pytest.raises(ConfigError, match="empty prompt"):
        score_continuations(model, [([], ids("English"))])
    with pytest.raises(ConfigError, match="batch_size"):
        score_continuations(model, [(ids("speaks"), ids("English"))], batch_size=0)
    assert score_continuations(model, []) == []


COUNTERFACT = EditRecord(
    id="cf-1", subject="Danielle", prompt="{} speaks", target_new="English", target_true="French",
    paraphrase_prompts=("Danielle talks", "Danielle writes"),
    neighborhood=(("Pierre speaks", "French"), ("Marie talks", "French")), source="counterfact",
)
ZSRE = EditRecord(
    id="zsre-1", subject="Watts", prompt="Which river is {} near ?", target_new="Mill Creek",
    target_true="Hudson River", paraphrase_prompts=(), neighborhood=(("who sang hello", "Adele Adkins"),),
    source="zsre",
)


def test_edit_scores_hand_computed() -> None:
    rows = edit_scores(BigramModel(), [COUNTERFACT, ZSRE], batch_size=4)
    cf, zsre = rows
    assert set(cf) == {"id", "nll_new", "nll_true", *EDIT_METRICS}
    assert cf["id"] == "cf-1" and zsre["id"] == "zsre-1"
    # rewrite "speaks": English (1/2) beats French (1/4) and is the argmax
    assert cf["nll_new"] == pytest.approx(math.log(2), abs=1e-5)
    assert cf["nll_true"] == pytest.approx(math.log(4), abs=1e-5)
    assert cf["efficacy_prob"] == 1.0 and cf["efficacy_em"] == 1.0
    # "talks": French wins (0, 0); "writes": English (0.4) beats French (0.05) but Dutch is the argmax (1, 0)
    assert cf["generalization_prob"] == 0.5 and cf["generalization_em"] == 0.0
    # "Pierre speaks" loses French to English and does not say it; "Marie talks" keeps French
    assert cf["locality_prob"] == 0.5 and cf["locality_em"] == 0.5
    # "?": Mill Creek (0.4, 0.3) is greedy, but Hudson River (0.35, 0.9) has the lower mean NLL
    assert zsre["nll_new"] == pytest.approx((-math.log(0.4) - math.log(0.3)) / 2, abs=1e-5)
    assert zsre["nll_true"] == pytest.approx((-math.log(0.35) - math.log(0.9)) / 2, abs=1e-5)
    assert zsre["efficacy_prob"] == 0.0 and zsre["efficacy_em"] == 1.0
    assert zsre["generalization_prob"] is None and zsre["generalization_em"] is None  # no paraphrases
    # "hello": Adele Adkins (1/2, 1/2) is kept over Mill Creek and said greedily
    assert zsre["locality_prob"] == 1.0 and zsre["locality_em"] == 1.0

    means = mean_edit_metrics(rows)
    assert means == {"protocol": EDIT_PROTOCOL, "n": 2, "efficacy_prob": 0.5, "efficacy_em": 1.0,
                     "generalization_prob": 0.5, "generalization_em": 0.0, "locality_prob": 0.75, "locality_em": 0.75}


def test_edit_scores_scores_everything_in_one_call_and_rejects_unknown_format() -> None:
    model = BigramModel()
    edit_scores(model, [COUNTERFACT, ZSRE])
    assert len(model.calls) == 1 and model.calls[0][0].shape[0] == (2 + 2 * 2 + 2 * 2) + (2 + 2 * 1)  # 2 per prompt
    with pytest.raises(ConfigError, match="prompt format"):
        edit_scores(model, [COUNTERFACT], prompt_format="nope")


def test_mean_edit_metrics_skips_none() -> None:
    base = dict.fromkeys(EDIT_METRICS, None)
    rows = [dict(base, id="a", efficacy_prob=1.0, locality_em=0.5), dict(base, id="b", efficacy_prob=0.0),
            dict(base, id="c", efficacy_prob=0.0, locality_em=0.0)]
    means = mean_edit_metrics(rows)
    assert means["n"] == 3 and means["protocol"] == EDIT_PROTOCOL
    assert means["efficacy_prob"] == pytest.approx(1 / 3)
    assert means["locality_em"] == 0.25  # over the two rows that have it
    assert means["generalization_prob"] is None and means["efficacy_em"] is None
    assert mean_edit_metrics([]) == {"protocol": EDIT_PROTOCOL, "n": 0, **dict.fromkeys(EDIT_METRICS, None)}


# ---- the micro model


@pytest.fixture(scope="module")
def micro() -> MemoryModel:
    names, langs = ["Danielle", "Pierre", "Marie", "Watts", "Adele", "Rome", "Oslo"], ["French", "English", "Dutch"]
    texts = [f"The mother tongue of {n} is {lang}." for n in names for lang in langs]
    texts += [f"{n} {verb} {lang} at home number {i}" for i in range(12) for n in names
              for verb, lang in zip(["speaks", "writes"], langs)]
    model = MemoryModel.from_preset("micro", seed=0, vocab_size=512)
    model.tokenizer = train_tokenizer(texts, vocab_size=512)
    return model


def reference_nll(model: MemoryModel, prompt: list[int], target: list[int]) -> float:
    """Sum of -log_softmax at each target position / len, one unpadded sequence."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + target])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return -sum(logp[len(prompt) - 1 + k, t].item() for k, t in enumerate(target)) / len(target)


def greedy_continuation(model: MemoryModel, prompt: list[int], n: int) -> list[int]:
    eos = model.tokenizer.eos_token_id
    with torch.no_grad():
        mask = torch.ones(1, len(prompt), dtype=torch.long)
        out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=mask,
                             do_sample=False, num_beams=1, max_new_tokens=n, eos_token_id=eos, pad_token_id=eos)
    return out[0, len(prompt):].tolist()


def test_micro_model_matches_unbatched_reference_and_generate(micro: MemoryModel) -> None:
    tok = micro.tokenizer
    micro.eval()
    prompts = ["The mother tongue of Danielle is", "Pierre speaks", "Marie writes Dutch at home", "Oslo"]
    pairs = []
    for i, text in enumerate(prompts):
        prompt = tok(text)["input_ids"]
        pairs.append((prompt, tok(" French")["input_ids"]))
        pairs.append((prompt, tok(" English at home number 3")["input_ids"]))
        pairs.append((prompt, greedy_continuation(micro, prompt, 1 + i)))  # greedy by construction
        pairs.append((prompt, greedy_continuation(micro, prompt, 3)[:2] + tok(" Rome")["input_ids"]))
    micro.train()  # score_continuations must evaluate in eval mode and restore the flag
    scores = score_continuations(micro, pairs, batch_size=5)
    assert micro.training
    micro.eval()
    for (prompt, target), (got_nll, got_greedy) in zip(pairs, scores):
        assert got_nll == pytest.approx(reference_nll(micro, prompt, target), abs=1e-4)
        assert got_greedy == (greedy_continuation(micro, prompt, len(target)) == target)
    assert {g for _, g in scores} == {True, False}


def test_micro_model_edit_scores_use_completion_encoding(micro: MemoryModel) -> None:
    tok = micro.tokenizer
    record = EditRecord(id="1", subject="Danielle", prompt="The mother tongue of {} is", target_new="English",
                        target_true="French", paraphrase_prompts=("Danielle speaks",),
                        neighborhood=(("The mother tongue of Pierre is", "French"),), source="counterfact")
    [row] = edit_scores(micro, [record])
    prompt = tok("The mother tongue of Danielle is")["input_ids"]
    nll_new = reference_nll(micro, prompt, tok(" English", add_special_tokens=False)["input_ids"])
    nll_true = reference_nll(micro, prompt, tok(" French", add_special_tokens=False)["input_ids"])
    assert row["nll_new"] == pytest.approx(nll_new, abs=1e-4) and row["nll_true"] == pytest.approx(nll_true, abs=1e-4)
    assert row["efficacy_prob"] == float(nll_new < nll_true)
    assert all(row[m] in (0.0, 1.0) for m in EDIT_METRICS)
