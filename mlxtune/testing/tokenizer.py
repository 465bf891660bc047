"""A small byte-level BPE tokenizer with a ChatML template, built offline.

Random test models need a tokenizer folder like a real model has. This trains
one with the `tokenizers` library on a fixed English corpus (deterministic, a
fraction of a second) and saves tokenizer.json + tokenizer_config.json that
transformers' AutoTokenizer and mlx-lm's loader read as usual.
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, as SmolLM2, Qwen2 and many others use it.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins
with a single step. To be or not to be, that is the question. All that glitters is
not gold. The early bird catches the worm, but the second mouse gets the cheese.
Machine learning models learn patterns from data; fine-tuning adapts a pretrained
model to a new task with a small number of trainable parameters. Low-rank adapters
add two thin matrices to each weight and train only those. The capital of France
is Paris. The capital of Italy is Rome. Water boils at one hundred degrees Celsius
at sea level. The sun rises in the east and sets in the west. Numbers: 0 1 2 3 4 5
6 7 8 9 10 11 12 13 14 15 16 17 18 19 20. Question: what is two plus two? Answer:
four. Translate to French: hello -> bonjour, cat -> chat, dog -> chien, house ->
maison. The user asked a question and the assistant gave a helpful answer.
"""


def build_tokenizer(vocab_size: int = 512):
    """A trained `tokenizers.Tokenizer` of at most vocab_size tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return tokenizer


def write_tokenizer(path: str | Path, vocab_size: int = 512) -> Path:
    """Save tokenizer.json and tokenizer_config.json into the folder `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size)
    if tokenizer.get_vocab_size() > vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.get_vocab_size()} tokens > {vocab_size}")
    tokenizer.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
        "chat_template": CHATML_TEMPLATE,
        "model_max_length": 2048,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return path
