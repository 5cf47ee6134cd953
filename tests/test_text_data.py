"""Text corpora: registry, prepare (char and SentencePiece), load, LM batching, metrics.

Every test writes its own tiny corpus; the real mirror is never read.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from optlab.data import (
    DATASETS,
    MIRROR_ENV,
    ChecksumWarning,
    DatasetMissingError,
    DatasetSpec,
    RawFile,
    UnverifiedWarning,
    dataset_names,
    fetch,
    text_dataset_names,
)
from optlab.data import text as textmod
from optlab.data.text import (
    SentencePieceTokenizer,
    bits_per_byte,
    bits_per_char,
    lm_batch,
    lm_eval_batches,
    lm_offsets,
    load_text,
    load_tokenizer,
    perplexity,
    prepare_text,
    sentencepiece_options,
    train_sentencepiece,
)


@pytest.fixture(autouse=True)
def _no_env_mirror(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MIRROR_ENV, raising=False)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def shakespeare_like(text: str, mirror: Path, *, md5_value: str | None | bool = True) -> DatasetSpec:
    """The tinyshakespeare spec with ``text`` as its one raw file, placed in ``mirror/tinyshakespeare``."""
    data = text.encode("utf-8")
    (mirror / "tinyshakespeare").mkdir(parents=True, exist_ok=True)
    (mirror / "tinyshakespeare" / "input.txt").write_bytes(data)
    checksum = md5(data) if md5_value is True else md5_value
    return replace(DATASETS["tinyshakespeare"], files=(RawFile("input.txt", checksum, "text"),), base_url=None)


TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak. Zoë 日本 ✓\n" * 7


# ---------------------------------------------------------------- registry


def test_registry_text_entries() -> None:
    ts, st = DATASETS["tinyshakespeare"], DATASETS["tinystories"]
    assert ts.kind == st.kind == "text"
    assert ts.files[0].md5 == "6fb458f1232090904fb40fe944165e91"
    assert ts.url("input.txt") == (
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
    )
    assert st.url(st.file("train").name) == (
        "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-train.txt"
    )
    assert st.url(st.file("test").name).endswith("/TinyStoriesV2-GPT4-valid.txt")
    assert [f.md5 for f in st.files] == [None, None]
    assert (ts.subdir, st.subdir) == ("tinyshakespeare", "TinyStories")
    assert text_dataset_names() == ["tinyshakespeare", "tinystories"]
    assert not set(text_dataset_names()) & set(dataset_names())
    with pytest.raises(ValueError, match="not a text corpus"):
        prepare_text("mnist", "raw", "out.pt")


# ---------------------------------------------------------------- char level


def test_char_prepare_roundtrip_contiguous_splits(tmp_path: Path) -> None:
    spec = shakespeare_like(TEXT, tmp_path / "mirror")
    out = tmp_path / "prep" / "ts.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a verified file: no warning
        meta = prepare_text(spec, tmp_path / "raw", out, mirror=tmp_path / "mirror", download=False,
                            val_fraction=0.2, test_fraction=0.1)
    d = load_text(out)
    tok = load_tokenizer(out)
    n = len(TEXT)
    assert meta["vocab"] == "".join(sorted(set(TEXT))) and meta["vocab_size"] == len(set(TEXT))
    assert meta["n_tokens"] == {"train": n - round(0.2 * n) - round(0.1 * n), "val": round(0.2 * n), "test": round(0.1 * n)}
    assert sum(meta["n_tokens"].values()) == n
    stream = torch.cat([d.train, d.val, d.test])
    assert tok.decode(stream) == TEXT  # contiguous, in order, lossless
    assert d.train.dtype == torch.int32 and d.meta["kind"] == "lm"
    # per-split texts and their UTF-8 byte counts are exact
    a, b = meta["n_tokens"]["train"], meta["n_tokens"]["train"] + meta["n_tokens"]["val"]
    for s, piece in (("train", TEXT[:a]), ("val", TEXT[a:b]), ("test", TEXT[b:])):
        assert tok.decode(getattr(d, s)) == piece
        assert meta["n_bytes"][s] == len(piece.encode("utf-8"))
    assert sum(meta["n_bytes"].values()) == len(TEXT.encode("utf-8"))
    assert meta["md5"] == {"input.txt": md5(TEXT.encode())} and meta["md5_verified"] == {"input.txt": True}
    assert tok.encode(TEXT[:40]) == d.train[:40].tolist()


def test_char_max_bytes_cuts_at_a_character_boundary(tmp_path: Path) -> None:
    text = "aé" * 50  # 'é' is two bytes
    spec = shakespeare_like(text, tmp_path / "m")
    out = tmp_path / "t.pt"
    meta = prepare_text(spec, tmp_path / "raw", out, mirror=tmp_path / "m", max_bytes=11, download=False)
    tok = load_tokenizer(out)
    d = load_text(out)
    # 3 bytes per "aé": the 11th byte is the first half of an 'é', which is dropped
    assert tok.decode(torch.cat([d.train, d.val, d.test])) == "aéaéaéa"
    assert sum(meta["n_bytes"].values()) == 10
    assert meta["md5"]["input.txt"] == md5(text.encode())  # of the whole raw file


def test_prepare_validates_arguments(tmp_path: Path) -> None:
    spec = shakespeare_like(TEXT, tmp_path / "m")
    kw = dict(mirror=tmp_path / "m", download=False)
    with pytest.raises(ValueError, match="tokenizer: unknown 'bpe'"):
        prepare_text(spec, tmp_path / "raw", tmp_path / "o.pt", tokenizer="bpe", **kw)
    with pytest.raises(ValueError, match="vocab_size: only for tokenizer='sentencepiece'"):
        prepare_text(spec, tmp_path / "raw", tmp_path / "o.pt", vocab_size=100, **kw)
    with pytest.raises(ValueError, match="val_fraction \\+ test_fraction"):
        prepare_text(spec, tmp_path / "raw", tmp_path / "o.pt", val_fraction=0.6, test_fraction=0.5, **kw)
    with pytest.raises(ValueError, match="max_bytes"):
        prepare_text(spec, tmp_path / "raw", tmp_path / "o.pt", max_bytes=0, **kw)
    assert not (tmp_path / "o.pt").exists()


# ---------------------------------------------------------------- checksums and the mirror


def test_md5_mismatch_in_mirror_is_skipped(tmp_path: Path) -> None:
    good = TEXT.encode()
    mirror = tmp_path / "mirror"
    spec = shakespeare_like(TEXT, mirror)
    (mirror / "tinyshakespeare" / "input.txt").write_bytes(good[:-1] + b"X")  # corrupt subdir copy
    with pytest.warns(ChecksumWarning, match="mirror file .*tinyshakespeare/input.txt"):
        with pytest.raises(DatasetMissingError, match="no copy of input.txt with MD5"):
            prepare_text(spec, tmp_path / "raw", tmp_path / "o.pt", mirror=mirror, download=False)
    assert not (tmp_path / "o.pt").exists()
    (mirror / "input.txt").write_bytes(good)  # a good copy in the flat layout is used
    with pytest.warns(ChecksumWarning):
        meta = prepare_text(spec, tmp_path / "raw", tmp_path / "o.pt", mirror=mirror, download=False)
    assert meta["md5"] == {"input.txt": md5(good)}
    assert (tmp_path / "raw" / "input.txt").read_bytes() == good


def test_env_mirror_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = shakespeare_like(TEXT, tmp_path / "envm")
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "envm"))
    meta = prepare_text(spec, tmp_path / "raw", tmp_path / "o.pt", download=False)
    assert meta["n_tokens"]["train"] > 0


def test_no_published_md5_records_it_and_warns(tmp_path: Path) -> None:
    """md5=None: mirror copy, local copy and download are all accepted with an UnverifiedWarning."""
    data = TEXT.encode()
    spec = shakespeare_like(TEXT, tmp_path / "m", md5_value=None)
    with pytest.warns(UnverifiedWarning, match=f"could not be verified.*MD5 {md5(data)}"):
        meta = prepare_text(spec, tmp_path / "raw", tmp_path / "o.pt", mirror=tmp_path / "m", download=False)
    assert meta["md5"] == {"input.txt": md5(data)} and meta["md5_verified"] == {"input.txt": False}
    assert load_text(tmp_path / "o.pt").meta["md5"] == {"input.txt": md5(data)}
    with pytest.warns(UnverifiedWarning, match="could not be verified"):  # the local copy now
        fetch(spec, tmp_path / "raw", None, download=False)
    www = tmp_path / "www"
    www.mkdir()
    (www / "input.txt").write_bytes(data)
    with pytest.warns(UnverifiedWarning, match="could not be verified"):
        fetch(spec, tmp_path / "raw2", None, base_url=www.as_uri() + "/", progress=False)
    assert (tmp_path / "raw2" / "input.txt").read_bytes() == data
    with pytest.raises(DatasetMissingError, match="no copy of input.txt found"):
        fetch(spec, tmp_path / "raw3", None, download=False)


def test_official_test_file_tinystories_layout(tmp_path: Path) -> None:
    """A corpus with an official held-out file: it is the test split; val is carved from train's end."""
    train_text = "Once upon a time there was a cat.\n<|endoftext|>\n" * 30
    valid_text = "The dog ran home.\n<|endoftext|>\n" * 5
    mirror = tmp_path / "m"
    (mirror / "TinyStories").mkdir(parents=True)
    (mirror / "TinyStories" / "TinyStoriesV2-GPT4-train.txt").write_text(train_text)
    (mirror / "TinyStories" / "TinyStoriesV2-GPT4-valid.txt").write_text(valid_text)
    spec = DATASETS["tinystories"]
    out = tmp_path / "ts.pt"
    with pytest.warns(UnverifiedWarning):
        meta = prepare_text(spec, tmp_path / "raw", out, mirror=mirror, download=False, val_fraction=0.1,
                            tokenizer="char")
    d, tok = load_text(out), load_tokenizer(out)
    assert tok.decode(d.test) == valid_text
    assert tok.decode(torch.cat([d.train, d.val])) == train_text
    assert meta["n_tokens"]["val"] == round(0.1 * len(train_text))
    assert meta["test_split"] == "official" and meta["test_fraction"] is None
    assert set(meta["md5"]) == {"TinyStoriesV2-GPT4-train.txt", "TinyStoriesV2-GPT4-valid.txt"}
    # SentencePiece, TinyStories' own tokenizer (what `prepare` uses: no tokenizer given):
    # "<|endoftext|>" is one fixed piece for this corpus
    assert spec.tokenizer == "sentencepiece" and DATASETS["tinyshakespeare"].tokenizer == "char"
    out_sp = tmp_path / "ts_sp.pt"
    with pytest.warns(UnverifiedWarning):
        meta_sp = prepare_text(spec, tmp_path / "raw", out_sp, mirror=mirror, download=False, vocab_size=300)
    assert meta_sp["tokenizer"] == "sentencepiece" and meta_sp["vocab_size"] == 300
    sp = load_tokenizer(out_sp)
    assert "<|endoftext|>" in sp.pieces("x<|endoftext|>y")
    assert sp.decode(load_text(out_sp).test) == valid_text


# ---------------------------------------------------------------- SentencePiece


def _sp_corpus() -> tuple[str, str, str]:
    """Train/val/test texts; the test text's word 'quizzaxqu' uses letters absent from train and val."""
    train = "".join(
        f"the {a} {b} sat on the {c} mat and then it {d} away.\n"
        for a, b, c, d in zip(["big", "small", "red", "old"] * 30, ["cat", "dog", "bird"] * 40,
                              ["green", "blue", "warm"] * 40, ["ran", "went", "hopped", "looked"] * 30)
    )
    val = "the old dog sat on the warm mat.\n" * 8
    test = "quizzaxqu quizzaxqu quizzaxqu.\n" * 12
    return train, val, test


def test_sentencepiece_trained_on_train_split_only(tmp_path: Path) -> None:
    train, val, test = _sp_corpus()
    text = train + val + test
    n = len(text)
    spec = shakespeare_like(text, tmp_path / "m")
    out = tmp_path / "sp.pt"
    meta = prepare_text(spec, tmp_path / "raw", out, mirror=tmp_path / "m", download=False,
                        tokenizer="sentencepiece", vocab_size=320,
                        val_fraction=len(val) / n, test_fraction=len(test) / n)
    d, tok = load_text(out), load_tokenizer(out)
    assert isinstance(tok, SentencePieceTokenizer) and meta["vocab_size"] == 320
    assert Path(meta["sp_model_path"]) == (tmp_path / "sp.model").resolve()
    assert (tmp_path / "sp.model").read_bytes() == tok.model_proto
    assert meta["n_chars"] == {"train": len(train), "val": len(val), "test": len(test)}
    for s, piece in (("train", train), ("val", val), ("test", test)):
        assert tok.decode(getattr(d, s)) == piece
        assert meta["n_bytes"][s] == len(piece.encode())
    # the stream is contiguous: the splits concatenated are the encoding of the whole text
    assert torch.cat([d.train, d.val, d.test]).tolist() == tok.encode(text)
    # the trainer never saw the test text: its letters q, z, x are not in any piece,
    # so they fall back to bytes and the frequent test word is many pieces
    pieces = [tok.sp.id_to_piece(i) for i in range(tok.vocab_size)]
    assert not any(c in p for p in pieces for c in "qzx" if not p.startswith("<0x"))
    assert len(tok.pieces("quizzaxqu")) > 5
    assert "<0x71>" in tok.pieces("q")  # 'q' is byte 0x71
    # control: the same trainer on the whole text has q, z, x pieces and merges the word (the check can fail)
    opts = sentencepiece_options(320, "bpe")
    leaked = SentencePieceTokenizer(train_sentencepiece(text, opts, seed=0))
    leaked_pieces = [leaked.sp.id_to_piece(i) for i in range(leaked.vocab_size)]
    assert any(c in p for p in leaked_pieces for c in "qzx" if not p.startswith("<0x"))
    assert len(leaked.pieces("quizzaxqu")) < len(tok.pieces("quizzaxqu"))


def _varied_corpus(n_lines: int = 400) -> str:
    g = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", "kappa", "lambda", "sigma", "omega", "theta", "zeta",
             "river", "stone", "light", "night", "garden", "window", "silver", "mountain"]
    lines = []
    for _ in range(n_lines):
        k = int(torch.randint(3, 9, (1,), generator=g))
        lines.append(" ".join(words[int(i)] for i in torch.randint(0, len(words), (k,), generator=g)) + ".\n")
    return "".join(lines)


_PREPARE_IN_SUBPROCESS = """
import sys
from pathlib import Path
from dataclasses import replace
from optlab.data import DATASETS, RawFile
from optlab.data.text import prepare_text
spec = replace(DATASETS["tinyshakespeare"], files=(RawFile("input.txt", sys.argv[1], "text"),), base_url=None)
prepare_text(spec, sys.argv[2], sys.argv[3], mirror=sys.argv[4], download=False, tokenizer="sentencepiece",
             vocab_size=300, sp_max_sentences=150, seed=3)
"""


def test_sentencepiece_is_deterministic_across_processes(tmp_path: Path) -> None:
    """Same seed -> same model and tokens, also in a fresh process; another seed samples other lines."""
    import subprocess
    import sys

    text = _varied_corpus()
    spec = shakespeare_like(text, tmp_path / "m")
    kw = dict(mirror=tmp_path / "m", download=False, tokenizer="sentencepiece", vocab_size=300,
              sp_max_sentences=150)  # 150 of ~340 train lines, sampled with the seed
    prepare_text(spec, tmp_path / "raw", tmp_path / "a.pt", seed=3, **kw)
    subprocess.run([sys.executable, "-c", _PREPARE_IN_SUBPROCESS, spec.files[0].md5, str(tmp_path / "raw"),
                    str(tmp_path / "b.pt"), str(tmp_path / "m")], check=True)
    prepare_text(spec, tmp_path / "raw", tmp_path / "c.pt", seed=4, **kw)
    a, b = load_text(tmp_path / "a.pt"), load_text(tmp_path / "b.pt")
    for s in ("train", "val", "test"):
        assert torch.equal(getattr(a, s), getattr(b, s))
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert (tmp_path / "a.model").read_bytes() != (tmp_path / "c.model").read_bytes()


def test_sentencepiece_chunked_encoding_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = _varied_corpus(100) + "\n\n  odd   spacing \u00e9\u65e5\n" + "no newline at the end"
    tok = SentencePieceTokenizer(train_sentencepiece(text, sentencepiece_options(300, "bpe"), seed=0))
    whole = tok.sp.encode(text)
    monkeypatch.setattr(textmod, "_CHUNK_CHARS", 50)  # many newline-aligned chunks, encoded in parallel
    chunked = tok.encode_array(text, num_threads=2)
    assert chunked.tolist() == whole
    assert tok.decode(chunked) == text


def test_sentencepiece_vocab_too_large_is_a_clear_error(tmp_path: Path) -> None:
    spec = shakespeare_like("ab ab ab\n" * 20, tmp_path / "m")
    with pytest.raises(ValueError, match="sentencepiece training failed with vocab_size=5000"):
        prepare_text(spec, tmp_path / "raw", tmp_path / "o.pt", mirror=tmp_path / "m", download=False,
                     tokenizer="sentencepiece", vocab_size=5000)


# ---------------------------------------------------------------- load


def test_load_text_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetMissingError, match="prepared dataset not found"):
        load_text(tmp_path / "missing.pt")
    torch.save({"train_x": torch.zeros(2), "meta": {}}, tmp_path / "cls.pt")
    with pytest.raises(ValueError, match="not a prepared token stream"):
        load_text(tmp_path / "cls.pt")
    torch.save({"train": torch.zeros(3), "val": torch.zeros(3), "test": torch.zeros(3), "meta": {"kind": "lm"}},
               tmp_path / "f.pt")
    with pytest.raises(ValueError, match="train is not a 1-D integer token tensor"):
        load_text(tmp_path / "f.pt")


# ---------------------------------------------------------------- batching


def test_lm_batch_windows_match_the_stream() -> None:
    tokens = torch.randint(0, 50, (500,), generator=torch.Generator().manual_seed(1), dtype=torch.int64).int()
    B, T = 7, 12
    x, y = lm_batch(tokens, B, T, torch.Generator().manual_seed(5))
    offsets = lm_offsets(tokens.numel(), B, T, torch.Generator().manual_seed(5))  # the same draws
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
    for i, o in enumerate(offsets.tolist()):
        assert 0 <= o <= tokens.numel() - T - 1
        assert x[i].tolist() == tokens[o : o + T].tolist()
        assert y[i].tolist() == tokens[o + 1 : o + T + 1].tolist()
    assert torch.equal(x[:, 1:], y[:, :-1])
    # the last possible window is reachable and nothing beyond it
    short = torch.arange(T + 1)
    xs, ys = lm_batch(short, 3, T, torch.Generator().manual_seed(0))
    assert torch.equal(xs, short[:-1].expand(3, T)) and torch.equal(ys, short[1:].expand(3, T))
    with pytest.raises(ValueError, match="needs at least 13 tokens"):
        lm_batch(torch.arange(T), 3, T, torch.Generator())


def test_lm_eval_batches_cover_each_prediction_once() -> None:
    tokens = torch.arange(103)
    xs, ys = zip(*lm_eval_batches(tokens, block_size=10, batch_size=4))
    assert [tuple(x.shape) for x in xs] == [(4, 10), (4, 10), (2, 10), (1, 2)]
    targets = torch.cat([y.flatten() for y in ys])
    assert targets.tolist() == list(range(1, 103))  # every token but the first, once, in order
    assert all(torch.equal(x + 1, y) for x, y in zip(xs, ys))  # y is x shifted by one
    capped = torch.cat([y.flatten() for _, y in lm_eval_batches(tokens, 10, 4, max_tokens=25)])
    assert capped.tolist() == list(range(1, 26))
    assert list(lm_eval_batches(torch.arange(1), 10, 4)) == []


# ---------------------------------------------------------------- metrics


def test_bits_per_char_and_perplexity_closed_forms() -> None:
    assert bits_per_char(math.log(2), 100, 100) == pytest.approx(1.0)
    assert bits_per_char(1.3, 1000, 1000) == pytest.approx(1.3 / math.log(2))
    # 250 tokens covering 1000 bytes at 2 nats/token = 500 nats = 500/ln2 bits over 1000 bytes
    assert bits_per_byte(2.0, 250, 1000) == pytest.approx(500 / math.log(2) / 1000)
    # uniform over V symbols, one byte each: log2 V bits per byte
    assert bits_per_char(math.log(65), 10, 10) == pytest.approx(math.log2(65))
    assert perplexity(math.log(65)) == pytest.approx(65)
    assert perplexity(1e6) == math.inf
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 1, 0)
