"""Data stages: sources, the demo corpus, cleaning, dedup and the split."""
