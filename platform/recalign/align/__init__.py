"""Preference alignment of an LLM policy: DPO, DMPO and S-DPO with K negatives, LoRA, on Ray Train.

- `config`: AlignConfig, PoliciesConfig, SweepConfig. `losses`: the preference losses.
- `logprobs`: tokenisation of prompt + 1 + K completions and the shared-prompt summed log-probs.
- `loop`: the per-worker Ray Train loop. `trainer`: `train_policy`, the driver that publishes the adapter.
- `stage`: the pipeline's align stage. `sweep`: the Ray Tune sweep.
"""
