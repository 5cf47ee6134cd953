"""CIFAR-10 prepare from a tiny fake archive: MD5 first, safe extraction, restricted unpickling,
per-channel standardization with train statistics, official test split kept."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from optlab.data import ChecksumError, ChecksumWarning, DatasetMissingError, DatasetSpec, RawFile, get_spec, load, prepare
from optlab.data.cifar import RestrictedUnpickler, load_batch, read_cifar10

ARCHIVE = "cifar-10-python.tar.gz"


class _Py2Pickler(pickle._Pickler):
    """Protocol 2 with bytes written as Python 2 ``str`` opcodes, like the real CIFAR batches.

    (Python 3 pickles bytes at protocol 2 through ``_codecs.encode``, a global the restricted
    unpickler rightly refuses; the official files contain no such global.)
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def _py2_dumps(obj: object) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def _batch(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    data[:, :1024] //= 2  # channels with different statistics
    data[:, 2048:] = 200 + data[:, 2048:] // 8
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    return {b"batch_label": b"fake", b"labels": labels, b"data": data, b"filenames": [b"x.png"] * n}


def _tar(path: Path, members: dict[str, bytes]) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return hashlib.md5(path.read_bytes()).hexdigest()


def _fake_cifar(root: Path, per_batch: int = 4, n_test: int = 5, extra: dict[str, bytes] | None = None):
    batches = {f"data_batch_{i}": _batch(per_batch, i) for i in range(1, 6)}
    batches["test_batch"] = _batch(n_test, 99)
    members = {f"cifar-10-batches-py/{k}": _py2_dumps(v) for k, v in batches.items()}
    members.update(extra or {})
    mirror = root / "mirror"
    mirror.mkdir(parents=True, exist_ok=True)
    md5 = _tar(mirror / ARCHIVE, members)
    real = get_spec("cifar10")
    spec = DatasetSpec(name="cifar10", kind=real.kind, n_classes=10, input_shape=(3, 32, 32),
                       files=(RawFile(ARCHIVE, md5, "archive"),), base_url=None)
    return spec, mirror, batches


def test_prepare_fake_cifar(tmp_path: Path) -> None:
    spec, mirror, batches = _fake_cifar(tmp_path)
    meta = prepare(spec, tmp_path / "raw", tmp_path / "c.pt", mirror=mirror, download=False, val_fraction=0.25, progress=False)
    assert meta["input_shape"] == [3, 32, 32] and meta["n_classes"] == 10 and meta["input_dim"] == 3072
    assert (meta["n_train"], meta["n_val"], meta["n_test"]) == (15, 5, 5)
    assert meta["standardize"] == "per_channel" and meta["test_split"] == "official"
    assert list((tmp_path / "raw").iterdir()) == [tmp_path / "raw" / ARCHIVE]  # extraction cleaned up

    raw_x = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)]).astype(np.float64)
    raw_y = np.concatenate([batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)])
    obj = torch.load(tmp_path / "c.pt", weights_only=True)
    tr = obj["train_idx"].numpy()
    chans = raw_x[tr].reshape(len(tr), 3, 1024)
    mean = chans.mean(axis=(0, 2))
    std = chans.std(axis=(0, 2))
    assert len(set(np.round(mean))) == 3  # the fake's channels really differ

    def ref(x: np.ndarray) -> np.ndarray:
        return ((x.reshape(-1, 3, 1024) - mean[:, None]) / std[:, None]).reshape(-1, 3072)

    s = load(tmp_path / "c.pt")
    assert s.train_x.dtype == torch.float32 and s.train_x.shape == (15, 3072)
    np.testing.assert_allclose(s.train_x.numpy(), ref(raw_x[tr]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s.val_x.numpy(), ref(raw_x[obj["val_idx"].numpy()]), rtol=1e-5, atol=1e-5)
    test = batches["test_batch"]
    np.testing.assert_allclose(s.test_x.numpy(), ref(test[b"data"].astype(np.float64)), rtol=1e-5, atol=1e-5)
    assert s.train_y.tolist() == raw_y[tr].tolist() and s.test_y.tolist() == test[b"labels"]
    assert sorted(tr.tolist() + obj["val_idx"].tolist()) == list(range(20))  # val carved from train
    # channel means of the standardized train split are 0, stds 1
    c = s.train_x.view(15, 3, 1024).double()
    assert torch.allclose(c.mean(dim=(0, 2)), torch.zeros(3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(c.std(dim=(0, 2), correction=0), torch.ones(3, dtype=torch.float64), atol=1e-5)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_forbidden_global_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = _py2_dumps({b"data": _Evil(marker), b"labels": []})
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to unpickle global (posix|os|nt)\.system"):
        RestrictedUnpickler(io.BytesIO(evil), encoding="bytes").load()
    assert not marker.exists()
    for payload in (pickle.dumps(eval, protocol=2), pickle.dumps(np.load, protocol=2)):
        with pytest.raises(pickle.UnpicklingError, match="refusing"):
            RestrictedUnpickler(io.BytesIO(payload), encoding="bytes").load()

    # inside a correctly checksummed archive: prepare fails naming the file, nothing runs
    spec, mirror, _ = _fake_cifar(tmp_path / "b", extra={"cifar-10-batches-py/data_batch_3": evil})
    with pytest.raises(ValueError, match=r"data_batch_3.*refusing to unpickle global"):
        prepare(spec, tmp_path / "raw", tmp_path / "c.pt", mirror=mirror, download=False, progress=False)
    assert not marker.exists() and not (tmp_path / "c.pt").exists()


def test_md5_is_checked_before_anything_is_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_Evil(marker), protocol=2)
    spec, mirror, _ = _fake_cifar(tmp_path, extra={"cifar-10-batches-py/data_batch_1": evil})
    wrong = DatasetSpec(name="cifar10", kind=spec.kind, n_classes=10, input_shape=(3, 32, 32),
                        files=(RawFile(ARCHIVE, "0" * 32, "archive"),), base_url=None)
    with pytest.warns(ChecksumWarning), pytest.raises(DatasetMissingError, match="MD5"):
        prepare(wrong, tmp_path / "raw", tmp_path / "c.pt", mirror=mirror, download=False, progress=False)
    with pytest.raises(ChecksumError, match="refusing to read it"):
        read_cifar10(mirror / ARCHIVE, "0" * 32)
    assert not marker.exists()


def test_old_numpy_module_path_is_accepted(tmp_path: Path) -> None:
    """The real batches were written by numpy 1.x: numpy.core.multiarray._reconstruct."""
    obj = _batch(3, 0)
    raw = _py2_dumps(obj)
    assert b"_codecs" not in raw and (b"numpy._core.multiarray" in raw or b"numpy.core.multiarray" in raw)
    (tmp_path / "b").write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    x, y = load_batch(tmp_path / "b")
    assert np.array_equal(x, obj[b"data"]) and y.tolist() == obj[b"labels"]


def test_malformed_batches(tmp_path: Path) -> None:
    cases = {
        "list": ([1, 2], "top level is list"),
        "float": ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "uint8"),
        "count": ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "1 labels for 2 images"),
        "range": ({b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]}, r"outside \[0, 10\)"),
    }
    for name, (obj, msg) in cases.items():
        p = tmp_path / name
        p.write_bytes(_py2_dumps(obj))
        with pytest.raises(ValueError, match=msg):
            load_batch(p)
    (tmp_path / "trunc").write_bytes(_py2_dumps(cases["count"][0])[:100])
    (tmp_path / "py3").write_bytes(pickle.dumps(cases["count"][0], protocol=2))  # bytes via _codecs.encode
    with pytest.raises(ValueError, match="_codecs.encode"):
        load_batch(tmp_path / "py3")
    with pytest.raises(ValueError, match="not a readable CIFAR batch"):
        load_batch(tmp_path / "trunc")


def test_archive_missing_a_batch(tmp_path: Path) -> None:
    archive = tmp_path / ARCHIVE
    md5 = _tar(archive, {"cifar-10-batches-py/data_batch_1": _py2_dumps(_batch(2, 0))})
    with pytest.raises(ValueError, match="data_batch_2"):
        read_cifar10(archive, md5)


def test_real_cifar_spec_is_preparable_but_not_required() -> None:
    spec = get_spec("cifar10")
    assert spec.preparable and spec.file("archive").md5 == "c58f30108f718f92721af3b95e74349a"
    assert spec.url(ARCHIVE) == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
