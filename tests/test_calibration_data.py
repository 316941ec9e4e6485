"""Text data layer: embedded corpus, hash split, token blocks, files mode, fingerprint."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from allocator.core.config import DataConfig
from allocator.core.errors import UserInputError
from allocator.model.byte_tokenizer import MARKER_FILE, ByteTokenizer
from allocator.model.calibration_data import (
    build_calibration_data,
    load_documents,
    split_documents,
    spread_blocks,
    token_blocks,
    validate_data_config,
)

TOK = ByteTokenizer()


def _write_docs(root: Path, n: int, words: int = 300) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        f = root / f"doc{i:02d}.txt"
        f.write_text(" ".join(f"word{i}_{j}" for j in range(words)))
        files.append(f)
    return files


def test_python_docs_corpus_large_and_deterministic():
    docs = load_documents(DataConfig())
    assert sum(len(d.split()) for d in docs) > 100_000
    assert all(len(d) >= 200 for d in docs)
    assert load_documents(DataConfig()) == docs
    # The returned list is a copy: mutating it must not corrupt the cached corpus.
    docs.clear()
    assert load_documents(DataConfig())


def test_python_docs_corpus_does_not_depend_on_what_the_process_imported():
    """Importing Ray replaces inspect.isgenerator with a compiled shim; read in this process, the corpus lost a
    document and the data fingerprint changed. It is read in a fresh interpreter, so the corpus is the same."""
    import inspect

    from allocator.model import calibration_data, python_docs

    before = calibration_data._python_docs()
    pytest.importorskip("ray")  # the real patch (ray is in the test extra)
    assert getattr(inspect.isgenerator, "__module__", None) != "inspect"
    in_process = python_docs.collect()
    calibration_data._python_docs.cache_clear()
    assert calibration_data._python_docs() == before
    assert len(in_process) == len(before) - 1  # what reading it here would have given


def test_split_deterministic_disjoint_and_fraction():
    docs = [f"document number {i} " * 20 for i in range(1000)]
    calib, held = split_documents(docs, 0.2)
    assert (calib, held) == split_documents(list(docs), 0.2)
    assert set(calib).isdisjoint(held) and len(calib) + len(held) == len(docs)
    assert 0.15 < len(held) / len(docs) < 0.25
    # Adding a document never moves the others.
    calib2, held2 = split_documents(docs + ["a brand new document " * 20], 0.2)
    assert set(calib) <= set(calib2) and set(held) <= set(held2)


def test_split_small_inputs_and_bad_fraction():
    calib, held = split_documents(["alpha text", "beta text"], 0.01)
    assert len(calib) == 1 and len(held) == 1
    with pytest.raises(ValueError, match="at least 2"):
        split_documents(["only one"], 0.2)
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="between 0 and 1"):
            split_documents(["a", "b"], bad)


def test_token_blocks_shape_and_eos_separators():
    blocks = token_blocks(["ab", "cde", "f"], TOK, seq_len=4, n_blocks=2)
    assert blocks.dtype == torch.long and blocks.shape == (2, 4)
    eos = TOK.eos_token_id
    assert blocks.flatten().tolist() == [97, 98, eos, 99, 100, 101, eos, 102]
    # Only whole blocks from the start: a smaller request is a prefix of a larger one.
    assert torch.equal(token_blocks(["ab", "cde", "f"], TOK, 2, 3), blocks.flatten()[:6].view(3, 2))


def test_token_blocks_too_few_tokens_message():
    with pytest.raises(ValueError) as err:
        token_blocks(["abc", "de"], TOK, seq_len=4, n_blocks=3)
    msg = str(err.value)
    assert "6 tokens" in msg and "12" in msg and "data.seq_len" in msg and "data.calib_sequences" in msg


def test_build_python_docs():
    cfg = DataConfig(seq_len=64, calib_sequences=8, eval_sequences=4)
    data = build_calibration_data(cfg, TOK)
    assert data.calibration.shape == (8, 64) and data.heldout.shape == (4, 64)
    assert int(data.calibration.max()) < TOK.vocab_size and int(data.calibration.min()) >= 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        data.fingerprint = "x"  # type: ignore[misc]


def test_files_mode_directory(tmp_path):
    _write_docs(tmp_path / "corpus" / "sub", 10)
    (tmp_path / "corpus" / "ignored.bin").write_bytes(b"\x00" * 100)
    (tmp_path / "corpus" / "notes.md").write_text("markdown text " * 50)
    cfg = DataConfig(name="files", paths=[str(tmp_path / "corpus")], seq_len=32, calib_sequences=4, eval_sequences=2)
    docs = load_documents(cfg)
    assert len(docs) == 11 and not any("\x00" in d for d in docs)
    data = build_calibration_data(cfg, TOK)
    assert data.calibration.shape == (4, 32) and data.heldout.shape == (2, 32)


def test_files_mode_single_large_file_is_chunked(tmp_path):
    f = tmp_path / "big.txt"
    f.write_text("\n\n".join(f"paragraph {i} " + "lorem ipsum " * 30 for i in range(100)))
    docs = load_documents(DataConfig(name="files", paths=[str(f)]))
    assert len(docs) > 10 and all(len(d) < 3000 for d in docs)
    calib, held = split_documents(docs, 0.2)
    assert calib and held


def test_missing_path_and_empty_files(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_documents(DataConfig(name="files", paths=[str(missing)]))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty.txt"):
        load_documents(DataConfig(name="files", paths=[str(tmp_path / "empty.txt")]))


@pytest.mark.parametrize(
    "cfg, match",
    [
        (DataConfig(name="wikitext"), "python-docs.*files"),
        (DataConfig(paths=["x.txt"]), "name=files"),
        (DataConfig(name="files"), "data.paths"),
        (DataConfig(heldout_fraction=0.0), "heldout_fraction"),
        (DataConfig(heldout_fraction=1.0), "heldout_fraction"),
        (DataConfig(seq_len=0), "seq_len"),
        (DataConfig(calib_sequences=-1), "calib_sequences"),
    ],
)
def test_validate_rejects_bad_config(cfg, match):
    with pytest.raises(ValueError, match=match):
        validate_data_config(cfg)


def test_build_too_few_tokens_names_split(tmp_path):
    _write_docs(tmp_path, 4, words=20)
    cfg = DataConfig(name="files", paths=[str(tmp_path)], seq_len=256, calib_sequences=100)
    with pytest.raises(ValueError, match="calibration split.*data.calib_sequences"):
        build_calibration_data(cfg, TOK)


def test_fingerprint_tracks_text_and_config(tmp_path):
    files = _write_docs(tmp_path, 6, words=200)
    cfg = DataConfig(name="files", paths=[str(tmp_path)], seq_len=32, calib_sequences=2, eval_sequences=1)
    base = build_calibration_data(cfg, TOK).fingerprint
    assert build_calibration_data(dataclasses.replace(cfg), TOK).fingerprint == base
    assert build_calibration_data(dataclasses.replace(cfg, seq_len=16), TOK).fingerprint != base
    files[0].write_text(files[0].read_text() + " extra")
    assert build_calibration_data(cfg, TOK).fingerprint != base


def test_byte_tokenizer_roundtrip_and_save(tmp_path):
    text = "naïve – 東京"
    ids = TOK.encode(text, add_special_tokens=False)
    assert max(ids) < 256 and TOK.decode(ids + [TOK.eos_token_id]) == text
    assert TOK.decode(torch.tensor(ids)) == text
    assert len(TOK) == TOK.vocab_size == 257 and TOK.eos_token_id == 256
    TOK.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / MARKER_FILE).is_file()
    assert ByteTokenizer.from_pretrained(tmp_path / "model").vocab_size == 257
    with pytest.raises(FileNotFoundError):
        ByteTokenizer.from_pretrained(tmp_path)


def test_spread_blocks_sample_evenly_after_the_skipped_tokens():
    docs = [chr(97 + i) * 99 for i in range(10)]  # 10 x 99 bytes joined by 9 EOS: 999 tokens
    stream = token_blocks(docs, TOK, seq_len=999, n_blocks=1)[0]
    blocks = spread_blocks(docs, TOK, seq_len=10, n_blocks=5, skip_tokens=200)
    stride = (999 - 200) // 5
    assert torch.equal(blocks, torch.stack([stream[200 + i * stride : 210 + i * stride] for i in range(5)]))
    with pytest.raises(ValueError, match=r"799 tokens after the first 200 but 100 blocks x 10 tokens = 1000"):
        spread_blocks(docs, TOK, seq_len=10, n_blocks=100, skip_tokens=200)


def test_fitness_sequences_are_spread_after_the_calibration_blocks_without_changing_them():
    cfg = DataConfig(seq_len=64, calib_sequences=8, eval_sequences=4)
    plain = build_calibration_data(cfg, TOK)
    with_pool = build_calibration_data(cfg, TOK, fitness_sequences=5)
    assert plain.fitness is None
    # The database's blocks and key are unchanged; the pool starts where they end and spreads over the rest.
    assert torch.equal(with_pool.calibration, plain.calibration) and with_pool.fingerprint == plain.fingerprint
    next_block = build_calibration_data(dataclasses.replace(cfg, calib_sequences=9), TOK).calibration[8]
    assert with_pool.fitness.shape == (5, 64) and torch.equal(with_pool.fitness[0], next_block)
    assert not any(torch.equal(f, c) for f in with_pool.fitness for c in plain.calibration)
    far = build_calibration_data(dataclasses.replace(cfg, calib_sequences=40), TOK).calibration
    assert not any(torch.equal(with_pool.fitness[1], c) for c in far)  # the second one lies far beyond


def test_too_few_tokens_for_the_fitness_pool_names_it(tmp_path):
    _write_docs(tmp_path, 6, words=200)
    cfg = DataConfig(name="files", paths=[str(tmp_path)], seq_len=64, calib_sequences=4, eval_sequences=1)
    build_calibration_data(cfg, TOK)
    with pytest.raises(ValueError, match=r"calibration split, fitness.sequences=1000: text has"):
        build_calibration_data(cfg, TOK, fitness_sequences=1000)


def test_unusable_files_say_what_was_read_and_why(tmp_path, caplog):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 40)  # NUL bytes: binary, whatever its suffix
    short = tmp_path / "short.txt"
    short.write_text("one paragraph, far under one ~2000-character document " * 5)
    (tmp_path / "empty.txt").write_text("\n \n")
    noise = tmp_path / "noise.txt"
    noise.write_bytes(bytes(range(128, 256)) * 40)  # no NUL, but not UTF-8
    cases = {
        (binary,): ["1 file(s) read", "1 skipped as binary or not UTF-8", str(binary), "no text to calibrate on"],
        (noise,): ["1 skipped as binary or not UTF-8", str(noise), "no text to calibrate on"],
        (short,): ["1 with text (270 characters)", "this one makes 1", "at least 2 documents"],
        (binary, short, tmp_path / "empty.txt"): [
            "3 file(s) read", "1 with text (270 characters)", "1 empty", "empty.txt", "1 skipped as binary", str(binary),
            "at least 2 documents",
        ],
        (tmp_path / "sub",): ["no file read (directories are searched for *.txt / *.md)", "no text to calibrate on"],
    }
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "data.bin").write_bytes(b"\x00" * 10)
    for paths, parts in cases.items():
        with pytest.raises(UserInputError) as err:
            load_documents(DataConfig(name="files", paths=[str(p) for p in paths]))
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith(f"data.paths={[str(p) for p in paths]}: ")
        for part in parts:
            assert part in msg, (part, msg)
    # Enough text beside a binary file: it is used, and the skipped file is named in a warning.
    (tmp_path / "more.txt").write_text("another document " * 20)
    with caplog.at_level("WARNING"):
        docs = load_documents(DataConfig(name="files", paths=[str(binary), str(short), str(tmp_path / "more.txt")]))
    assert len(docs) == 2 and f"skipped 1 binary or non-UTF-8 file(s): {binary}" in caplog.text
