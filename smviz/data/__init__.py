"""Data: the fact world and its lexicon, the facts schema, the background corpus, the tokenizer and
right-padded batches, and the documents a user brings to record."""
