"""Dataset registry: canonical URLs, raw file names, MD5s and mirror layout."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping


@dataclass(frozen=True)
class RawFile:
    """One raw file of a dataset: its name, published MD5 and role (e.g. ``train_images``).

    ``md5=None`` means the source publishes no checksum: the file is used unverified (with a
    :class:`~optlab.data.errors.UnverifiedWarning`) and its MD5 is recorded when prepared.
    """

    name: str
    md5: str | None
    role: str = ""


@dataclass(frozen=True)
class DatasetSpec:
    """Static description of a dataset.

    ``kind`` selects the prepare routine (``sklearn_digits``, ``idx``, ``cifar10_python``;
    ``text``: a raw text corpus prepared to token streams by ``optlab.data.text.prepare_text``,
    with ``n_classes=0`` and ``input_shape=()``).
    ``subdir`` is the torchvision-style folder of the raw files inside a mirror (``MNIST/raw``).
    ``tokenizer`` (text corpora): what ``prepare`` tokenizes the corpus with, ``char`` or
    ``sentencepiece`` (a 4,096-piece vocabulary trained on the training split).
    """

    name: str
    kind: str
    n_classes: int
    input_shape: tuple[int, ...]
    files: tuple[RawFile, ...] = ()
    base_url: str | None = None
    subdir: str | None = None
    preparable: bool = True
    tokenizer: str = "char"

    @property
    def input_dim(self) -> int:
        dim = 1
        for s in self.input_shape:
            dim *= s
        return dim

    def file(self, role: str) -> RawFile:
        """The raw file with the given role."""
        for f in self.files:
            if f.role == role:
                return f
        raise KeyError(f"dataset {self.name!r} has no raw file with role {role!r}")

    def url(self, file_name: str, base_url: str | None = None) -> str:
        """URL of a raw file under ``base_url`` (default: the canonical base)."""
        base = self.base_url if base_url is None else base_url
        if base is None:
            raise ValueError(f"dataset {self.name!r} has no download URL")
        return base.rstrip("/") + "/" + file_name

    def mirror_candidates(self, mirror: Path, file_name: str) -> list[Path]:
        """Mirror paths to try, in order: ``mirror/<subdir>/<file>``, then ``mirror/<file>``."""
        out = [mirror / self.subdir / file_name] if self.subdir else []
        out.append(mirror / file_name)
        return out


_IDX_ROLES = ("train_images", "train_labels", "test_images", "test_labels")
_IDX_NAMES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def _idx_files(md5s: tuple[str, str, str, str]) -> tuple[RawFile, ...]:
    return tuple(RawFile(n, m, r) for n, m, r in zip(_IDX_NAMES, md5s, _IDX_ROLES))


DATASETS: Mapping[str, DatasetSpec] = MappingProxyType(
    {
        "digits": DatasetSpec(
            name="digits", kind="sklearn_digits", n_classes=10, input_shape=(1, 8, 8)
        ),
        "mnist": DatasetSpec(
            name="mnist",
            kind="idx",
            n_classes=10,
            input_shape=(1, 28, 28),
            files=_idx_files(
                (
                    "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                    "d53e105ee54ea40749a09fcbcd1e9432",
                    "9fb629c4189551a2d022fa330f9573f3",
                    "ec29112dd5afa0611ce80d1b7f02629c",
                )
            ),
            base_url="https://ossci-datasets.s3.amazonaws.com/mnist/",
            subdir="MNIST/raw",
        ),
        "fashion_mnist": DatasetSpec(
            name="fashion_mnist",
            kind="idx",
            n_classes=10,
            input_shape=(1, 28, 28),
            files=_idx_files(
                (
                    "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                    "25c81989df183df01b3e8a0aad5dffbe",
                    "bef4ecab320f06d8554ea6380940ec79",
                    "bb300cfdad3c16e7a12a480ee83cd310",
                )
            ),
            base_url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            subdir="FashionMNIST/raw",
        ),
        # One archive; prepare MD5-checks it, extracts it safely and reads the pickled batches
        # with a restricted unpickler (data/cifar.py). A mirror holds it at
        # <mirror>/cifar-10-python.tar.gz (torchvision's root layout).
        "cifar10": DatasetSpec(
            name="cifar10",
            kind="cifar10_python",
            n_classes=10,
            input_shape=(3, 32, 32),
            files=(
                RawFile("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", "archive"),
            ),
            base_url="https://www.cs.toronto.edu/~kriz/",
            subdir=None,
        ),
        # Text corpora (kind "text"): prepared by optlab.data.text.prepare_text, not prepare.
        "tinyshakespeare": DatasetSpec(
            name="tinyshakespeare",
            kind="text",
            n_classes=0,
            input_shape=(),
            files=(RawFile("input.txt", "6fb458f1232090904fb40fe944165e91", "text"),),
            base_url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/",
            subdir="tinyshakespeare",
        ),
        # No published checksums: the files are used unverified and their MD5s recorded.
        # The official validation file is used as the test split.
        "tinystories": DatasetSpec(
            name="tinystories",
            kind="text",
            n_classes=0,
            input_shape=(),
            files=(
                RawFile("TinyStoriesV2-GPT4-train.txt", None, "train"),
                RawFile("TinyStoriesV2-GPT4-valid.txt", None, "test"),
            ),
            base_url="https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/",
            subdir="TinyStories",
            tokenizer="sentencepiece",  # the full GPT study's 4,096-token vocabulary
        ),
    }
)


def dataset_names() -> list[str]:
    """Names of the datasets that ``prepare`` can build, in registry order."""
    return [name for name, spec in DATASETS.items() if spec.preparable and spec.kind != "text"]


def text_dataset_names() -> list[str]:
    """Names of the text corpora that ``optlab.data.text.prepare_text`` can build."""
    return [name for name, spec in DATASETS.items() if spec.preparable and spec.kind == "text"]


def get_spec(name: str | DatasetSpec) -> DatasetSpec:
    """Look up a dataset by name; a ``DatasetSpec`` is returned unchanged."""
    if isinstance(name, DatasetSpec):
        return name
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(
            f"unknown dataset {name!r}; known: {', '.join(DATASETS)} "
            f"(preparable: {', '.join(dataset_names())})"
        ) from None
