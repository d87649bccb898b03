"""Collaborative tokens (LLaRA's hybrid prompt): a recommender's item embeddings, mapped by a small trained
projector into the LLM's input-embedding space, one soft token per item of a re-rank prompt.

A prompt marks an item's soft token with `<item:17>` (`recalign.prompts.item_marker`). `encode_prompt` tokenises
the text around the markers and puts the id -17 where a marker was, so padding, truncation, collation and the
packed log-probs handle these prompts as they do text ones. `CollabLM` wraps a causal LM (a PEFT model in
training, a merged one at inference): its forward and its generate embed the ordinary ids with the LM's own
embedding table and each negative id with `Projector(item_table[item])`, and pass `inputs_embeds` on. The item
table (SASRec's item embeddings, row = item_idx) is frozen; the projector is a trainable submodule, so it trains
with the LoRA weights and DDP averages its gradients. Both are saved beside the adapter as `collab.safetensors`.
"""

from __future__ import annotations

import dataclasses
import os

import torch
from torch import nn

from recalign.prompts import ITEM_PATTERN, PromptConfig

COLLAB_FILE = "collab.safetensors"
_MARKER = ITEM_PATTERN


def prompt_for(prompt: PromptConfig, has_projector: bool) -> PromptConfig:
    """The prompt a policy reads: the run's, or its titles-only form for a policy without a projector (the base
    model's zero-shot in a run whose re-rankers have collaborative tokens)."""
    return prompt if has_projector else dataclasses.replace(prompt, item_tokens="none")


def has_projector(adapter: str | None) -> bool:
    """Whether the policy published at `adapter` (any run storage) was trained with collaborative tokens."""
    from recalign import io

    return bool(adapter) and io.exists(io.join(adapter, COLLAB_FILE))


def has_item_tokens(text: str) -> bool:
    return _MARKER.search(text) is not None


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a rendered prompt, -item for each item marker. Without markers: the tokenizer's own ids."""
    pieces = _MARKER.split(text)
    if len(pieces) == 1:
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    for n, piece in enumerate(pieces):
        if n % 2:  # the captured item index
            item = int(piece)
            if item < 1:
                raise ValueError(f"item marker <item:{item}>: item indices start at 1 (0 is padding)")
            ids.append(-item)
        elif piece:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return ids


def encode_prompts(tokenizer, texts: list[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """{"input_ids", "attention_mask"}, left-padded with the tokenizer's pad id: the tokenizer's batch encoding
    when no prompt has markers, the same layout with -item ids when one does."""
    if not any(has_item_tokens(t) for t in texts):
        return dict(tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device))
    encoded = [encode_prompt(tokenizer, t) for t in texts]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, e in enumerate(encoded):
        ids[row, width - len(e):] = torch.tensor(e, dtype=torch.long)
        mask[row, width - len(e):] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


class Projector(nn.Module):
    """Item embedding (d) -> LLM input embedding (h): Linear, GELU, Linear (LLaRA's MLP). The input is divided
    by the item table's RMS and the output scaled so that, at initialisation, the soft tokens have the RMS of
    the LLM's own token embeddings (an untrained projector then writes tokens of ordinary size)."""

    def __init__(self, item_dim: int, hidden: int, in_scale: float = 1.0, out_scale: float = 1.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(item_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.register_buffer("in_scale", torch.tensor(float(in_scale)))
        self.register_buffer("out_scale", torch.tensor(float(out_scale)))

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        return self.net(vectors / self.in_scale) * self.out_scale


def _rms(x: torch.Tensor) -> float:
    return float(x.detach().float().pow(2).mean().sqrt().clamp(min=1e-8))


class CollabLM(nn.Module):
    """A causal LM whose input ids may hold -item ids (see the module docstring)."""

    def __init__(self, model: nn.Module, item_table: torch.Tensor, projector: Projector):
        super().__init__()
        self.model = model
        self.projector = projector
        device = model.get_input_embeddings().weight.device
        self.register_buffer("item_table", item_table.detach().float().to(device).clone(), persistent=False)

    @classmethod
    def fresh(cls, model: nn.Module, item_table: torch.Tensor, seed: int = 0) -> "CollabLM":
        """A new projector (seeded) sized for `model` and `item_table`, scaled as `Projector` says."""
        embeddings = model.get_input_embeddings().weight
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            projector = Projector(item_table.shape[1], embeddings.shape[1], in_scale=_rms(item_table[1:]))
        finally:
            torch.random.set_rng_state(generator_state)
        with torch.no_grad():
            projector.out_scale.fill_(_rms(embeddings) / _rms(projector(item_table[1:].float())))
        return cls(model, item_table, projector.to(embeddings.device))

    @classmethod
    def load(cls, model: nn.Module, adapter_dir: str) -> "CollabLM":
        """`model` with the item table and projector saved in `adapter_dir`/collab.safetensors."""
        from safetensors.torch import load_file

        state = load_file(os.path.join(adapter_dir, COLLAB_FILE))
        table = state.pop("item_table")
        weight = model.get_input_embeddings().weight
        projector = Projector(table.shape[1], weight.shape[1])
        projector.load_state_dict({k.removeprefix("projector."): v for k, v in state.items()})
        return cls(model, table, projector.to(weight.device))

    def load_projector(self, adapter_dir: str) -> None:
        """The projector weights of `adapter_dir`/collab.safetensors (a checkpoint, an init adapter)."""
        from safetensors.torch import load_file

        state = load_file(os.path.join(adapter_dir, COLLAB_FILE))
        if state["item_table"].shape != self.item_table.shape:
            raise ValueError(f"{adapter_dir}/{COLLAB_FILE}: item table {tuple(state['item_table'].shape)}, this "
                             f"run's is {tuple(self.item_table.shape)}")
        self.projector.load_state_dict({k.removeprefix("projector."): v for k, v in state.items()
                                        if k.startswith("projector.")})

    def save_collab(self, directory: str) -> None:
        from safetensors.torch import save_file

        state = {f"projector.{k}": v.detach().cpu().contiguous() for k, v in self.projector.state_dict().items()}
        save_file({**state, "item_table": self.item_table.cpu().contiguous()}, os.path.join(directory, COLLAB_FILE))

    def save_pretrained(self, directory: str) -> None:
        """The wrapped model's own save (a PEFT adapter) and collab.safetensors beside it."""
        self.model.save_pretrained(directory)
        self.save_collab(directory)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids, -item for soft tokens -> (B, T, h) input embeddings."""
        table = self.model.get_input_embeddings()
        slots = input_ids < 0
        embeds = table(input_ids.clamp(min=0))
        if not slots.any():
            return embeds
        items = -input_ids[slots]
        if int(items.max()) >= self.item_table.shape[0]:
            raise ValueError(f"item {int(items.max())} is beyond the item table ({self.item_table.shape[0] - 1} "
                             "items): the prompt and the projector come from different datasets")
        vectors = self.projector(self.item_table[items]).to(embeds.dtype)
        return embeds.masked_scatter(slots[..., None], vectors)

    def forward(self, input_ids: torch.Tensor, **kwargs):
        return self.model(inputs_embeds=self.embed(input_ids), **kwargs)

    def generate(self, input_ids: torch.Tensor, **kwargs):
        """As the wrapped model's generate, the returned sequences starting with the prompt ids as for ids input
        (Hugging Face returns only the new tokens for embeddings input)."""
        out = self.model.generate(inputs_embeds=self.embed(input_ids), **kwargs)
        prompt = input_ids.clamp(min=0)
        if hasattr(out, "sequences"):
            out.sequences = torch.cat([prompt, out.sequences], dim=1)
            return out
        return torch.cat([prompt, out], dim=1)

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def disable_adapter(self):
        return self.model.disable_adapter()


def peft_of(model: nn.Module) -> nn.Module:
    """The PEFT model inside a CollabLM, or the model itself."""
    return model.model if isinstance(model, CollabLM) else model
