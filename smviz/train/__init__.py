"""Training: pretraining from scratch (and, later, the finetuning methods and the stream runner)."""
