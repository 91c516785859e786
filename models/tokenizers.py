"""Tokenizers built locally (no hub): byte-level BPE for CLIP, Unigram for T5."""

import string

from transformers import CLIPTokenizer, T5TokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512


def build_clip_tokenizer() -> CLIPTokenizer:
    """Byte-level BPE over the 256 byte symbols and their `</w>` forms, no merges."""
    symbols = list(bytes_to_unicode().values())
    pieces = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {piece: index for index, piece in enumerate(pieces)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)


def build_t5_tokenizer(words: tuple[str, ...] = (), max_length: int = T5_MAX_LENGTH) -> T5TokenizerFast:
    """Unigram over printable ASCII, each character with and without the word-start mark; `words` are whole
    pieces (one token each), and `max_length` the T5 tokens the model reads."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for char in string.printable.strip():
        pieces += [(char, -5.0), ("▁" + char, -4.0)]
    pieces += [("▁" + word, -1.0) for word in words]
    return T5TokenizerFast(vocab=pieces, model_max_length=max_length)
