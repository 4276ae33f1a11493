"""Dense torch AdamW vs smviz RowAdamW on the value table, fed the same sparse gradients: which rows
that a step did not select move anyway? (analyses/finetuning.md)

    python analyses/dense_adamw_leak.py WS/models/tiny WS/data/facts-new.jsonl
"""
import sys
import torch
from smviz.model import MemoryModel
from smviz.stats import SlotStats
from smviz.data.facts import read_facts
from smviz.train import Stream, FinetuneConfig, Trainer
m = MemoryModel.from_pretrained(sys.argv[1]); stats = SlotStats.load_for_model(sys.argv[1], m)
facts = read_facts(sys.argv[2])[:6]
cfg = FinetuneConfig(method="sparse", optimizer="adamw", lr=0.1, steps_per_fact=1).resolved()
tr = Trainer(m, cfg, stats, torch.device("cpu")); m.eval()
stream = Stream(facts, m.tokenizer, 16, 1, "statements+qa")
table = m.memory_layers[2].value_table.weight
ws = [table.detach().clone().requires_grad_(True) for _ in range(2)]
dense = [torch.optim.AdamW([ws[0]], lr=0.1, weight_decay=0.1), torch.optim.AdamW([ws[1]], lr=0.1, weight_decay=0.0)]
captured = {}
orig = tr.row_optimizers[2].step
def spy(weight, rows, grad):
    captured["rows"], captured["grad"] = rows.clone(), grad.clone(); orig(weight, rows, grad)
tr.row_optimizers[2].step = spy
for step in range(6):
    before_sparse, before = table.detach().clone(), [w.detach().clone() for w in ws]
    tr.step(stream.batch(step), step)
    rows = captured["rows"]
    sel = torch.zeros(len(table), dtype=torch.bool); sel[rows] = True
    moved = []
    for w, opt, b in zip(ws, dense, before):
        g = torch.zeros_like(w); g[rows] = captured["grad"]; w.grad = g; opt.step(); opt.zero_grad()
        moved.append(((w.detach() != b).any(1) & ~sel).sum().item())
    moved_sparse = ((table.detach() != before_sparse).any(1) & ~sel).sum().item()
    print(f"step {step+1}: selected {int(sel.sum())}; unselected rows moved: RowAdamW {moved_sparse}, dense AdamW wd 0.1: {moved[0]}, dense AdamW wd 0: {moved[1]} (of {len(table) - int(sel.sum())})")
