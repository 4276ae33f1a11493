"""The built-in selection rules, one module each: `tfidf` (the paper's, method `sparse`), `tf_only`,
`memory_all`, `random_t` and `kl`. Each defines `RULE`; `smviz.train.builtin` registers them."""
