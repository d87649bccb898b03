"""Tiny random language models and tokenizers, built in-process (nothing is downloaded).

`save_tiny_llama(dir)` writes a Hugging Face folder (config, safetensors, tokenizer with a ChatML
chat template like SmolLM2's) that transformers, PEFT, TRL and vLLM all load. Tests use it, and the
pipeline's `smoke` preset runs every stage on it (model name "tiny", see `resolve_model`): its
analyses are gibberish, so a smoke run proves the plumbing, never the method.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The user enjoys dramas and thrillers from the nineties, with dark moods and crime themes.",
    "Movies: Toy Story (1995), GoldenEye (1995), Four Rooms (1995), Get Shorty (1995), Copycat (1995).",
    "Genres: Action, Adventure, Animation, Children's, Comedy, Crime, Documentary, Drama, Fantasy, "
    "Film-Noir, Horror, Musical, Mystery, Romance, Sci-Fi, Thriller, War, Western.",
    "Rated 5 out of 5. Rated 1 out of 5. Candidates A B C D E F G H I J K L M N O P Q R S T.",
    "Analyse the user's preferences by genre, era, mood and themes. Answer with one letter.",
    "0123456789 ()[]:;,.!?'\"-",
]


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on a few lines, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_llama(tokenizer, hidden_size: int = 64, num_layers: int = 2, seed: int = 0):
    """A random LlamaForCausalLM sized for tests (head_dim 32, which vLLM's CPU kernels support)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=hidden_size // 32, num_key_value_heads=1,
        max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, torch_dtype="float32",
    )
    return LlamaForCausalLM(config)


def save_tiny_llama(path: str | Path, seed: int = 0) -> Path:
    """Write the tiny model to `path` (built in a temporary sibling, then renamed into place)."""
    path = Path(path)
    tokenizer = build_tokenizer()
    model = build_tiny_llama(tokenizer, seed=seed)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = path.parent / f".tmp-{uuid.uuid4().hex[:8]}-{path.name}"
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
