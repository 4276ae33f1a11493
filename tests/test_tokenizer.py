"""The byte-level BPE tokenizer and document packing, trained on a small sample of the real corpus."""

from __future__ import annotations

import random

import pytest
import torch
import transformers

from smviz.data.corpus import load_articles
from smviz.data.tokenizer import EOT, SPECIAL_TOKENS, pack_documents, right_pad, train_tokenizer
from smviz.errors import ConfigError

VOCAB = 512

UNICODE_SAMPLES = [
    "Hello, world!",
    "Café naïve façade — «quotes» ‘single’ “double” …",
    "東京は日本の首都です。 Москва — столица России. Αθήνα. עברית. العربية.",
    "emoji 🙂👍🏽 family 👨‍👩‍👧 flag 🇫🇷 and combining e\u0301 vs é",
    "  leading spaces, two  inner,\ttab\nnewline\r\nCRLF and trailing   ",
    "control \x00\x01\x7f and zero-width \u200b\u200d joiners",
    "spacing before punctuation , . ; ! ? stays as is",
    "",
    "x",
]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [a.text for a in load_articles()[:200]]


@pytest.fixture(scope="module")
def tok(texts) -> transformers.PreTrainedTokenizerFast:
    return train_tokenizer(texts, vocab_size=VOCAB)


def test_special_tokens_and_vocab_size(tok, texts):
    assert SPECIAL_TOKENS == [EOT] == ["<|endoftext|>"]
    assert isinstance(tok, transformers.PreTrainedTokenizerFast)
    assert len(tok) == tok.vocab_size == VOCAB
    assert sorted(tok.get_vocab().values()) == list(range(VOCAB))
    assert tok.eos_token == tok.bos_token == tok.pad_token == tok.unk_token == EOT
    assert tok.eos_token_id == tok.bos_token_id == tok.pad_token_id == tok.unk_token_id == 0
    assert tok.model_max_length >= 10**9
    tok300 = train_tokenizer(texts[:50], vocab_size=300)
    assert len(tok300) == 300
    with pytest.raises(ConfigError, match="vocab_size"):
        train_tokenizer(texts[:5], vocab_size=200)


def test_unicode_round_trip_no_unknowns(tok):
    rng = random.Random(0)
    # random code points from the whole range (surrogates excluded: not encodable in UTF-8)
    randoms = [
        "".join(chr(c) for c in (rng.randrange(0x110000) for _ in range(40)) if not 0xD800 <= c < 0xE000)
        for _ in range(20)
    ]
    for s in UNICODE_SAMPLES + randoms:
        ids = tok(s)["input_ids"]  # no special tokens added, even by default
        assert tok.eos_token_id not in ids  # nothing unknown: every byte has a token
        assert tok.decode(ids) == s
        # reference: the tokens' bytes (GPT-2 byte-to-unicode map inverted) concatenate to the UTF-8 bytes
        inv = _byte_decoder()
        assert b"".join(bytes(inv[ch] for ch in t) for t in tok.convert_ids_to_tokens(ids)) == s.encode("utf-8")


def _byte_decoder() -> dict[str, int]:
    """GPT-2's reversible byte -> printable character map, written out independently, inverted."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _check_offsets(tokenizer, s: str) -> None:
    enc = tokenizer(s, return_offsets_mapping=True)
    assert len(enc["offset_mapping"]) == len(enc["input_ids"]) > 3
    pieces = []
    for i, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
        token_text = tokenizer.decode([i])
        # convention: a token carries the space before its word; the offsets leave that space out
        assert s[start:end] == token_text.lstrip(" "), (token_text, s[start:end])
        pieces.append(token_text)
    assert "".join(pieces) == s


def test_offsets_map_tokens_to_substrings(tok):
    for s in (
        "The quick brown fox jumps over the lazy dog, twice; and then 1,234 times (roughly).",
        " Leading space and the first token's space is trimmed too.",
        "Albert Einstein was a German-born theoretical physicist.",
    ):
        _check_offsets(tok, s)


def test_training_is_deterministic(tok, texts, tmp_path):
    again = train_tokenizer(texts, vocab_size=VOCAB)
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    tok.save_pretrained(tmp_path / "a")
    again.save_pretrained(tmp_path / "b")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # and the training texts matter
    other = train_tokenizer(texts[100:], vocab_size=VOCAB)
    assert other.backend_tokenizer.to_str() != tok.backend_tokenizer.to_str()


def test_save_load_round_trip_offline(tok, texts, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)  # conftest sets HF_HUB_OFFLINE=1
    sample = texts[:20] + UNICODE_SAMPLES
    assert loaded(sample)["input_ids"] == tok(sample)["input_ids"]
    assert loaded.eos_token_id == loaded.pad_token_id == loaded.bos_token_id == loaded.unk_token_id == 0
    assert len(loaded) == VOCAB
    assert loaded.model_max_length == tok.model_max_length
    _check_offsets(loaded, "The quick brown fox jumps over the lazy dog.")
    assert loaded.decode(loaded(UNICODE_SAMPLES[3])["input_ids"]) == UNICODE_SAMPLES[3]
    # padding side is configurable after loading
    loaded.padding_side = "left"
    batch = loaded(["a b c d e f", "a"], padding=True, return_tensors="pt")
    assert batch["input_ids"][1, 0].item() == loaded.pad_token_id and batch["attention_mask"][1, 0].item() == 0


def _reference_stream(tokenizer, docs: list[str]) -> list[int]:
    stream: list[int] = []
    for d in docs:
        stream += tokenizer.encode(d, add_special_tokens=False) + [tokenizer.eos_token_id]
    return stream


def test_pack_documents(tok, texts):
    docs = texts[:30]
    seq_len = 64
    packed = pack_documents(tok, docs, seq_len)
    stream = _reference_stream(tok, docs)
    n = len(stream) // seq_len
    assert packed.dtype == torch.long and packed.shape == (n, seq_len)
    assert torch.equal(packed, torch.tensor(stream[: n * seq_len]).view(n, seq_len))
    # eos exactly after each document (inside the kept rows), nowhere else
    ends, pos = [], 0
    for d in docs:
        pos += len(tok.encode(d, add_special_tokens=False)) + 1
        ends.append(pos - 1)
    eos_positions = (packed.flatten() == tok.eos_token_id).nonzero().flatten().tolist()
    assert eos_positions == [e for e in ends if e < n * seq_len]
    # a generator works too, as does a row length that divides the stream exactly
    exact = pack_documents(tok, iter(["ab", "cd"]), len(_reference_stream(tok, ["ab", "cd"])))
    assert exact.shape[0] == 1 and exact[0, -1].item() == tok.eos_token_id


def test_pack_documents_python_fallback(tok, texts):
    """A tokenizer without a Rust backend goes through its __call__: same result."""

    class Plain:
        eos_token_id = tok.eos_token_id

        def __call__(self, batch, add_special_tokens, return_attention_mask):
            return {"input_ids": [tok.encode(t, add_special_tokens=False) for t in batch]}

    assert torch.equal(pack_documents(Plain(), texts[:10], 32), pack_documents(tok, texts[:10], 32))


def test_pack_documents_errors(tok):
    with pytest.raises(ConfigError, match="fewer than one row"):
        pack_documents(tok, ["tiny"], 1000)
    with pytest.raises(ConfigError, match="fewer than one row"):
        pack_documents(tok, [], 8)
    with pytest.raises(ConfigError, match="seq_len"):
        pack_documents(tok, ["some text"], 0)


def test_pack_documents_ignores_padding_left_on_the_backend():
    """A batch call with padding (as left-padded generation makes) must not leak pad ids into packing."""
    tok = train_tokenizer(["alpha beta gamma delta " * 20, "epsilon zeta eta " * 10], vocab_size=300)
    texts = ["alpha beta", "gamma delta epsilon zeta eta alpha beta gamma"]
    expected = pack_documents(tok, texts, seq_len=4)
    tok.padding_side = "left"
    tok(texts, padding=True)
    tok.backend_tokenizer.enable_padding(direction="left", pad_id=0, pad_token="<|endoftext|>")
    assert torch.equal(pack_documents(tok, texts, seq_len=4), expected)


def test_right_pad_against_a_hand_built_batch():
    ids, mask = right_pad([[5, 6, 7], [8], [9, 10]], pad_id=0)
    assert ids.dtype == mask.dtype == torch.long
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    ids, mask = right_pad([(3,), ()], pad_id=-1)  # an empty sequence is all padding
    assert ids.tolist() == [[3], [-1]] and mask.tolist() == [[1], [0]]
    with pytest.raises(ConfigError, match="at least one sequence"):
        right_pad([], pad_id=0)
