"""The built-in finetuning methods, registered in the order --help lists them: the value-row methods
with their selection rules (`sparse` = rule tf-idf, `tf-only`, `memory-all`, `random-t`, `kl`,
`grad-norm`, `sparse-tf-ties`), then
`full` and `lora`. A new rule is one module under `smviz/train/rules/` plus one `register_rule` line."""

from __future__ import annotations

from smviz.train.methods import FULL, LORA, register_method
from smviz.train.rules import grad_norm, kl, memory_all, random_t, tf_only, tfidf, tfidf_tf_ties
from smviz.train.selection import register_rule

register_rule(tfidf.RULE)
register_rule(tf_only.RULE)
register_rule(memory_all.RULE)
register_rule(random_t.RULE)
register_rule(kl.RULE)
register_rule(grad_norm.RULE)
register_rule(tfidf_tf_ties.RULE)
register_method(FULL)
register_method(LORA)
