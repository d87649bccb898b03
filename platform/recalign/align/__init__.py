"""Preference alignment of an LLM policy: DPO, DMPO and S-DPO with K negatives, LoRA, on Ray Train.

- `pairs`: read/check the pairs files (or build heuristic ones for tests and smoke runs).
- `logprobs`: tokenisation of prompt + 1 + K completions and the shared-prompt summed log-probs.
- `trainer`: AlignConfig, the driver `train_policy` and the skip-if-done `policy_stage`.
- `loop`: the per-worker Ray Train loop.
The losses themselves are in `recalign.align.losses`.
"""
