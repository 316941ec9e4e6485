"""Calibration / held-out text: an embedded offline corpus or local files, cut into fixed-length token blocks.

Everything is deterministic (no RNG): the same documents, tokenizer and config give bit-identical tensors and the
same fingerprint, so pruning results and caches keyed on the fingerprint are reproducible.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from allocator.core.config import DataConfig
from allocator.core.errors import UserInputError
from allocator.model import python_docs

log = logging.getLogger(__name__)

KNOWN_NAMES = ("python-docs", "files")
CHUNK_CHARS = 2000  # target size when one large file has to be cut into documents
TEXT_SUFFIXES = (".txt", ".md")
BINARY_UNDECODABLE = 0.1  # a file with more than this fraction of non-UTF-8 bytes is binary (Latin-1 text has ~2%)

class Tokenizer(Protocol):
    eos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def validate_data_config(cfg: DataConfig) -> None:
    """Cheap checks (no reading, no tokenizing) so the CLI fails in one line before loading a model."""
    if cfg.name not in KNOWN_NAMES:
        raise UserInputError(f"data.name={cfg.name!r} is unknown; use one of {', '.join(map(repr, KNOWN_NAMES))}")
    paths = list(cfg.paths or [])
    if cfg.name == "python-docs" and paths:
        raise UserInputError("data.paths is set but data.name='python-docs'; use data.name=files to read local text")
    if cfg.name == "files":
        if not paths:
            raise UserInputError("data.name=files needs data.paths (text files or directories of *.txt / *.md)")
        for p in paths:
            if not Path(p).exists():
                raise FileNotFoundError(f"data.paths entry not found: {p}")
    for key in ("seq_len", "calib_sequences", "eval_sequences"):
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise UserInputError(f"data.{key}={value!r} must be a positive integer")
    if not 0.0 < float(cfg.heldout_fraction) < 1.0:
        raise UserInputError(f"data.heldout_fraction={cfg.heldout_fraction!r} must be strictly between 0 and 1")


@functools.lru_cache(maxsize=1)
def _python_docs() -> tuple[str, ...]:
    """The embedded corpus, read in a fresh interpreter (`python -I -S allocator/model/python_docs.py`) that imports
    nothing but the standard library: packages imported here can patch stdlib objects (importing Ray replaces
    `inspect.isgenerator` with a compiled shim, which dropped a document), and the corpus, hence the data fingerprint
    and every cache keyed on it, must not depend on what this process happened to import first. ~0.2 s, once."""
    done = subprocess.run([sys.executable, "-I", "-S", python_docs.__file__], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"reading the python-docs corpus failed: {done.stderr.strip()[-500:]}")
    return tuple(json.loads(done.stdout))


def _chunk(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """Cut text into ~size-char documents on blank lines (then on lines for huge paragraphs) so it can be split."""
    pieces: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        pieces.extend(para.splitlines() if len(para) > size else [para])
    chunks: list[str] = []
    current = ""
    for piece in filter(str.strip, pieces):
        current = f"{current}\n\n{piece}" if current else piece
        if len(current) >= size:
            chunks.append(current)
            current = ""
    if current:
        chunks.append(current)
    return chunks


def _decode(data: bytes) -> str | None:
    """A file's text, or None for a binary file: one with a NUL byte, or with more than BINARY_UNDECODABLE of its
    bytes not UTF-8. Stray bad bytes in text are replaced (errors="replace"): they should not abort a long run."""
    if b"\x00" in data:
        return None
    text = data.decode("utf-8", errors="replace")
    undecodable = text.count("\ufffd") - data.count("\ufffd".encode("utf-8"))
    return None if undecodable > BINARY_UNDECODABLE * len(data) else text


def _names(files: list[Path], limit: int = 5) -> str:
    shown = ", ".join(map(str, files[:limit]))
    return shown + (f" and {len(files) - limit} more" if len(files) > limit else "")


def _scan_files(paths: list[str]) -> tuple[list[Path], list[str], list[Path], list[Path]]:
    """(files read, their texts, empty files, binary files) of text files and directories of *.txt / *.md."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES))
        else:
            files.append(p)
    texts: list[str] = []
    empty: list[Path] = []
    binary: list[Path] = []
    for f in files:
        text = _decode(f.read_bytes())
        if text is None:
            binary.append(f)
        elif not text.strip():
            empty.append(f)
        else:
            texts.append(text)
    return files, texts, empty, binary


def _read_files(paths: list[str]) -> list[str]:
    files, texts, empty, binary = _scan_files(paths)
    # A single document cannot be split into calibration and held-out parts, so cut it into chunks.
    docs = _chunk(texts[0]) if len(texts) == 1 else texts
    if len(docs) < 2:
        raise UserInputError(_unusable(paths, files, texts, empty, binary))
    if binary:
        log.warning("data.paths: skipped %d binary or non-UTF-8 file(s): %s", len(binary), _names(binary))
    return docs


def _unusable(paths: list[str], files: list[Path], texts: list[str], empty: list[Path], binary: list[Path]) -> str:
    """One line: what the files held, and why that is not enough to split into calibration and held-out text."""
    read = [f"{len(files)} file(s) read"]
    if not files:
        read = [f"no file read (directories are searched for {' / '.join('*' + s for s in TEXT_SUFFIXES)})"]
    if texts:
        read.append(f"{len(texts)} with text ({sum(map(len, texts))} characters)")
    if empty:
        read.append(f"{len(empty)} empty ({_names(empty)})")
    if binary:
        read.append(f"{len(binary)} skipped as binary or not UTF-8 ({_names(binary)})")
    if texts:
        why = (f"one text is cut into documents of ~{CHUNK_CHARS} characters at blank lines and this one makes 1, "
               "but calibration and held-out text need at least 2 documents; add text or files")
    else:
        why = "no text to calibrate on; pass UTF-8 text files (*.txt / *.md) or directories of them"
    return f"data.paths={paths}: {', '.join(read)}: {why}"


def load_documents(cfg: DataConfig) -> list[str]:
    validate_data_config(cfg)
    if cfg.name == "python-docs":
        return list(_python_docs())
    return _read_files(list(cfg.paths))


def _unit_hash(doc: str) -> float:
    return int.from_bytes(hashlib.sha256(doc.encode("utf-8")).digest()[:8], "big") / 2**64


def split_documents(docs: list[str], heldout_fraction: float) -> tuple[list[str], list[str]]:
    """(calibration, held-out). A document's side depends only on its own content, so adding text never moves others."""
    if not 0.0 < heldout_fraction < 1.0:
        raise UserInputError(f"heldout_fraction={heldout_fraction!r} must be strictly between 0 and 1")
    if len(docs) < 2:
        raise UserInputError(f"need at least 2 documents to split into calibration and held-out, got {len(docs)}")
    calib: list[str] = []
    heldout: list[str] = []
    for doc in docs:
        (heldout if _unit_hash(doc) < heldout_fraction else calib).append(doc)
    # Few documents can all hash to one side; both splits must exist, so move one across.
    if not heldout:
        heldout.append(calib.pop())
    elif not calib:
        calib.append(heldout.pop())
    return calib, heldout


def joined_ids(docs: list[str], tokenizer: Tokenizer, need: int | None = None) -> list[int]:
    """The docs' tokens joined by EOS; with `need`, stops once that many are there (the rest would waste seconds
    of a real tokenizer)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserInputError("the tokenizer has no eos_token_id to separate documents")
    ids: list[int] = []
    for i, doc in enumerate(docs):
        if need is not None and len(ids) >= need:
            break
        if i:
            ids.append(eos)
        ids.extend(tokenizer.encode(doc, add_special_tokens=False))
    return ids


def token_blocks(docs: list[str], tokenizer: Tokenizer, seq_len: int, n_blocks: int) -> torch.Tensor:
    """The first n_blocks consecutive seq_len-token windows of the docs joined by EOS; (n_blocks, seq_len) int64."""
    need = seq_len * n_blocks
    ids = joined_ids(docs, tokenizer, need)
    if len(ids) < need:
        raise UserInputError(
            f"text has {len(ids)} tokens but {n_blocks} blocks x {seq_len} tokens = {need} are needed; "
            "lower data.calib_sequences / data.eval_sequences / data.seq_len or add text via data.paths"
        )
    return torch.tensor(ids[:need], dtype=torch.long).view(n_blocks, seq_len)


def text_blocks(paths: list[str], tokenizer: Tokenizer, seq_len: int) -> torch.Tensor:
    """Every whole seq_len-token window of the files' text, documents joined by EOS (the tail shorter than a window
    is left out); (n_blocks, seq_len) int64. Text a user evaluates on is used whole: nothing is split off."""
    for p in paths:
        if not Path(p).exists():
            raise FileNotFoundError(f"data: {p} does not exist")
    files, texts, _, binary = _scan_files(paths)
    if binary:
        log.warning("data: skipped %d binary or non-UTF-8 file(s): %s", len(binary), _names(binary))
    if not texts:
        found = f"{len(files)} file(s) read, none with text" if files else "no *.txt / *.md file found"
        raise UserInputError(f"data={paths}: {found}; pass UTF-8 text files (*.txt / *.md) or directories of them")
    ids = joined_ids(texts, tokenizer)
    n_blocks = len(ids) // seq_len
    if n_blocks == 0:
        raise UserInputError(f"data={paths}: {len(ids)} tokens, fewer than one block of seq_len={seq_len}; "
                             "add text or lower seq_len")
    return torch.tensor(ids[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


def spread_blocks(docs: list[str], tokenizer: Tokenizer, seq_len: int, n_blocks: int, skip_tokens: int = 0) -> torch.Tensor:
    """n_blocks seq_len-token windows spaced evenly over the docs joined by EOS, after the first skip_tokens tokens;
    (n_blocks, seq_len) int64. Consecutive windows cover a handful of documents; spread ones sample all of them."""
    ids = joined_ids(docs, tokenizer)
    stride = (len(ids) - skip_tokens) // n_blocks
    if stride < seq_len:
        raise UserInputError(
            f"text has {max(0, len(ids) - skip_tokens)} tokens after the first {skip_tokens} but {n_blocks} blocks x "
            f"{seq_len} tokens = {n_blocks * seq_len} are needed; lower the block count or data.seq_len, or add text"
        )
    starts = [skip_tokens + i * stride for i in range(n_blocks)]
    return torch.tensor([ids[s : s + seq_len] for s in starts], dtype=torch.long)


# Fixed probes: two tokenizers with equal class name and vocab size but different merges still encode these differently.
_PROBES = ("Hello, world!", "def f(x):\n    return x ** 2  # square", "naïve café – 東京 🙂", "   leading spaces\tand tabs")


def _tokenizer_identity(tokenizer: Any) -> str:
    probes = [list(map(int, tokenizer.encode(p, add_special_tokens=False))) for p in _PROBES]
    size = getattr(tokenizer, "vocab_size", None)
    total = len(tokenizer) if hasattr(tokenizer, "__len__") else size  # len() counts added tokens too
    return f"{type(tokenizer).__name__}|{size}|{total}|{tokenizer.eos_token_id}|{probes}"


@dataclass(frozen=True, eq=False)  # eq=False: == on tensors is elementwise; compare fingerprints instead
class CalibrationData:
    calibration: torch.Tensor  # (calib_sequences, seq_len) int64
    heldout: torch.Tensor  # (eval_sequences, seq_len) int64
    fingerprint: str  # sha256 hex of documents, tokenizer identity and config values
    # (fitness_sequences, seq_len) int64: calibration-side blocks spread over the text after `calibration`.
    # Searchers score candidates on these because the pruned layers were reconstructed on `calibration` itself
    # (on SmolLM2 a 1.5x-speedup model's KL to dense is 30-45% lower there than on unseen text: a fitness on it
    # favours the options whose reconstruction overfits most), and spread because consecutive blocks cover only
    # a few documents (`python -m allocator.benchmarks.fitness_bias` measures both).
    fitness: torch.Tensor | None = None


def build_calibration_data(cfg: DataConfig, tokenizer: Tokenizer, fitness_sequences: int = 0) -> CalibrationData:
    """Calibration and held-out blocks, plus `fitness_sequences` unseen calibration-side blocks (see `fitness`);
    the fingerprint does not depend on those, so databases built on the calibration blocks stay valid."""
    docs = load_documents(cfg)
    calib_docs, heldout_docs = split_documents(docs, cfg.heldout_fraction)
    blocks = {}
    for split, split_docs, n in (("calibration", calib_docs, cfg.calib_sequences),
                                 ("held-out", heldout_docs, cfg.eval_sequences)):
        try:
            blocks[split] = token_blocks(split_docs, tokenizer, cfg.seq_len, n)
        except UserInputError as e:
            raise UserInputError(f"{split} split: {e}") from None  # say which split ran short
    fitness = None
    if fitness_sequences:
        try:
            fitness = spread_blocks(calib_docs, tokenizer, cfg.seq_len, fitness_sequences, cfg.calib_sequences * cfg.seq_len)
        except UserInputError as e:
            raise UserInputError(f"calibration split, fitness.sequences={fitness_sequences}: {e}") from None
    h = hashlib.sha256()
    for doc in docs:
        # Length-prefixed so document boundaries count: ["ab", "c"] and ["a", "bc"] hash differently.
        data = doc.encode("utf-8")
        h.update(len(data).to_bytes(8, "big") + data)
    h.update(_tokenizer_identity(tokenizer).encode("utf-8"))
    # paths are left out on purpose: the same text moved to another directory is the same data.
    h.update(repr((cfg.name, cfg.seq_len, cfg.calib_sequences, cfg.eval_sequences,
                   float(cfg.heldout_fraction))).encode("utf-8"))
    return CalibrationData(blocks["calibration"], blocks["held-out"], h.hexdigest(), fitness)
