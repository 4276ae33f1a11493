"""Recording which memory slots every token reads: `AccessRecorder` (hooks on a live model, in eval
or inside a training step) and `record_texts` (documents → an on-disk `Trace`, what `smviz record`
runs).

`AccessRecorder` keeps each forward call's reads on the model's device while the call runs, then
moves them to the host in one transfer: the real (non-padding) tokens only, slot ids as int32 and
weights as float16, one `RecordedBatch` per call.

`record_texts` tokenises documents with character offsets, cuts a document longer than the context
into windows `stride` tokens apart and records each token once — in the first window that reaches
it, so every token after the first window has at least `context - stride` tokens of left context
(the strided evaluation of Hugging Face's perplexity guide). Documents are recorded in groups of
about `shard_tokens` tokens, one trace shard per group, so an interrupted recording resumes after
its last shard; progress advances with every batch of windows. The documents, their windows
(`chunk_spans`) and shards (`plan_shards`) come from `smviz.data.documents` (re-exported here).
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.hooks import RemovableHandle
from tqdm.auto import tqdm

from smviz.data.documents import Document, chunk_spans, plan_shards, read_documents
from smviz.data.tokenizer import right_pad
from smviz.distributed import any_rank
from smviz.errors import ConfigError, InputError, TraceError
from smviz.model import MemoryModel
from smviz.trace import Trace, TraceWriter, accesses_table, model_meta, tokens_table
from smviz.trace.format import part_name
from smviz.trace.summary import PARTS_DIR, merge_parts, shard_summary, write_part

__all__ = ["DEFAULT_CONTEXT", "DEFAULT_MAX_DOC_CHARS", "DEFAULT_SHARD_TOKENS", "DEFAULT_SUMMARY", "AccessRecorder", "Document",
           "RecordedBatch", "chunk_spans", "plan_shards", "read_documents", "record_texts"]

DEFAULT_CONTEXT = 128
"""Tokens per window when recording text: the sequence length the built-in models are trained on
(longer windows would put tokens at positions the model never saw). Capped by the model's limit."""

DEFAULT_SUMMARY = 20
"""Reading tokens a summary keeps per slot, twice: the N of most weight and a uniform sample of N."""

DEFAULT_SHARD_TOKENS = 32_768
"""Tokens per trace shard, about: the unit of resuming and of splitting a recording over processes."""

DEFAULT_MAX_DOC_CHARS = 1_000_000
"""The longest document `record_texts` takes by default (characters, about a 500-page book): a file
that is one huge line by mistake is refused at once, naming the document, instead of recording for
hours. Raise it (`max_doc_chars`) for documents that are really that long."""

@dataclass
class RecordedBatch:
    """The reads of one forward call, on the host, for its real tokens in (sequence, position) order."""

    batch_size: int  # sequences in the call, padding-only ones included
    seq: np.ndarray  # (n,) int32: the token's row in the call's batch
    position: np.ndarray  # (n,) int32: its column in the attention mask (past positions counted under a KV cache)
    token_id: np.ndarray  # (n,) int32, -1 when the call passed embeddings
    layers: list[int]  # memory blocks recorded, in the order of the slots' second axis
    slots: np.ndarray  # (n, len(layers), heads, knn) int32
    weights: np.ndarray  # (n, len(layers), heads, knn) float16


class AccessRecorder:
    """Records every read of the model's memory layers for every forward call run inside the block.

        with AccessRecorder(model) as rec:
            model(**batch)
        trace = rec.trace()          # in memory; trace.save(path) writes it

    `layers`: memory block indices to record (default all). `on_batch(RecordedBatch)` is called after
    each call; `keep=False` keeps nothing in the recorder (for streaming to disk). Padding positions
    (attention mask 0) are never recorded. Works under `torch.no_grad()` and with gradients (reads
    are detached). The hooks are removed when the block exits, also when it raises."""

    def __init__(
        self,
        model: MemoryModel,
        layers: Sequence[int] | None = None,
        *,
        on_batch: Callable[[RecordedBatch], None] | None = None,
        keep: bool = True,
    ) -> None:
        model.require_memory("recording memory reads")
        available = list(model.memory_layers)
        if layers is not None and not len(layers):
            raise ConfigError(f"layers is empty: name the memory layers to record (the model's are {available})")
        self.layers = available if layers is None else sorted({model.resolve_layer(l) for l in layers})
        self.model = model
        self.on_batch = on_batch
        self.keep = keep
        self.batches: list[RecordedBatch] = []
        self._handles: list[RemovableHandle] = []
        self._call: dict[str, Any] | None = None

    def __enter__(self) -> AccessRecorder:
        if self._handles:
            raise TraceError("this AccessRecorder is already recording")
        lm = self.model.lm
        try:
            self._handles.append(lm.register_forward_pre_hook(self._begin_call, with_kwargs=True))
            self._handles.append(lm.register_forward_hook(self._end_call))
            for block in self.layers:
                memory = self.model.memory_layers[block]
                self._handles.append(memory.add_access_hook(functools.partial(self._on_read, block)))
        except BaseException:
            self._remove_hooks()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._call = None

    # ---- hooks

    def _begin_call(self, _module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        bound = self.model.lm_arguments(args, kwargs)
        self._call = {"input_ids": bound.get("input_ids"), "attention_mask": bound.get("attention_mask"), "reads": {}}

    def _on_read(self, block: int, _layer: torch.nn.Module, indices: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None) -> None:
        if self._call is not None:  # reads outside an LM call (a layer run by hand) are not recorded
            self._call["reads"][block] = (indices.detach(), weights.detach(), mask)

    def _end_call(self, _module: torch.nn.Module, _args: tuple, _output: Any) -> None:
        call, self._call = self._call, None
        if call is None or not call["reads"]:
            return
        batch = self._collect(call)
        if self.on_batch is not None:
            self.on_batch(batch)
        if self.keep:
            self.batches.append(batch)

    def _collect(self, call: dict[str, Any]) -> RecordedBatch:
        """Keep the call's real tokens on the device, then bring them to the host in one transfer
        (page-locked on CUDA; the arrays are views of what arrived, no host-side copies)."""
        blocks = [b for b in self.layers if b in call["reads"]]
        first, _, mask = call["reads"][blocks[0]]
        B, T, H, K = first.shape
        device = first.device
        if mask is None:
            real = torch.arange(B * T, device=device)
        else:
            real = mask.reshape(-1).nonzero().squeeze(1)  # the one synchronisation: how many tokens are real
        ids = call["input_ids"]
        token = ids[:, -T:].reshape(-1)[real] if ids is not None and ids.dim() == 2 else torch.full_like(real, -1)
        full = call["attention_mask"]
        offset = full.shape[1] - T if full is not None and full.dim() == 2 else 0
        rows = torch.stack([real // T, real % T + offset, token], 1).to(torch.int32)
        slots = torch.stack([call["reads"][b][0].reshape(B * T, H, K)[real] for b in blocks], 1).to(torch.int32)
        weights = torch.stack([call["reads"][b][1].reshape(B * T, H, K)[real] for b in blocks], 1).to(torch.float16)
        rows_h, slots_h, weights_h = _to_host(rows, slots, weights)
        return RecordedBatch(
            batch_size=B, seq=rows_h[:, 0], position=rows_h[:, 1], token_id=rows_h[:, 2], layers=blocks,
            slots=slots_h, weights=weights_h,
        )

    # ---- result

    def trace(self, tokenizer: Any = None) -> Trace:
        """The recorded batches as an in-memory `Trace`: document d is the d-th sequence over all calls
        (doc_id 'CALL:SEQ'), token text decoded one token at a time with `tokenizer` (default the
        model's; '' without one), character offsets -1 (unknown)."""
        if not self.batches:
            raise TraceError("nothing was recorded: run the model inside the `with AccessRecorder(...)` block")
        layers = self.batches[0].layers
        if any(b.layers != layers for b in self.batches):
            raise TraceError("the recorded calls read different memory layers (was a layer switched off?); record them separately")
        tokenizer = tokenizer if tokenizer is not None else self.model.tokenizer
        docs, doc_ids, calls_docs = [], [], 0
        for i, b in enumerate(self.batches):
            docs.append(calls_docs + b.seq)
            doc_ids += [f"{i}:{s}" for s in b.seq]
            calls_docs += b.batch_size
        token_id = np.concatenate([b.token_id for b in self.batches])
        texts = _token_texts(tokenizer, token_id)
        unknown = np.full(len(token_id), -1, dtype=np.int32)
        tokens = tokens_table(0, np.concatenate(docs), doc_ids, np.concatenate([b.position for b in self.batches]), token_id, texts, unknown, unknown)
        slots = np.concatenate([b.slots for b in self.batches])
        weights = np.concatenate([b.weights for b in self.batches])
        meta = model_meta(self.model, layers) | {"source": {"kind": "batches", "calls": len(self.batches)}}
        trace = Trace.from_tables(meta, tokens, accesses_table(0, layers, slots, weights))
        trace.meta["counts"]["docs"] = calls_docs
        return trace


def _to_host(*tensors: torch.Tensor) -> list[np.ndarray]:
    """Device tensors as numpy arrays. From CUDA: asynchronous copies into page-locked memory (several
    times faster than pageable; cached by torch's host allocator), then one wait. On the CPU: no copy."""
    if tensors[0].device.type != "cuda":
        return [t.cpu().numpy() for t in tensors]
    hosts = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for host, t in zip(hosts, tensors):
        host.copy_(t, non_blocking=True)
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return [host.numpy() for host in hosts]


def _token_texts(tokenizer: Any, token_id: np.ndarray) -> list[str]:
    if tokenizer is None:
        return [""] * len(token_id)
    unique = np.unique(token_id)
    decoded = {int(i): ("" if i < 0 else tokenizer.decode([int(i)])) for i in unique}
    return [decoded[int(i)] for i in token_id]


# --------------------------------------------------------------------------- recording documents


def record_texts(
    model: MemoryModel,
    documents: Sequence[Document],
    out: str | os.PathLike,
    *,
    source: dict[str, Any] | None = None,
    tokenizer: Any = None,
    layers: Sequence[int] | None = None,
    context: int | None = None,
    stride: int | None = None,
    batch_size: int = 16,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    force: bool = False,
    progress: bool = True,
    on_progress: Callable[[float], None] | None = None,
    max_doc_chars: int = DEFAULT_MAX_DOC_CHARS,
    stop_after_shards: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    summary: int | None = None,
    summary_only: bool = False,
) -> Trace | None:
    """Record `documents` through `model` into a trace at `out` (see module docstring); returns it.

    `context` defaults to DEFAULT_CONTEXT (capped by the model), `stride` to half the context. A
    document longer than `max_doc_chars` characters is refused (InputError naming it) before anything
    is written. After every batch of windows the progress bar (`progress`) and `on_progress(done)`
    get the number of documents recorded so far, fractional inside a document. A partial recording
    of the same documents with the same model and settings is resumed; one of anything else is
    discarded. `stop_after_shards` stops early (returns None), as an interruption would.

    Under torchrun (`rank` of `world_size`, torch.distributed initialised) every process tokenises the
    documents to the same shard plan and records shards rank, rank + world_size, …; the trace is
    the one a single process writes, file for file, and each process resumes its own shards. The
    progress bar and `on_progress` follow this process's documents.

    `summary` N streams per-slot summaries into the trace (`smviz.trace.summary`: counts, the top N
    and a uniform sample of N reading tokens per slot); `summary_only` keeps only them and the tokens
    (N defaults to DEFAULT_SUMMARY), not every read."""
    tokenizer = tokenizer if tokenizer is not None else model.require_tokenizer("recording text")
    if not documents:
        raise InputError("there are no documents to record")
    if max_doc_chars < 1:
        raise ConfigError(f"max_doc_chars must be >= 1, got {max_doc_chars}")
    too_long = next((d for d in documents if len(d.text) > max_doc_chars), None)
    if too_long is not None:
        where = f"{source['name']}: " if source and source.get("name") else ""
        raise InputError(f"{where}document {too_long.id!r} has {len(too_long.text):,} characters, more than "
                         f"max_doc_chars={max_doc_chars:,}; split it into smaller documents or raise the limit")
    summary = DEFAULT_SUMMARY if summary_only and summary is None else summary
    if summary is not None and summary < 1:
        raise ConfigError(f"summary must be >= 1 (contexts kept per slot), got {summary}")
    limit = getattr(model.config, "max_position_embeddings", None) or DEFAULT_CONTEXT
    context = min(DEFAULT_CONTEXT, limit) if context is None else context
    stride = max(1, context // 2) if stride is None else stride
    if not 1 <= context <= limit:
        raise ConfigError(f"context must lie in [1, {limit}] (the model's maximum), got {context}")
    if batch_size < 1 or shard_tokens < 1:
        raise ConfigError("batch_size and shard_tokens must be >= 1")
    chunk_spans(0, context, stride)  # validates stride before anything is written
    recorder_layers = AccessRecorder(model, layers).layers
    meta = model_meta(model, recorder_layers) | {
        "source": dict(source or {"kind": "documents"}) | {"documents": len(documents)},
        "recording": {"context": context, "stride": stride, "batch_size": batch_size, "shard_tokens": shard_tokens,
                      **({"summary": summary, "summary_only": summary_only} if summary else {})},
    }
    groups = plan_shards(tokenizer, documents, shard_tokens)
    writer = TraceWriter(out, meta, force=force, rank=rank, world_size=world_size)
    mine = list(range(rank, len(groups), world_size))
    n_mine = sum(groups[g][1] - groups[g][0] for g in mine)
    done_before = sum(groups[g][1] - groups[g][0] for g in mine if writer.done(g))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    bar = tqdm(total=n_mine, initial=done_before, desc="record", unit="doc", disable=not progress or rank != 0,
               bar_format="{l_bar}{bar}| {n:.2f}/{total_fmt} docs [{elapsed}<{remaining}{postfix}]")

    def report(done: float) -> None:
        bar.update(done - bar.n)
        if on_progress is not None:
            on_progress(done)

    stopped, written = False, 0
    try:
        offset = done_before  # this process's documents recorded before the group at hand
        for g in (g for g in mine if not writer.done(g)):
            first, end, first_row = groups[g]
            encoded = [tokenizer(documents[i].text, add_special_tokens=False, return_offsets_mapping=True)
                       for i in range(first, end)]
            base = offset - first
            tokens, docs, slots, weights = _record_group(model, recorder_layers, documents, first, encoded, first_row,
                                                         context, stride, batch_size, pad, device, lambda d: report(base + d))
            if summary:
                rows = np.arange(first_row, first_row + len(docs))
                write_part(writer.partial, part_name(g), shard_summary(rows, docs, recorder_layers, slots, weights,
                                                                        model.memory_config.n_slots, summary))
            kept = slice(0, 0) if summary_only else slice(None)  # summary-only: empty accesses shards
            writer.write(tokens, accesses_table(first_row, recorder_layers, slots[kept], weights[kept]), shard=g)
            offset += end - first
            report(offset)
            written += 1
            if stop_after_shards is not None and sum(writer.done(s) for s in mine) >= stop_after_shards and offset < n_mine:
                stopped = True
                break
    finally:
        bar.close()
        model.train(was_training)
    if any_rank(stopped, world_size):  # every process stops, or none waits for the others in finish
        return None
    def merge(partial: Any, names: list[str]) -> dict[str, Any]:
        entry = merge_parts(partial, names, recorder_layers, model.memory_config.n_slots, summary)
        shutil.rmtree(partial / PARTS_DIR)
        return {"summary": entry | {"only": summary_only}}

    path = writer.finish(len(documents), n_shards=len(groups), prepare=merge if summary else None)
    return Trace.load(path, verify=False)


def _record_group(
    model: MemoryModel, layers: list[int], documents: Sequence[Document], first: int, encoded: list[dict[str, Any]],
    row0: int, context: int, stride: int, batch_size: int, pad: int, device: torch.device,
    report: Callable[[float], None],
) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
    """Run the group's windows through the model: its tokens table and, per token, its document, slots
    and weights ((n, layers, heads, knn)); after each batch, `report` gets the documents done (`first`
    plus each finished window's share of its document)."""
    spans = [chunk_spans(len(enc["input_ids"]), context, stride) for enc in encoded]
    windows = [(d, s, e, f) for d, doc_spans in enumerate(spans) for s, e, f in doc_spans]
    done = [first + d + (j + 1) / len(doc_spans) for d, doc_spans in enumerate(spans) for j in range(len(doc_spans))]
    kept: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []  # doc, position, slots, weights
    with torch.no_grad(), AccessRecorder(model, layers) as rec:
        for b in range(0, len(windows), batch_size):
            batch = windows[b : b + batch_size]
            ids, mask = right_pad([encoded[d]["input_ids"][s:e] for d, s, e, _ in batch], pad)
            model(input_ids=ids.to(device), attention_mask=mask.to(device))
            if not rec.batches:
                raise TraceError("the memory layers did not run (are they switched off?); nothing to record")
            got = rec.batches.pop()
            starts = np.array([s for _, s, _, _ in batch])
            firsts = np.array([f for _, _, _, f in batch])
            docs = np.array([d for d, _, _, _ in batch])
            pos = starts[got.seq] + got.position
            new = pos >= firsts[got.seq]  # tokens an earlier window already recorded are dropped
            kept.append((docs[got.seq][new], pos[new], got.slots[new], got.weights[new]))
            report(done[b + len(batch) - 1])
    if not kept:  # a group of empty documents
        n_layers, heads, knn = len(layers), model.memory_config.heads, model.memory_config.knn
        kept = [(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, n_layers, heads, knn), np.int32),
                 np.zeros((0, n_layers, heads, knn), np.float16))]
    doc = np.concatenate([k[0] for k in kept])
    pos = np.concatenate([k[1] for k in kept])
    token_id, start, end, text = [], [], [], []
    for d, enc in enumerate(encoded):
        ids_d, offsets, raw = enc["input_ids"], enc["offset_mapping"], documents[first + d].text
        token_id += ids_d
        prev = 0
        for i, (a, z) in enumerate(offsets):
            stop = len(raw) if i == len(offsets) - 1 else max(z, prev)  # the last token takes trailing text
            text.append(raw[prev:stop])
            prev = stop
            start.append(a)
            end.append(z)
    # tokens arrive in (document, position) order; check it, since rows must match the texts above
    expected_pos = np.concatenate([np.arange(len(enc["input_ids"])) for enc in encoded]) if encoded else np.zeros(0)
    if len(pos) != len(expected_pos) or np.any(pos != expected_pos):
        raise TraceError("internal error: recorded tokens do not cover every document position once")
    tokens = tokens_table(
        row0, doc + first, [documents[first + d].id for d in doc], pos, np.asarray(token_id), text,
        np.asarray(start), np.asarray(end),
    )
    return tokens, doc + first, np.concatenate([k[2] for k in kept]), np.concatenate([k[3] for k in kept])
