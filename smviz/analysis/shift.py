"""How access patterns and answers shifted between two checkpoints of one model:

- `access_shift(before, after, probe)`: per probe token and memory layer, Jaccard of the slot sets read;
- `prompt_access_shift(before, after, prompts, what=...)`: the same on prompt texts, with the probe's size
  and protocol in `attrs` — a diff's access shift (on editing records: their rewrite and paraphrase prompts);
- `question_access_shift(before, after, facts, prompt_format=...)`: `prompt_access_shift` on the facts'
  held-out questions in a prompt format — THE access shift of a facts diff (the diff report and the app's
  Diff page both show it);
- `fact_shift(before, after, facts, prompt_format=...)`: per question, answer and F1 before vs after.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from smviz.analysis.diff import check_comparable
from smviz.data.facts import Fact
from smviz.data.prompts import get_prompt_format
from smviz.data.tokenizer import right_pad
from smviz.errors import AnalysisError
from smviz.evaluate import answer_questions
from smviz.model import MemoryModel
from smviz.record import AccessRecorder

SHIFT_COLUMNS = ["doc", "position", "token_id", "layer", "n_before", "n_after", "n_common", "jaccard"]
FACT_SHIFT_COLUMNS = ["fact_id", "question", "gold", "answer_before", "answer_after", "em_before", "em_after",
                      "f1_before", "f1_after", "delta_f1", "answer_changed"]


def access_shift(
    before: MemoryModel,
    after: MemoryModel,
    probe: Sequence[str] | Mapping[str, torch.Tensor] | torch.Tensor,
    *,
    layers: Sequence[int] | None = None,
) -> pd.DataFrame:
    """Per probe token and memory layer: the set of slots read (union over heads of each head's top-k)
    by `before` and by `after`, and their Jaccard similarity |A∩B| / |A∪B| (1 = same slots).

    `probe`: texts (tokenised with `before`'s tokenizer, each its own document, no special tokens
    added), a batch dict with `input_ids` (and `attention_mask`; padding is skipped), or an input-ids
    tensor (B, T). Columns: doc (probe number), position, token_id, layer, n_before, n_after, n_common,
    jaccard."""
    check_comparable(before, after)
    batch = probe_batch(before, probe)
    sets = []
    for model in (before, after):
        with torch.no_grad(), AccessRecorder(model, layers) as rec:
            model(**{k: v.to(model.device) for k, v in batch.items()})
        sets.append(rec.batches[0])
    b, a = sets
    frames = []
    for li, layer in enumerate(b.layers):
        sb = b.slots[:, li].reshape(len(b.slots), -1).astype(np.int64)
        sa = a.slots[:, li].reshape(len(a.slots), -1).astype(np.int64)
        n_b, n_a, common = _set_sizes(sb, sa)
        union = n_b + n_a - common
        frames.append(pd.DataFrame({
            "doc": b.seq.astype(np.int64), "position": b.position.astype(np.int64), "token_id": b.token_id.astype(np.int64),
            "layer": layer, "n_before": n_b, "n_after": n_a, "n_common": common, "jaccard": common / union,
        }))
    return pd.concat(frames, ignore_index=True)[SHIFT_COLUMNS]


def prompt_access_shift(before: MemoryModel, after: MemoryModel, prompts: Sequence[str], *,
                        what: str = "the prompts given") -> pd.DataFrame:
    """`access_shift` on prompt texts (each its own document), with `attrs["probe_size"]` the number of
    prompts and `attrs["protocol"]` saying what was probed: `what` names the prompts ("the 3 records'
    rewrite prompts ...")."""
    prompts = list(prompts)
    if not prompts:
        raise AnalysisError("no prompts given: the access shift probes prompt texts")
    shift = access_shift(before, after, prompts)
    shift.attrs["probe_size"] = len(prompts)
    shift.attrs["protocol"] = (f"probe: {what} ({len(prompts)} prompts); per token and memory layer the Jaccard of "
                               "the slot sets read before vs after (access_shift)")
    return shift


def question_access_shift(before: MemoryModel, after: MemoryModel, facts: Sequence[Fact], *,
                          prompt_format: str = "qa") -> pd.DataFrame:
    """`prompt_access_shift` on the facts' questions — the protocol of a facts diff's access shift: the
    probe is every held-out question of `facts` as prompt text in `prompt_format` (`smviz.data.prompts`;
    qa: `qa_prompt` text; chat: the tokenizer's chat template — what the evaluation asks; when none of the
    facts has held-out questions, all their questions). Columns as `access_shift`; `attrs["probe_size"]`
    is the number of prompts and `attrs["protocol"]` says how the probe was made, naming the format."""
    facts = list(facts)
    if not facts:
        raise AnalysisError("no facts given: the access shift probes the facts' questions")
    fmt = get_prompt_format(prompt_format)
    probe = [fmt.prompt(before.tokenizer, q.text) for f in facts for q in f.heldout_questions]
    which = "held-out questions"
    if not probe:
        probe, which = [fmt.prompt(before.tokenizer, q.text) for f in facts for q in f.questions], "questions (none is held out)"
    text = "qa_prompt text" if fmt.name == "qa" else f"{fmt.name} prompt text"
    return prompt_access_shift(before, after, probe, what=f"the {len(facts)} facts' {which} as {text}")


def fact_shift(before: MemoryModel, after: MemoryModel, facts: Sequence[Fact], *, heldout: bool = True,
               prompt_format: str = "qa", max_new_tokens: int | None = None) -> pd.DataFrame:
    """Per question of `facts` (held-out templates; training ones with heldout=False): the greedy
    answer and its EM / token F1 under `before` and `after` (`smviz.evaluate.answer_questions`, asked in
    `prompt_format`; at most `max_new_tokens` answer tokens, by default the format's `answer_tokens`).
    Columns: fact_id, question, gold, answer_before, answer_after, em_before, em_after, f1_before,
    f1_after, delta_f1 (after − before), answer_changed."""
    facts = list(facts)
    if not facts:
        raise AnalysisError("no facts given: pass at least one Fact")
    rb, ra = (answer_questions(m, facts, heldout=heldout, prompt_format=prompt_format, max_new_tokens=max_new_tokens)
              for m in (before, after))
    rows = [{
        "fact_id": x["fact_id"], "question": x["question"], "gold": x["gold"],
        "answer_before": x["prediction"], "answer_after": y["prediction"], "em_before": x["em"], "em_after": y["em"],
        "f1_before": x["f1"], "f1_after": y["f1"], "delta_f1": y["f1"] - x["f1"],
        "answer_changed": x["prediction"] != y["prediction"],
    } for x, y in zip(rb, ra)]
    return pd.DataFrame(rows, columns=FACT_SHIFT_COLUMNS)


def probe_batch(model: MemoryModel, probe) -> dict[str, torch.Tensor]:
    """A probe (texts, a batch dict or an input-ids tensor; see `access_shift`) as a right-padded batch."""
    if isinstance(probe, torch.Tensor):
        probe = {"input_ids": probe}
    if isinstance(probe, Mapping):
        if "input_ids" not in probe:
            raise AnalysisError("a probe batch needs 'input_ids'")
        ids = torch.as_tensor(probe["input_ids"])
        if ids.dim() != 2 or ids.numel() == 0:
            raise AnalysisError(f"input_ids must be a non-empty (batch, tokens) tensor, got shape {tuple(ids.shape)}")
        mask = probe.get("attention_mask")
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids) if mask is None else torch.as_tensor(mask)}
    texts = list(probe)
    if not texts or not all(isinstance(t, str) and t for t in texts):
        raise AnalysisError("probe texts must be a non-empty list of non-empty strings")
    if model.tokenizer is None:
        raise AnalysisError("the model has no tokenizer: pass the probe as input_ids")
    encoded = [model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    ids, mask = right_pad(encoded, 0)  # padding (id 0) is masked out and never recorded
    return {"input_ids": ids, "attention_mask": mask}


def _set_sizes(a: np.ndarray, b: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of two (n, m) id arrays: distinct ids in a, in b, and in both."""
    n_a, n_b, common = (np.zeros(len(a), np.int64) for _ in range(3))
    for lo in range(0, len(a), chunk):
        x, y = np.sort(a[lo : lo + chunk], 1), np.sort(b[lo : lo + chunk], 1)
        first_x = np.ones_like(x, dtype=bool)
        first_x[:, 1:] = x[:, 1:] != x[:, :-1]
        first_y = np.ones_like(y, dtype=bool)
        first_y[:, 1:] = y[:, 1:] != y[:, :-1]
        n_a[lo : lo + chunk] = first_x.sum(1)
        n_b[lo : lo + chunk] = first_y.sum(1)
        in_y = (x[:, :, None] == y[:, None, :]).any(2)
        common[lo : lo + chunk] = (first_x & in_y).sum(1)
    return n_a, n_b, common
