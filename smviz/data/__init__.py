"""Data: synthetic tasks, the fact world, the background corpus and the tokenizer."""
