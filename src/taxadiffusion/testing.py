"""Tiny real components that tests and benchmarks build offline: a CLIP tokenizer in the on-disk format CLIP
ships (vocab.json + merges.txt), for random text models that stand in for weights no one can download here."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's byte -> printable-unicode table (GPT-2 byte-level BPE)."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, (chr(c) for c in chars), strict=True))


def write_clip_tokenizer(directory: Path, max_length: int = 16) -> CLIPTokenizer:
    directory.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    merges = [("a", "n"), ("i", "s"), ("e", "s</w>"), ("u", "s</w>")]
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(vocab_list)}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=max_length)
    tokenizer.save_pretrained(directory)
    return tokenizer
