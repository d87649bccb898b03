"""The direct LLM re-ranker: candidates scored by their letter logits (scorer), and the service Serve wraps."""
