"""What slots encode: TF-IDF views, entities (spaCy NER), overlap across steps and facts, checkpoint
diffs, vocabulary projection and slot ablation. Every function returns a pandas DataFrame with
documented columns — the notebook API that the app and the reports reuse."""
