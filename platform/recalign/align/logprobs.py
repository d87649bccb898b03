"""Summed completion log-probabilities for one prompt and its 1 + K completions.

A preference example is a prompt x with N = 1 + K completions (chosen first, then the K rejected).
The losses need log pi(y_n | x) = sum_t log pi(y_n,t | x, y_n,<t) for every n. Three ways to get
them, all giving the same values and gradients (tests compare them):

- `packed_logps` (default): one sequence per example, [prompt, y_1, ..., y_N], with a block
  attention mask (every completion sees the prompt and itself, causally, never another
  completion) and position ids restarting after the prompt for each completion. The prompt is
  encoded once, in the same forward, and no KV is copied. Needs an attention implementation
  that takes a 4D mask (sdpa, eager).
- `kv_cache_logps`: the prompt through the model once with the KV cache on, the cache repeated
  across the N completions, then one batched forward over the completions on top of it. The
  prompt's keys and values stay in the autograd graph, so LoRA weights on prompt positions get
  gradient from all N completions. Works with any attention that handles padding (flash too),
  at the cost of N copies of the prompt KV.
- `naive_logps`: N full prompt + completion sequences (what TRL does with K = 1); the reference
  the tests and the benchmark compare against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EncodedExample:
    """Token ids of one example: the prompt and its N completions (chosen first), each ending in EOS."""

    prompt_ids: list[int]
    completion_ids: list[list[int]]


@dataclass
class CompletionBatch:
    """B examples with N completions each, as padded tensors."""

    prompt_ids: torch.Tensor  # (B, P) left-padded, so every prompt ends in the last column
    prompt_mask: torch.Tensor  # (B, P) 1 = real token
    completion_ids: torch.Tensor  # (B, N, C) right-padded
    completion_mask: torch.Tensor  # (B, N, C) 1 = real token

    def to(self, device: torch.device | str) -> "CompletionBatch":
        return CompletionBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}

    def present(self) -> torch.Tensor:
        """(B, N) bool: which completions exist (a row with fewer than N rejected is padded with empty ones)."""
        return self.completion_mask.bool().any(dim=2)

    def sequence_tokens(self) -> int:
        """Tokens of the N full prompt + completion sequences (the work the naive form does)."""
        prompt_tokens = self.prompt_mask.sum(dim=1)  # (B,)
        return int((prompt_tokens * self.completion_ids.shape[1]).sum() + self.completion_mask.sum())


def encode_example(tokenizer, prompt: str, completions: list[str], max_prompt_tokens: int,
                   max_completion_tokens: int, add_eos: bool = True) -> EncodedExample:
    """Tokenise a chat-rendered prompt and its completions, each followed by EOS when `add_eos`.

    The prompt already carries its special tokens (chat template), so none are added. A prompt longer
    than max_prompt_tokens keeps its end (the assistant header must stay); a completion longer than
    max_completion_tokens keeps its start (and loses its EOS). Re-rank completions are a letter alone
    and take no EOS: the loss is then the log-probability of the letter token, the quantity the
    re-ranker scores. An item marker (<item:N>) in the prompt becomes the id -N (`recalign.llm.collab`).
    """
    if add_eos and tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token_id; the completions need one")
    from recalign.llm.collab import encode_prompt

    prompt_ids = encode_prompt(tokenizer, prompt)[-max_prompt_tokens:]  # -item where a collaborative token is
    completion_ids = []
    for text in completions:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if add_eos else [])
        if not ids:
            raise ValueError(f"completion {text!r} encodes to no token")
        completion_ids.append(ids[:max_completion_tokens])
    return EncodedExample(prompt_ids, completion_ids)


def collate(examples: list[EncodedExample], pad_token_id: int, num_completions: int | None = None) -> CompletionBatch:
    """Pad B examples into a CompletionBatch of N completions each: N = `num_completions` (1 = the chosen only)
    or the most any example has. An example with fewer gets empty completions (mask 0, log-prob 0), which
    `CompletionBatch.present` reports so the losses leave them out."""
    n = num_completions or max(len(e.completion_ids) for e in examples)
    if any(not e.completion_ids for e in examples):
        raise ValueError("every example needs its chosen completion")
    prompt_len = max(len(e.prompt_ids) for e in examples)
    completion_len = max(len(c) for e in examples for c in e.completion_ids[:n])
    batch = len(examples)
    prompt_ids = torch.full((batch, prompt_len), pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros((batch, prompt_len), dtype=torch.long)
    completion_ids = torch.full((batch, n, completion_len), pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros((batch, n, completion_len), dtype=torch.long)
    for b, example in enumerate(examples):
        p = len(example.prompt_ids)
        prompt_ids[b, prompt_len - p:] = torch.tensor(example.prompt_ids)
        prompt_mask[b, prompt_len - p:] = 1
        for k, ids in enumerate(example.completion_ids[:n]):
            completion_ids[b, k, :len(ids)] = torch.tensor(ids)
            completion_mask[b, k, :len(ids)] = 1
    return CompletionBatch(prompt_ids, prompt_mask, completion_ids, completion_mask)


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] without materialising the (.., V) log-softmax. (..., V), (...) -> (...)."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def kv_cache_logps(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                        completion_mask: torch.Tensor) -> torch.Tensor:
    """(B, N) summed completion log-probs, encoding each prompt once through an expanded KV cache.

    model: a Hugging Face causal LM (or a PEFT model around one) that accepts past_key_values,
    position_ids and logits_to_keep. Shapes as in CompletionBatch.
    """
    batch, n, completion_len = completion_ids.shape
    prompt_positions = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)
    prompt_out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=prompt_positions,
                       use_cache=True, logits_to_keep=1)
    # Left padding puts every prompt's last token in the last column: it predicts each first completion token.
    first_logits = prompt_out.logits[:, -1]  # (B, V)
    first = token_logps(first_logits[:, None, :].expand(-1, n, -1), completion_ids[:, :, 0])  # (B, N)

    cache = prompt_out.past_key_values
    cache.batch_repeat_interleave(n)  # (B*N, heads, P, d); repeat_interleave sums gradients back on backward
    flat_ids = completion_ids.reshape(batch * n, completion_len)
    flat_mask = completion_mask.reshape(batch * n, completion_len)
    attention_mask = torch.cat([prompt_mask.repeat_interleave(n, dim=0), flat_mask], dim=1)
    start = prompt_mask.sum(dim=1).repeat_interleave(n)[:, None]  # (B*N, 1) first completion position
    positions = start + torch.arange(completion_len, device=flat_ids.device)[None, :]
    out = model(input_ids=flat_ids, attention_mask=attention_mask, position_ids=positions,
                past_key_values=cache, use_cache=True, logits_to_keep=completion_len)
    rest = token_logps(out.logits[:, :-1], flat_ids[:, 1:]).reshape(batch, n, completion_len - 1)
    per_token = torch.cat([first[:, :, None], rest], dim=2) * completion_mask
    return per_token.sum(dim=2)


def naive_logps(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                completion_mask: torch.Tensor) -> torch.Tensor:
    """(B, N) summed completion log-probs from N full prompt + completion sequences per example.

    Sequences are left-padded so every completion ends in the last column; logits are computed only
    for the last C + 1 positions (the LM head is not run over prompts), as a fair baseline.
    """
    batch, n, completion_len = completion_ids.shape
    rows = []
    for b in range(batch):
        prompt = prompt_ids[b][prompt_mask[b].bool()]
        for k in range(n):
            rows.append(torch.cat([prompt, completion_ids[b, k][completion_mask[b, k].bool()]]))
    seq_len = max(len(r) for r in rows)
    input_ids = prompt_ids.new_zeros((len(rows), seq_len))
    attention_mask = prompt_mask.new_zeros((len(rows), seq_len))
    for i, row in enumerate(rows):
        input_ids[i, seq_len - len(row):] = row
        attention_mask[i, seq_len - len(row):] = 1
    positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False,
                logits_to_keep=completion_len + 1)
    per_token = token_logps(out.logits[:, :-1], input_ids[:, -completion_len:])  # (B*N, C), right-aligned
    lengths = completion_mask.reshape(batch * n, completion_len).sum(dim=1)  # (B*N,)
    columns = torch.arange(completion_len, device=input_ids.device)[None, :]
    right_aligned_mask = columns >= (completion_len - lengths)[:, None]
    return (per_token * right_aligned_mask).sum(dim=1).reshape(batch, n)


def packed_logps(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                 completion_mask: torch.Tensor) -> torch.Tensor:
    """(B, N) summed completion log-probs from one packed sequence per example.

    Row b is [left-padded prompt (P), y_1, ..., y_N packed tightly, right padding]; every prompt
    ends in column P - 1, so logits are computed for columns P - 1 onward only.
    """
    batch, n, completion_len = completion_ids.shape
    prompt_len, device = prompt_ids.shape[1], prompt_ids.device
    lengths = completion_mask.sum(dim=2)  # (B, N)
    region = int(lengths.sum(dim=1).max())
    total = prompt_len + region
    steps = torch.arange(completion_len, device=device)
    starts = prompt_len + lengths.cumsum(dim=1) - lengths  # (B, N) column of each completion's first token
    column = starts[:, :, None] + steps  # (B, N, C)
    real = completion_mask.bool()
    rows = torch.arange(batch, device=device)[:, None, None].expand(batch, n, completion_len)

    ids = prompt_ids.new_zeros((batch, total))
    segment = torch.full((batch, total), -1, dtype=torch.long, device=device)  # 0 prompt, n + 1 completion n
    positions = torch.zeros((batch, total), dtype=torch.long, device=device)
    ids[:, :prompt_len] = prompt_ids
    segment[:, :prompt_len] = torch.where(prompt_mask.bool(), 0, -1)
    positions[:, :prompt_len] = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)
    ids[rows[real], column[real]] = completion_ids[real]
    shape = (batch, n, completion_len)
    segment[rows[real], column[real]] = torch.arange(1, n + 1, device=device)[None, :, None].expand(shape)[real]
    positions[rows[real], column[real]] = (prompt_mask.sum(dim=1)[:, None, None] + steps).expand(shape)[real]

    query, key = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(total, total, dtype=torch.bool, device=device).tril()
    allowed = causal & (query >= 0) & ((key == 0) | (key == query))
    allowed |= torch.eye(total, dtype=torch.bool, device=device)  # padding sees itself: no all-masked row (NaN)
    dtype = next(model.parameters()).dtype
    mask = torch.zeros((batch, 1, total, total), dtype=dtype, device=device)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)

    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                logits_to_keep=region + 1)
    logits = out.logits  # (B, R + 1, V) for columns P - 1 .. P + R - 1
    # Token t > 0 is predicted at its own column - 1; the first token at the prompt's last column (kept index 0).
    predictor = torch.where(steps == 0, 0, column - prompt_len).clamp(max=region)  # (B, N, C)
    log_norm = torch.logsumexp(logits.float(), dim=-1)  # (B, R + 1)
    per_token = logits[rows, predictor, completion_ids].float() - log_norm[rows, predictor]
    return (per_token * completion_mask).sum(dim=2)


SCORERS = {"packed": packed_logps, "kv_cache": kv_cache_logps, "none": naive_logps}


class PolicyScorer(torch.nn.Module):
    """Wraps a causal LM so that one DDP forward scores a whole CompletionBatch: (B, N) summed log-probs.

    DDP hooks the module's forward; putting the whole scoring (two passes for kv_cache) inside one
    forward keeps DDP's one-forward-one-backward contract. prompt_sharing: packed | kv_cache | none.
    """

    def __init__(self, model: torch.nn.Module, prompt_sharing: str = "packed"):
        super().__init__()
        if prompt_sharing not in SCORERS:
            raise ValueError(f"prompt_sharing must be one of {list(SCORERS)}, got {prompt_sharing!r}")
        self.model = model
        self.prompt_sharing = prompt_sharing

    def forward(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                completion_mask: torch.Tensor) -> torch.Tensor:
        return SCORERS[self.prompt_sharing](self.model, prompt_ids, prompt_mask, completion_ids, completion_mask)
