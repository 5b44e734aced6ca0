"""Tiny tokenizers built offline: a byte-level BPE CLIP tokenizer and a Unigram T5 tokenizer.

Both are written from a few lines of vocabulary (no download, no SentencePiece model) and survive
``save_pretrained`` / ``from_pretrained``; ``len(tokenizer)`` is the smallest ``vocab_size`` a matching text
encoder may have. The tiny pipelines of :mod:`diffusers_ztsnr.testing.tiny` use them for every text encoder.
"""

from __future__ import annotations

import json
import os
import pathlib
import string
import tempfile

from transformers import CLIPTokenizer, T5TokenizerFast

__all__ = [
    "CLIP_BOS",
    "CLIP_EOS",
    "CLIP_MAX_LENGTH",
    "T5_MAX_LENGTH",
    "build_clip_tokenizer",
    "build_t5_tokenizer",
]

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512

# A handful of merges so that multi-character tokens exist; every merge result is added to the vocab.
_CLIP_MERGES: tuple[str, ...] = (
    "t h",
    "th e</w>",
    "o f</w>",
    "c a",
    "ca t</w>",
    "d o",
    "do g</w>",
    "p h",
    "ph o",
    "o to</w>",
    "t o</w>",
    "pho to</w>",
    "a n",
    "an d</w>",
    "i n</w>",
)

_T5_WORDS: tuple[str, ...] = ("the", "a", "of", "and", "in", "cat", "dog", "photo", "red", "blue")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP reversible byte -> printable unicode symbol table (256 entries)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """The tiny CLIP vocabulary: 256 byte symbols, their ``</w>`` forms, merge results, then BOS/EOS."""
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    for merge in _CLIP_MERGES:
        merged = merge.replace(" ", "")
        if merged not in tokens:
            tokens.append(merged)
    tokens += [CLIP_BOS, CLIP_EOS]
    return {tok: i for i, tok in enumerate(tokens)}, list(_CLIP_MERGES)


def _write_clip_files(directory: pathlib.Path) -> None:
    vocab, merges = _clip_vocab_and_merges()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def build_clip_tokenizer(path_or_none: str | os.PathLike | None = None) -> CLIPTokenizer:
    """Build a tiny byte-level BPE :class:`~transformers.CLIPTokenizer` from locally written files.

    The vocabulary holds the 256 byte-level symbols (GPT-2 ``bytes_to_unicode``), their ``</w>``
    end-of-word forms, the results of a few merges, then ``<|startoftext|>`` (BOS) and ``<|endoftext|>``
    (EOS, also PAD and UNK, as in the released SD tokenizers); ``model_max_length`` is 77. Any text can
    be encoded (byte fallback), so no token is ever unknown.

    Args:
        path_or_none: directory to write ``vocab.json`` and ``merges.txt`` into (created if needed) and
            load the tokenizer from. ``None`` uses a temporary directory that is removed afterwards.

    Returns:
        The tokenizer; ``len(tokenizer)`` is the minimum ``vocab_size`` of a matching text encoder.
    """
    if path_or_none is None:
        with tempfile.TemporaryDirectory() as tmp:
            return build_clip_tokenizer(tmp)
    directory = pathlib.Path(path_or_none)
    _write_clip_files(directory)
    return CLIPTokenizer.from_pretrained(
        str(directory),
        model_max_length=CLIP_MAX_LENGTH,
        bos_token=CLIP_BOS,
        eos_token=CLIP_EOS,
        pad_token=CLIP_EOS,
        unk_token=CLIP_EOS,
    )


def _t5_pieces() -> list[tuple[str, float]]:
    """Unigram pieces in T5 order: ``<pad>``=0, ``</s>``=1, ``<unk>``=2, then the regular vocabulary."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -2.0 - 0.1 * i) for i, w in enumerate(_T5_WORDS)]
    pieces += [("\u2581" + c, -4.0) for c in string.ascii_lowercase]
    pieces += [(c, -6.0) for c in string.ascii_letters + string.digits + string.punctuation]
    return pieces


def build_t5_tokenizer(path_or_none: str | os.PathLike | None = None) -> T5TokenizerFast:
    """Build a tiny Unigram :class:`~transformers.T5TokenizerFast` (no SentencePiece model needed).

    The vocabulary follows T5's layout (``<pad>``=0, ``</s>``=1, ``<unk>``=2) with the space marker, a
    few whole words and the printable ASCII characters; characters outside it map to ``<unk>``. It is
    built with ``extra_ids=0`` (no ``<extra_id_*>`` sentinels) through the same constructor that
    ``from_pretrained`` uses to rebuild it from ``tokenizer.json``, so a save / reload round trip
    encodes identically. ``model_max_length`` is 512.

    Args:
        path_or_none: if given, the tokenizer is saved there (``save_pretrained``) and the returned
            tokenizer is the one loaded back from that directory.

    Returns:
        The tokenizer; ``len(tokenizer)`` is the minimum ``vocab_size`` of a matching T5 encoder.
    """
    tokenizer = T5TokenizerFast(vocab=_t5_pieces(), extra_ids=0, model_max_length=T5_MAX_LENGTH)
    if path_or_none is None:
        return tokenizer
    directory = pathlib.Path(path_or_none)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
    return T5TokenizerFast.from_pretrained(str(directory))
