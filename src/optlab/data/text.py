"""Text corpora as token streams for language models.

``prepare_text`` fetches a registered text corpus (kind ``text``: ``tinyshakespeare``,
``tinystories``) through :func:`optlab.data.fetch.fetch` (local copy, mirror, canonical URL,
MD5-checked where an MD5 is published), tokenizes it and saves one torch file::

    {"train", "val", "test": 1-D int32 token tensors (contiguous slices of one stream),
     "tokenizer_model": uint8 tensor (the SentencePiece model; empty for char level),
     "meta": {...}}

Splits are contiguous and in order: train, then val, then test. A corpus with an official
held-out file (TinyStories' ``valid`` file) uses it as the test split and carves val from the
end of the training text. The cuts are made in the text, so each split's text and its UTF-8
byte count (``meta["n_bytes"]``, used for bits per byte) are exact:

- ``char``: the vocabulary is the sorted set of characters of the whole corpus (all splits,
  so nothing is out of vocabulary), one token per character; the cuts fall exactly at the
  requested fractions of the token stream.
- ``sentencepiece``: a BPE (or unigram) model trained on the **train split only**, with
  settings that make decoding exact (identity normalization, no dummy prefix, whitespace
  kept, byte fallback for characters not seen in training, ``"\\n"`` a fixed symbol). The cuts
  are moved forward to the next line start, because the tokenizer has to be trained on the
  train text before the stream exists; since ``"\\n"`` is a fixed symbol, the three encoded
  splits concatenated equal the encoding of the whole text. Training is deterministic: one
  thread, and the sample of at most ``sp_max_sentences`` lines is drawn here with the seed
  (SentencePiece's own sampling is not reproducible across processes). Without a dummy
  prefix, a word at the start of a line is a different token from the same word after a space.

Batching: :func:`lm_batch` (random windows, one on-device gather) and :func:`lm_eval_batches`
(non-overlapping windows covering a split). Metrics: :func:`bits_per_byte` (alias
:func:`bits_per_char`) and :func:`perplexity`.
"""

from __future__ import annotations

import codecs
import io
import itertools
import math
import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ._io import atomic_save, md5sum
from .errors import DatasetMissingError
from .fetch import fetch
from .registry import DatasetSpec, get_spec
from .synthetic import TokenSplits

FORMAT_VERSION = 1
TOKENIZERS = ("char", "sentencepiece")
SPLITS = ("train", "val", "test")
DEFAULT_SP_VOCAB = 4096

# Strings kept as single, fixed SentencePiece pieces, per dataset ("\n" always is one).
_SPECIAL_SYMBOLS = {"tinystories": ("<|endoftext|>",)}
# Text is tokenized in chunks of about this many characters, cut after a newline.
_CHUNK_CHARS = 1 << 22

__all__ = [
    "TOKENIZERS",
    "CharTokenizer",
    "SentencePieceTokenizer",
    "TokenSplits",
    "bits_per_byte",
    "bits_per_char",
    "lm_batch",
    "lm_eval_batches",
    "lm_offsets",
    "lm_windows",
    "load_text",
    "load_tokenizer",
    "perplexity",
    "prepare_text",
    "sentencepiece_options",
    "train_sentencepiece",
]


# ---------------------------------------------------------------- tokenizers


class CharTokenizer:
    """One token per character; ids index the sorted vocabulary string."""

    kind = "char"

    def __init__(self, vocab: str) -> None:
        self.vocab = vocab
        self._cps = np.frombuffer(vocab.encode("utf-32-le"), dtype="<u4")
        if self._cps.size and np.any(np.diff(self._cps.astype(np.int64)) <= 0):
            raise ValueError("char vocabulary must be sorted and without repeats")

    @classmethod
    def fit(cls, texts: Sequence[str]) -> "CharTokenizer":
        cps = np.zeros(0, dtype="<u4")
        for text in texts:
            for start, end in _chunks(text, _CHUNK_CHARS, at_newline=False):
                cps = np.union1d(cps, np.unique(_codepoints(text[start:end])))
        return cls(cps.astype("<u4").tobytes().decode("utf-32-le"))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode_array(self, text: str) -> np.ndarray:
        """int32 token ids; characters outside the vocabulary raise ValueError."""
        parts = []
        for start, end in _chunks(text, _CHUNK_CHARS, at_newline=False):
            cps = _codepoints(text[start:end])
            ids = np.searchsorted(self._cps, cps)
            bad = (ids >= self._cps.size) | (self._cps[np.minimum(ids, self._cps.size - 1)] != cps)
            if self._cps.size == 0 or bad.any():
                raise ValueError("text has characters outside the char vocabulary")
            parts.append(ids.astype(np.int32))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return "".join(self.vocab[i] for i in ids)


class SentencePieceTokenizer:
    """A trained SentencePiece model (serialized proto bytes)."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes) -> None:
        import sentencepiece as spm

        self.model_proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_proto)

    @property
    def vocab_size(self) -> int:
        return int(self.sp.get_piece_size())

    def encode_array(self, text: str, num_threads: int | None = None) -> np.ndarray:
        """int32 token ids, encoding newline-aligned chunks in parallel (exact: "\\n" is a fixed piece)."""
        threads = num_threads or min(8, os.cpu_count() or 1)
        bounds = list(_chunks(text, _CHUNK_CHARS, at_newline=True))
        parts: list[np.ndarray] = []
        for i in range(0, len(bounds), 4 * threads):
            pieces = [text[s:e] for s, e in bounds[i : i + 4 * threads]]
            out = self.sp.encode(pieces, num_threads=threads)
            total = sum(len(o) for o in out)
            parts.append(np.fromiter(itertools.chain.from_iterable(out), dtype=np.int32, count=total))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.sp.decode(list(ids))

    def pieces(self, text: str) -> list[str]:
        return self.sp.encode(text, out_type=str)


def sentencepiece_options(vocab_size: int, model_type: str, special: Sequence[str] = ()) -> dict[str, Any]:
    """Trainer settings: exact round trip, one thread, every given sentence used (no trainer-side sampling)."""
    return {
        "model_type": model_type,
        "vocab_size": int(vocab_size),
        "normalization_rule_name": "identity",  # no NFKC: decode(encode(text)) == text
        "remove_extra_whitespaces": False,
        "add_dummy_prefix": False,  # chunks and splits concatenate exactly
        "byte_fallback": True,  # characters unseen in training become UTF-8 byte pieces, never <unk>
        "character_coverage": 0.9995,
        "user_defined_symbols": ["\n", *special],
        "unk_id": 0,
        "bos_id": -1,
        "eos_id": -1,
        "pad_id": -1,
        "num_threads": 1,
        # SentencePiece's own sentence sampling is not reproducible across processes (its seed
        # setter does not fix it), so train_sentencepiece samples lines itself, with the seed
        "input_sentence_size": 0,
        "shuffle_input_sentence": False,
        "minloglevel": 2,
    }


def train_sentencepiece(text: str, options: dict[str, Any], seed: int, max_sentences: int = 0) -> bytes:
    """Train on the non-empty lines of ``text``; returns the serialized model.

    With ``max_sentences > 0`` and more lines than that, a uniform random subset of lines
    (drawn with ``seed``, kept in text order) is used. Deterministic for a given seed.
    """
    import sentencepiece as spm

    lines: Iterator[str] = _lines(text)
    if max_sentences > 0:
        n_lines = sum(1 for _ in _lines(text))
        if n_lines > max_sentences:
            keep = np.sort(np.random.default_rng(seed).choice(n_lines, size=max_sentences, replace=False))
            keep_set = set(keep.tolist())
            lines = (line for i, line in enumerate(_lines(text)) if i in keep_set)
    buf = io.BytesIO()
    spm.set_random_generator_seed(int(seed))
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=lines, model_writer=buf, **options)
    except RuntimeError as e:
        raise ValueError(
            f"sentencepiece training failed with vocab_size={options['vocab_size']}: {e} "
            "(byte fallback needs vocab_size > 256 + the number of distinct characters; "
            "a small corpus cannot fill a large vocabulary)"
        ) from e
    return buf.getvalue()


# ---------------------------------------------------------------- prepare


def prepare_text(
    name: str | DatasetSpec,
    raw_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    mirror: str | os.PathLike[str] | None = None,
    tokenizer: str | None = None,
    vocab_size: int | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.05,
    seed: int = 0,
    download: bool = True,
    max_bytes: int | None = None,
    base_url: str | None = None,
    progress: bool = True,
    sp_model_type: str = "bpe",
    sp_max_sentences: int = 1_000_000,
) -> dict[str, Any]:
    """Fetch, tokenize, split and save a text corpus; return its meta dict.

    ``tokenizer``: None (default: the dataset's own, ``DatasetSpec.tokenizer``: SentencePiece for
    TinyStories, characters for Tiny Shakespeare), ``char`` (``vocab_size`` must be None: the corpus decides it) or
    ``sentencepiece`` (``vocab_size`` default 4096; ``sp_model_type`` ``bpe`` or ``unigram``;
    at most ``sp_max_sentences`` training lines (0: all), sampled with ``seed``). The SentencePiece
    model is also written next to ``out_path`` as ``<stem>.model`` (``meta["sp_model_path"]``).
    ``val_fraction`` and ``test_fraction`` are fractions of the corpus (of the training file
    when the corpus has an official test file; ``test_fraction`` is then unused).
    ``max_bytes`` reads only the first ``max_bytes`` bytes of each raw file (quick profiles;
    the recorded MD5s are those of the whole files).
    """
    spec = get_spec(name)
    if spec.kind != "text":
        raise ValueError(f"prepare_text: dataset {spec.name!r} is not a text corpus (kind {spec.kind!r})")
    if tokenizer is None:
        tokenizer = spec.tokenizer
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer: unknown {tokenizer!r}; allowed: {', '.join(TOKENIZERS)}")
    if tokenizer == "char" and vocab_size is not None:
        raise ValueError("vocab_size: only for tokenizer='sentencepiece' (char level uses the corpus's characters)")
    if tokenizer == "sentencepiece":
        vocab_size = DEFAULT_SP_VOCAB if vocab_size is None else vocab_size
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
            raise ValueError(f"vocab_size: must be an int >= 2, got {vocab_size!r}")
        if isinstance(sp_max_sentences, bool) or not isinstance(sp_max_sentences, int) or sp_max_sentences < 0:
            raise ValueError(f"sp_max_sentences: must be an int >= 0 (0: all lines), got {sp_max_sentences!r}")
        if sp_model_type not in ("bpe", "unigram"):
            raise ValueError(f"sp_model_type: unknown {sp_model_type!r}; allowed: bpe, unigram")
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1):
        raise ValueError(f"max_bytes: must be a positive int or None, got {max_bytes!r}")
    roles = {f.role for f in spec.files}
    official_test = "test" in roles
    _check_fraction("val_fraction", val_fraction, allow_zero=True)
    if not official_test:
        _check_fraction("test_fraction", test_fraction, allow_zero=False)
        if val_fraction + test_fraction >= 1:
            raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction + test_fraction!r}")

    paths = fetch(spec, raw_dir, mirror, download=download, base_url=base_url, progress=progress)
    md5 = {f.name: f.md5 if f.md5 is not None else md5sum(paths[f.name]) for f in spec.files}
    verified = {f.name: f.md5 is not None for f in spec.files}

    decode_errors: list[str] = []
    if official_test:
        src = _read_text(paths[spec.file("train").name], max_bytes, decode_errors)
        test_text = _read_text(paths[spec.file("test").name], max_bytes, decode_errors)
    else:
        src = _read_text(paths[spec.file("text").name], max_bytes, decode_errors)
        test_text = None

    snap = tokenizer == "sentencepiece"
    n = len(src)
    if official_test:
        c1 = _cut(src, n - _count(val_fraction, n), snap)
        texts = {"train": src[:c1], "val": src[c1:], "test": test_text}
    else:
        c2 = _cut(src, n - _count(test_fraction, n), snap)
        c1 = min(_cut(src, n - _count(test_fraction, n) - _count(val_fraction, n), snap), c2)
        texts = {"train": src[:c1], "val": src[c1:c2], "test": src[c2:]}
    del src, test_text
    if not texts["train"]:
        raise ValueError(f"{spec.name}: the training split is empty ({n} characters read)")

    out = Path(out_path)
    meta: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "name": spec.name,
        "kind": "lm",
        "tokenizer": tokenizer,
        "seed": int(seed),
        "val_fraction": float(val_fraction),
        "test_fraction": None if official_test else float(test_fraction),
        "test_split": "official" if official_test else "carved",
        "max_bytes": max_bytes,
        "md5": md5,
        "md5_verified": verified,
        "decode_errors": decode_errors,
        "dtype": "int32",
    }
    proto = b""
    tok: CharTokenizer | SentencePieceTokenizer
    if tokenizer == "char":
        tok = CharTokenizer.fit([texts[s] for s in SPLITS])
        meta["vocab"] = tok.vocab
    else:
        assert vocab_size is not None
        options = sentencepiece_options(vocab_size, sp_model_type, _SPECIAL_SYMBOLS.get(spec.name, ()))
        proto = train_sentencepiece(texts["train"], options, seed, sp_max_sentences)
        tok = SentencePieceTokenizer(proto)
        meta["vocab"] = None
        meta["sp_options"] = {k: v for k, v in options.items() if k != "minloglevel"}
        meta["sp_max_sentences"] = int(sp_max_sentences)
        meta["sp_model"] = out.with_suffix(".model").name  # next to the prepared file

    tensors: dict[str, torch.Tensor] = {}
    for s in SPLITS:
        ids = tok.encode_array(texts[s])
        if isinstance(tok, SentencePieceTokenizer):  # exact by construction; checked on <= 1 MB per split
            head = texts[s][: next(_chunks(texts[s], 1 << 20, at_newline=True), (0, 0))[1]]
            if len(head) <= 1 << 21 and tok.decode(tok.encode_array(head)) != head:
                raise RuntimeError(f"{spec.name}: sentencepiece round trip is not exact on the {s} split")
        tensors[s] = torch.from_numpy(ids)
    meta["vocab_size"] = tok.vocab_size
    meta["n_tokens"] = {s: int(tensors[s].numel()) for s in SPLITS}
    meta["n_chars"] = {s: len(texts[s]) for s in SPLITS}
    meta["n_bytes"] = {s: _utf8_len(texts[s]) for s in SPLITS}

    if proto:
        atomic_save(out.with_suffix(".model"), proto)
    model_bytes = torch.frombuffer(bytearray(proto), dtype=torch.uint8) if proto else torch.zeros(0, dtype=torch.uint8)
    obj = {**tensors, "tokenizer_model": model_bytes, "meta": meta}
    atomic_save(out, obj)
    return _with_paths(meta, out)


def _with_paths(meta: dict[str, Any], path: Path) -> dict[str, Any]:
    meta = dict(meta)
    if meta.get("sp_model"):
        meta["sp_model_path"] = str(Path(os.path.abspath(path)).parent / meta["sp_model"])
    return meta


# ---------------------------------------------------------------- load


def _load_obj(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise DatasetMissingError(
            f"prepared dataset not found: {p}; run `dvc repro prepare` "
            "(or optlab.data.text.prepare_text) to build it"
        )
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{p} is not a prepared token stream (weights-only load refused it: {first})") from e
    if not isinstance(obj, dict) or not isinstance(obj.get("meta"), dict) or obj["meta"].get("kind") != "lm":
        raise ValueError(f"{p} is not a prepared token stream (meta.kind != 'lm')")
    for s in SPLITS:
        t = obj.get(s)
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{p}: {s} is not a 1-D integer token tensor")
    return p, obj


def load_text(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> TokenSplits:
    """Load a prepared token stream (weights-only unpickling) onto ``device``.

    Tokens keep their stored dtype (int32 from :func:`prepare_text`, int64 from the synthetic
    Markov corpus); :func:`lm_batch` and :func:`lm_eval_batches` return int64.
    """
    p, obj = _load_obj(path)
    dev = torch.device(device)
    return TokenSplits(*(obj[s].to(dev) for s in SPLITS), meta=_with_paths(obj["meta"], p))


def load_tokenizer(path: str | os.PathLike[str]) -> CharTokenizer | SentencePieceTokenizer:
    """The tokenizer of a prepared file (from the file itself; the ``.model`` file is not needed)."""
    p, obj = _load_obj(path)
    meta = obj["meta"]
    if meta.get("tokenizer") == "sentencepiece":
        return SentencePieceTokenizer(obj["tokenizer_model"].numpy().tobytes())
    if isinstance(meta.get("vocab"), str):
        return CharTokenizer(meta["vocab"])
    raise ValueError(f"{p}: no tokenizer recorded")


# ---------------------------------------------------------------- batching


def lm_offsets(n_tokens: int, batch_size: int, block_size: int, generator: torch.Generator) -> torch.Tensor:
    """``batch_size`` window starts in ``[0, n_tokens - block_size - 1]``, drawn on the generator's device."""
    if batch_size < 1 or block_size < 1:
        raise ValueError(f"batch_size and block_size must be >= 1, got {batch_size}, {block_size}")
    if n_tokens < block_size + 1:
        raise ValueError(f"block_size {block_size} needs at least {block_size + 1} tokens, the split has {n_tokens}")
    return torch.randint(0, n_tokens - block_size, (batch_size,), generator=generator, device=generator.device)


def lm_windows(tokens: torch.Tensor, offsets: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) int64 ``[B, block_size]`` for window starts ``offsets``: one gather on the tokens' device."""
    idx = offsets.to(tokens.device)[:, None] + torch.arange(block_size + 1, device=tokens.device)
    win = tokens[idx].long()
    return win[:, :-1], win[:, 1:]


def lm_batch(
    tokens: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random training windows: x = tokens[o : o+T], y = tokens[o+1 : o+T+1] for each drawn o.

    Offsets are drawn with ``generator`` on its device (a CPU generator gives the same batches
    whatever the data device), then moved to the tokens' device for one gather.
    """
    offsets = lm_offsets(tokens.numel(), batch_size, block_size, generator)
    return lm_windows(tokens, offsets, block_size)


def lm_eval_batches(
    tokens: torch.Tensor, block_size: int, batch_size: int, max_tokens: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping windows predicting every token of the split except the first, once each.

    Windows start at 0, T, 2T, ...; full windows come in batches of ``batch_size``; a last
    shorter window (``[1, r]``) covers the remainder. ``max_tokens`` caps the number of
    predicted tokens. Sum the per-token losses and divide by the total ``y.numel()``.
    """
    if batch_size < 1 or block_size < 1:
        raise ValueError(f"batch_size and block_size must be >= 1, got {batch_size}, {block_size}")
    n_pred = max(0, tokens.numel() - 1)
    if max_tokens is not None:
        n_pred = min(n_pred, max(0, int(max_tokens)))
    n_full, rem = divmod(n_pred, block_size)
    ar = torch.arange(block_size + 1, device=tokens.device)
    for i in range(0, n_full, batch_size):
        starts = torch.arange(i, min(i + batch_size, n_full), device=tokens.device) * block_size
        win = tokens[starts[:, None] + ar].long()
        yield win[:, :-1], win[:, 1:]
    if rem:
        s = n_full * block_size
        win = tokens[s : s + rem + 1].long()[None]
        yield win[:, :-1], win[:, 1:]


# ---------------------------------------------------------------- metrics


def bits_per_byte(loss_nats_per_token: float, n_tokens: int, n_bytes: int) -> float:
    """Bits per UTF-8 byte of text: loss * n_tokens / (n_bytes * ln 2).

    For character-level ASCII text (one byte per token) this is bits per character, loss / ln 2.
    """
    if n_bytes <= 0:
        raise ValueError(f"n_bytes must be > 0, got {n_bytes}")
    return float(loss_nats_per_token) * float(n_tokens) / (float(n_bytes) * math.log(2))


bits_per_char = bits_per_byte


def perplexity(loss_nats_per_token: float) -> float:
    """exp(loss); inf where that overflows."""
    try:
        return math.exp(float(loss_nats_per_token))
    except OverflowError:
        return math.inf


# ---------------------------------------------------------------- helpers


def _check_fraction(name: str, value: float, *, allow_zero: bool) -> None:
    low_ok = value >= 0 if allow_zero else value > 0
    if not (low_ok and value < 1):
        raise ValueError(f"{name} must be in {'[0, 1)' if allow_zero else '(0, 1)'}, got {value!r}")


def _count(fraction: float, n: int) -> int:
    """round(fraction * n), halves rounded up."""
    return int(math.floor(fraction * n + 0.5))


def _cut(text: str, pos: int, snap: bool) -> int:
    """``pos``, or (``snap``) the start of the next line at or after it (``pos`` if there is none)."""
    pos = max(0, min(pos, len(text)))
    if not snap or pos == 0 or pos == len(text) or text[pos - 1] == "\n":
        return pos
    nl = text.find("\n", pos)
    return pos if nl < 0 else nl + 1


def _chunks(text: str, size: int, *, at_newline: bool) -> Iterator[tuple[int, int]]:
    """(start, end) pieces of about ``size`` characters covering ``text``; ends after a newline if asked."""
    start, n = 0, len(text)
    while start < n:
        end = min(start + size, n)
        if at_newline and end < n:
            nl = text.find("\n", end)
            end = n if nl < 0 else nl + 1
        yield start, end
        start = end


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype="<u4")


def _utf8_len(text: str) -> int:
    if text.isascii():
        return len(text)
    total = 0
    for s, e in _chunks(text, _CHUNK_CHARS, at_newline=False):
        total += len(text[s:e].encode("utf-8"))
    return total


def _lines(text: str) -> Iterator[str]:
    """Non-empty lines of ``text`` (no list of all lines is built)."""
    start, n = 0, len(text)
    while start < n:
        nl = text.find("\n", start)
        end = n if nl < 0 else nl
        if end > start:
            yield text[start:end]
        start = end + 1


def _read_text(path: Path, max_bytes: int | None, errors_seen: list[str]) -> str:
    """UTF-8 text of ``path`` (its first ``max_bytes`` bytes, cut at a character boundary)."""
    with open(path, "rb") as f:
        data = f.read() if max_bytes is None else f.read(max_bytes)
    final = max_bytes is None or len(data) < max_bytes
    try:
        return codecs.getincrementaldecoder("utf-8")("strict").decode(data, final=final)
    except UnicodeDecodeError as e:
        warnings.warn(f"{path} is not valid UTF-8 ({e}); undecodable bytes become U+FFFD", stacklevel=3)
        errors_seen.append(path.name)
        return codecs.getincrementaldecoder("utf-8")("replace").decode(data, final=final)


