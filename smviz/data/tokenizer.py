"""A small byte-level BPE tokenizer trained on the background corpus, document packing, and the one
right-padded batch builder (`right_pad`).

Byte-level (GPT-2 style): text is first mapped to its UTF-8 bytes, so every string encodes with no
unknown token and decodes back exactly. The vocabulary is small (default 4,096 entries) because on
a CPU the output layer (hidden x vocab) dominates the cost of a tiny language model.

Conventions:
- One special token, `<|endoftext|>` (id 0), serves as bos, eos, pad and unk, as in GPT-2. It
  separates documents when they are packed; `unk` is never produced (byte-level: every byte is in
  the vocabulary); pad positions must be masked by the attention mask / labels anyway.
- Encoding adds no special tokens: `tokenizer(text)["input_ids"]` is the text alone;
  `pack_documents` appends eos after every document itself. A literal "<|endoftext|>" inside a
  text is encoded as the special token (as in GPT-2); the Wikipedia corpus contains none.
- Spaces belong to the *following* word: " cat" is one token ('Ġcat'), and the first word of a text
  gets no space (`add_prefix_space=False`). Offsets are trimmed (`trim_offsets=True`): with
  `return_offsets_mapping=True` a token ' cat' reports the characters of 'cat' only, so
  `text[start:end] == decode([id]).lstrip(" ")` for a token that is a single space plus a word,
  and a token of spaces only (the first of two spaces) reports an empty span. Offsets are character
  offsets into the original string; a token holding only part of a multi-byte character (é is
  two bytes, so possibly two tokens) reports that whole character.
- Training is deterministic: the same texts (in the same order), vocab_size and min_frequency give
  a byte-identical tokenizer.json.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from smviz.errors import ConfigError

EOT = "<|endoftext|>"
SPECIAL_TOKENS = [EOT]
"""The only special token: `<|endoftext|>`, id 0, used as bos, eos, pad and unk."""

MODEL_MAX_LENGTH = 1_000_000_000
"""No limit in practice: documents are tokenised whole and cut to length by `pack_documents`."""

MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # the 256 byte symbols + the special token


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2
) -> transformers.PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer of exactly `vocab_size` entries (fewer only if the texts have
    too few pairs that occur `min_frequency` times) on `texts`; deterministic."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + {EOT}), got {vocab_size}")
    if min_frequency < 1:
        raise ConfigError(f"min_frequency must be at least 1, got {min_frequency}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    # add_prefix_space=False as in the pre-tokenizer: every token's leading space is trimmed alike,
    # the first token's included
    backend.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return wrap_tokenizer(backend)


def wrap_tokenizer(backend: Tokenizer) -> transformers.PreTrainedTokenizerFast:
    """The transformers tokenizer around a trained `tokenizers.Tokenizer`, special tokens set."""
    if backend.token_to_id(EOT) is None:
        raise ConfigError(f"the tokenizer has no {EOT} token")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOT,
        eos_token=EOT,
        pad_token=EOT,
        unk_token=EOT,
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def pack_documents(
    tokenizer: transformers.PreTrainedTokenizerBase, texts: Iterable[str] | Sequence[str], seq_len: int
) -> torch.Tensor:
    """Tokenise every text, append eos after each, concatenate them all and cut the stream into full
    rows of `seq_len` tokens: a LongTensor (n_rows, seq_len). The remainder (< seq_len tokens) is
    dropped; ConfigError if the texts give fewer than seq_len tokens."""
    if seq_len < 1:
        raise ConfigError(f"seq_len must be at least 1, got {seq_len}")
    if tokenizer is None:
        raise ConfigError("pack_documents needs a tokenizer, got None (a model saved without one has none)")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no eos token, which pack_documents puts after every document")
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise ConfigError("pack_documents takes strings")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        # the Rust batch encoder without offsets (the backend post-processor adds nothing: ByteLevel),
        # on a copy with padding and truncation off: a batch call elsewhere (left-padded generation)
        # leaves padding enabled on the shared backend, and padded ids would enter the stream
        backend = Tokenizer.from_str(backend.to_str())
        backend.no_padding()
        backend.no_truncation()
        ids = [enc.ids for enc in backend.encode_batch_fast(texts, add_special_tokens=False)]
    else:
        ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    total = int(lengths.sum())
    n_rows = total // seq_len
    if n_rows < 1:
        raise ConfigError(f"{len(texts)} texts give {total} tokens (with eos), fewer than one row of seq_len={seq_len}")
    stream = np.empty(total, dtype=np.int64)
    ends = np.cumsum(lengths)
    stream[ends - 1] = eos
    flat = np.fromiter((i for x in ids for i in x), dtype=np.int64, count=total - len(ids))
    # every non-eos position, in order: all positions except the document ends
    mask = np.ones(total, dtype=bool)
    mask[ends - 1] = False
    stream[mask] = flat
    return torch.from_numpy(stream[: n_rows * seq_len].reshape(n_rows, seq_len))


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id sequences as one right-padded batch: `input_ids` (n, longest) int64 with `pad_id` after
    each sequence, and `attention_mask` (n, longest) int64, 1 on its tokens and 0 on the padding."""
    if not len(sequences):
        raise ConfigError("right_pad needs at least one sequence")
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask
