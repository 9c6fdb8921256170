"""Tiny, fully offline models and data: a small Llama built from a config, a tokenizer trained locally, and a
synthetic arithmetic task. Used by the demo, the examples, the tests and the benchmarks; nothing is downloaded."""

from __future__ import annotations

import random

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


def train_tokenizer(texts: list[str], vocab_size: int = 96, words: bool = False) -> PreTrainedTokenizerFast:
    """A byte-pair-encoding tokenizer trained on `texts` (characters first, then merges up to `vocab_size`). With
    `words`, merges stay inside words and numbers are split into digits, as in Llama's tokenizer: a space becomes "▁"
    at the start of the next word (SentencePiece's convention), so that a prompt ending before a space never merges
    with its answer, and every digit is a token of its own, which makes arithmetic learnable."""
    if not texts:
        raise ValueError("train_tokenizer needs at least one text to learn a vocabulary from.")
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.decoder = decoders.BPEDecoder()
    if words:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Metaspace(prepend_scheme="never"), pre_tokenizers.Digits(individual_digits=True)]
        )
        tokenizer.decoder = decoders.Metaspace(prepend_scheme="never")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_llama(
    vocab_size: int = 96,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    seed: int = 0,
    **config_kwargs,
) -> LlamaForCausalLM:
    """A randomly initialised Llama with the given sizes (deterministic for a given `seed`), in float32."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **config_kwargs,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).float().eval()


def arithmetic_problems(n: int, seed: int = 0, max_operand: int = 49) -> list[dict[str, str]]:
    """`n` problems `{"prompt": "Q:a+b=?A:", "completion": "c"}` with a, b drawn from 0..max_operand."""
    rng = random.Random(seed)
    problems = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        problems.append({"prompt": f"Q:{a}+{b}=?A:", "completion": f"{a + b}"})
    return problems
