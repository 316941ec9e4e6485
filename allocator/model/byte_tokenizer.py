"""A dependency-free byte-level tokenizer, so tests can run tiny random models without downloading a vocabulary."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

# Written by save_pretrained; a model directory holding it is reloaded with ByteTokenizer instead of AutoTokenizer.
MARKER_FILE = "byte_tokenizer.json"
EOS_TOKEN = "<eos>"  # EOS's name in the transformers version (to_transformers)


class ByteTokenizer:
    """UTF-8 bytes 0..255 are the tokens; 256 is EOS (the document separator). The ids never depend on any file."""

    vocab_size: int = 257
    eos_token_id: int = 256
    # No BOS/PAD: calibration blocks are plain token windows, and HF code checks these attributes for None.
    bos_token_id = None
    pad_token_id = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        # add_special_tokens is accepted for HF signature compatibility; bytes never need a BOS here.
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        # int() so torch tensors work; EOS has no byte, so it is dropped either way; a cut multi-byte char becomes U+FFFD.
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"

    def save_pretrained(self, path: str | Path) -> None:
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        (out / MARKER_FILE).write_text(json.dumps({"type": "byte", "vocab_size": self.vocab_size}) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ByteTokenizer:
        marker = Path(path) / MARKER_FILE
        if not marker.is_file():
            raise FileNotFoundError(f"no {MARKER_FILE} in {path}: not a saved ByteTokenizer")
        meta = json.loads(marker.read_text())
        if meta.get("type") != "byte" or meta.get("vocab_size") != cls.vocab_size:
            raise ValueError(f"{marker}: expected type 'byte' with vocab_size {cls.vocab_size}, got {meta}")
        return cls()

    def to_transformers(self):
        """The same tokenizer as a transformers `PreTrainedTokenizerFast` (byte b is token b, EOS 256, also the pad
        token), for libraries that accept only those, such as lm-eval's HFLM. Special tokens are not parsed out
        of text (`split_special_tokens`), so every text encodes to exactly `encode`'s ids."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        chars = bytes_to_unicode()  # byte -> the printable character byte-level BPE names it by
        vocab = {chars[b]: b for b in range(256)} | {EOS_TOKEN: self.eos_token_id}
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per byte
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tokenizer.decoder = decoders.ByteLevel()
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                                       split_special_tokens=True)
