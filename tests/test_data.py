"""Tests for optlab.data: IDX reader, fetch with mirror/checksums, safe tar extraction,
prepare/load round trips and index batching. Every test builds its own tiny files."""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import os
import socket
import struct
import tarfile
import threading
import warnings
from dataclasses import replace
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from optlab.data import (
    DATASETS,
    MIRROR_ENV,
    ChecksumError,
    ChecksumWarning,
    DatasetMissingError,
    DatasetSpec,
    RawFile,
    Splits,
    batch_indices,
    dataset_names,
    fetch,
    load,
    prepare,
    read_idx,
    resolve_mirror,
    safe_extract,
)

# ---------------------------------------------------------------- helpers

_IDX_CODES = {
    np.dtype("uint8"): 0x08,
    np.dtype("int8"): 0x09,
    np.dtype("int16"): 0x0B,
    np.dtype("int32"): 0x0C,
    np.dtype("float32"): 0x0D,
    np.dtype("float64"): 0x0E,
}


def idx_bytes(arr: np.ndarray) -> bytes:
    """Serialize an array in IDX format (big-endian payload)."""
    header = struct.pack(">BBBB", 0, 0, _IDX_CODES[arr.dtype], arr.ndim)
    header += struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, arr: np.ndarray, *, gz: bool) -> Path:
    data = idx_bytes(arr)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.fixture(autouse=True)
def _no_env_mirror(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never see a mirror configured in the caller's environment."""
    monkeypatch.delenv(MIRROR_ENV, raising=False)


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[DatasetSpec, dict[str, bytes]]:
    """A two-file dataset spec with known contents; no URL, mirror subdir ``Tiny/raw``."""
    contents = {"a.bin": b"alpha" * 100, "b.bin": bytes(range(256)) * 3}
    spec = DatasetSpec(
        name="tiny",
        kind="blob",
        n_classes=2,
        input_shape=(1,),
        files=tuple(RawFile(n, md5(c), n) for n, c in contents.items()),
        base_url=None,
        subdir="Tiny/raw",
        preparable=False,
    )
    return spec, contents


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_dir(tmp_path: Path):
    """A directory served by a local HTTP server on 127.0.0.1; yields (dir, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    srv = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root))
    )
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{srv.server_address[1]}/"
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join()


def no_temp_files(d: Path) -> bool:
    return not any(p.name.endswith(".part") for p in d.iterdir())


# ---------------------------------------------------------------- read_idx


def test_read_idx_roundtrip_gzip_and_plain(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 5, 4), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(7,), dtype=np.uint8)
    for gz in (True, False):
        ip = write_idx(tmp_path / f"img{gz}", images, gz=gz)
        lp = write_idx(tmp_path / f"lab{gz}", labels, gz=gz)
        assert (ip.read_bytes()[:2] == b"\x1f\x8b") == gz
        x, y = read_idx(ip), read_idx(lp)
        assert x.dtype == torch.uint8 and x.shape == (7, 5, 4)
        assert torch.equal(x, torch.from_numpy(images))
        assert torch.equal(y, torch.from_numpy(labels))


@pytest.mark.parametrize("dtype", ["int8", "int16", "int32", "float32", "float64"])
def test_read_idx_multibyte_types_are_big_endian(tmp_path: Path, dtype: str) -> None:
    arr = (np.arange(24).reshape(2, 3, 4) * 37 - 300).astype(dtype)
    if dtype == "int8":
        arr = (np.arange(24).reshape(2, 3, 4) - 12).astype(dtype)
    x = read_idx(write_idx(tmp_path / "f.idx.gz", arr, gz=True))
    assert x.shape == arr.shape
    np.testing.assert_array_equal(x.numpy(), arr)


def test_read_idx_matches_torchvision_reader(tmp_path: Path) -> None:
    from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor

    arr = np.random.default_rng(1).integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
    path = write_idx(tmp_path / "train-images-idx3-ubyte", arr, gz=False)
    assert torch.equal(read_idx(path), read_sn3_pascalvincent_tensor(str(path), strict=False))


def test_read_idx_errors(tmp_path: Path) -> None:
    good = idx_bytes(np.zeros((3, 2), dtype=np.uint8))
    cases = {
        "bad magic": (b"\x01\x00" + good[2:], "bad IDX magic"),
        "bad type": (good[:2] + b"\x07" + good[3:], "unsupported IDX type"),
        "short": (b"\x00\x00", "too short"),
        "short header": (good[:6], "truncated IDX header"),
        "truncated": (good[:-1], "truncated IDX data"),
        "trailing": (good + b"\x00", "trailing bytes"),
        "bad gzip": (gzip.compress(good)[:-6], "gzip"),
    }
    for i, (data, msg) in enumerate(cases.values()):
        p = tmp_path / f"bad{i}"
        p.write_bytes(data)
        with pytest.raises(ValueError, match=msg):
            read_idx(p)
    (tmp_path / "ok").write_bytes(good)
    assert read_idx(tmp_path / "ok").shape == (3, 2)


# ---------------------------------------------------------------- registry


def test_registry_entries() -> None:
    assert dataset_names() == ["digits", "mnist", "fashion_mnist", "cifar10"]
    mnist, fmnist, cifar = DATASETS["mnist"], DATASETS["fashion_mnist"], DATASETS["cifar10"]
    assert [f.name for f in mnist.files] == [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]
    assert mnist.file("train_images").md5 == "f68b3c2dcbeaaa9fbdd348bbdeb94873"
    assert fmnist.file("test_labels").md5 == "bb300cfdad3c16e7a12a480ee83cd310"
    assert mnist.url("t10k-labels-idx1-ubyte.gz") == (
        "https://ossci-datasets.s3.amazonaws.com/mnist/t10k-labels-idx1-ubyte.gz"
    )
    assert fmnist.url("a") == "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/a"
    assert (mnist.subdir, fmnist.subdir) == ("MNIST/raw", "FashionMNIST/raw")
    assert cifar.url(cifar.files[0].name) == (
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    )
    assert cifar.files[0].md5 == "c58f30108f718f92721af3b95e74349a"
    assert cifar.kind == "cifar10_python" and cifar.input_shape == (3, 32, 32)
    with pytest.raises(TypeError):
        DATASETS["x"] = mnist  # type: ignore[index]


def test_prepare_unsupported_and_unknown(tmp_path: Path, tiny) -> None:
    with pytest.raises(NotImplementedError, match="'tiny'.*digits, mnist, fashion_mnist, cifar10"):
        prepare(tiny[0], tmp_path / "raw", tmp_path / "c.pt", download=False)
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        prepare("nope", tmp_path / "raw", tmp_path / "n.pt")
    assert not (tmp_path / "c.pt").exists()


# ---------------------------------------------------------------- resolve_mirror


def test_resolve_mirror_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_mirror(None) is None
    assert resolve_mirror("") is None
    monkeypatch.setenv(MIRROR_ENV, "env_mirror")
    assert resolve_mirror(None) == tmp_path / "env_mirror"
    assert resolve_mirror("") == tmp_path / "env_mirror"
    assert resolve_mirror("conf/m") == tmp_path / "conf" / "m"
    assert resolve_mirror("/abs/m") == Path("/abs/m")


# ---------------------------------------------------------------- fetch


def test_fetch_from_mirror_both_layouts(tmp_path: Path, tiny) -> None:
    spec, contents = tiny
    mirror = tmp_path / "mirror"
    (mirror / "Tiny/raw").mkdir(parents=True)
    (mirror / "Tiny/raw/a.bin").write_bytes(contents["a.bin"])  # torchvision layout
    (mirror / "b.bin").write_bytes(contents["b.bin"])  # flat layout
    raw = tmp_path / "raw"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = fetch(spec, raw, mirror, download=False)
    assert paths == {"a.bin": raw / "a.bin", "b.bin": raw / "b.bin"}
    for name, data in contents.items():
        assert paths[name].read_bytes() == data
    assert no_temp_files(raw)


def test_fetch_uses_env_mirror(tmp_path: Path, tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    spec, contents = tiny
    mirror = tmp_path / "m"
    mirror.mkdir()
    for name, data in contents.items():
        (mirror / name).write_bytes(data)
    monkeypatch.setenv(MIRROR_ENV, str(mirror))
    paths = fetch(spec, tmp_path / "raw", download=False)
    assert paths["b.bin"].read_bytes() == contents["b.bin"]


def test_fetch_keeps_good_local_copy(tmp_path: Path, tiny) -> None:
    spec, contents = tiny
    raw, mirror = tmp_path / "raw", tmp_path / "mirror"
    raw.mkdir()
    mirror.mkdir()
    for name, data in contents.items():
        (raw / name).write_bytes(data)
        (mirror / name).write_bytes(b"corrupt")  # would warn if it were looked at
    before = {n: (raw / n).stat().st_mtime_ns for n in contents}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fetch(spec, raw, mirror, download=False)
    assert {n: (raw / n).stat().st_mtime_ns for n in contents} == before


def test_corrupted_raw_file_replaced_from_mirror(tmp_path: Path, tiny) -> None:
    spec, contents = tiny
    raw, mirror = tmp_path / "raw", tmp_path / "mirror"
    raw.mkdir()
    (mirror / "Tiny/raw").mkdir(parents=True)
    for name, data in contents.items():
        (mirror / "Tiny/raw" / name).write_bytes(data)
    (raw / "a.bin").write_bytes(contents["a.bin"][:-1] + b"X")
    with pytest.warns(ChecksumWarning, match="a.bin"):
        paths = fetch(spec, raw, mirror, download=False)
    assert paths["a.bin"].read_bytes() == contents["a.bin"]
    assert no_temp_files(raw)


def test_mirror_mismatch_skipped_and_download_mismatch_raises(tmp_path: Path, tiny) -> None:
    spec, contents = tiny
    raw, mirror, www = tmp_path / "raw", tmp_path / "mirror", tmp_path / "www"
    mirror.mkdir()
    www.mkdir()
    (mirror / "a.bin").write_bytes(b"bad mirror copy")
    (www / "a.bin").write_bytes(b"bad download")
    with pytest.warns(ChecksumWarning, match="mirror file .*a.bin"):
        with pytest.raises(ChecksumError) as err:
            fetch(spec, raw, mirror, base_url=www.as_uri() + "/", progress=False)
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert "\n" not in msg
    assert "a.bin" in msg and spec.files[0].md5 in msg and md5(b"bad download") in msg
    assert (www / "a.bin").as_uri() in msg
    assert not (raw / "a.bin").exists()  # the bad mirror copy was not used
    assert no_temp_files(raw)


def test_download_from_local_http_server(tmp_path: Path, tiny, http_dir) -> None:
    spec, contents = tiny
    www, base = http_dir
    for name, data in contents.items():
        (www / name).write_bytes(data)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "b.bin").write_bytes(b"stale")
    raw = tmp_path / "raw"
    with pytest.warns(ChecksumWarning, match="b.bin"):
        paths = fetch(spec, raw, mirror, base_url=base, progress=True)
    for name, data in contents.items():
        assert paths[name].read_bytes() == data
    assert (mirror / "b.bin").read_bytes() == b"stale"  # the mirror is never written
    assert no_temp_files(raw)


def test_missing_everywhere_without_download(tmp_path: Path, tiny) -> None:
    spec, _ = tiny
    raw = tmp_path / "raw"
    with pytest.raises(DatasetMissingError) as err:
        fetch(spec, raw, None, download=False)
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert "\n" not in msg
    assert "'tiny'" in msg and "a.bin" in msg and str(raw / "a.bin") in msg
    assert MIRROR_ENV in msg and "data.mirror" in msg

    empty_mirror = tmp_path / "empty"
    empty_mirror.mkdir()
    spec_url = replace(spec, base_url="https://example.invalid/x/")
    with pytest.raises(DatasetMissingError) as err:
        fetch(spec_url, raw, empty_mirror, download=False)
    msg = str(err.value)
    assert str(empty_mirror / "Tiny/raw/a.bin") in msg and str(empty_mirror / "a.bin") in msg
    assert "https://example.invalid/x/a.bin (download disabled)" in msg


def test_network_error_is_missing(tmp_path: Path, tiny) -> None:
    spec, _ = tiny
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DatasetMissingError, match="download failed"):
        fetch(spec, tmp_path / "raw", None, base_url=f"http://127.0.0.1:{port}/", timeout=5)
    with pytest.raises(DatasetMissingError, match="download failed"):
        fetch(spec, tmp_path / "raw", None, base_url=(tmp_path / "nowhere").as_uri())


# ---------------------------------------------------------------- prepare: digits


def _reference_standardize(x: np.ndarray, train: np.ndarray, per_feature: bool) -> np.ndarray:
    t = train.astype(np.float64)
    mean = t.mean(axis=0) if per_feature else t.mean()
    std = t.std(axis=0) if per_feature else t.std()
    std = np.where(std > 1e-12, std, 1.0)
    return (x.astype(np.float64) - mean) / std


def test_prepare_digits_splits_and_standardization(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    d = load_digits()
    out = tmp_path / "prepared" / "digits.pt"
    meta = prepare("digits", tmp_path / "raw", out, val_fraction=0.1, test_fraction=0.2, seed=3)
    n = d.data.shape[0]
    n_test = round(0.2 * n)
    n_val = round(0.1 * (n - n_test))
    assert (meta["n_test"], meta["n_val"], meta["n_train"]) == (n_test, n_val, n - n_test - n_val)
    assert meta["name"] == "digits" and meta["n_classes"] == 10 and meta["input_dim"] == 64
    assert meta["seed"] == 3 and meta["val_fraction"] == 0.1 and meta["test_split"] == "carved"

    raw = torch.load(out, weights_only=True)
    tr, va, te = (raw[k].numpy() for k in ("train_idx", "val_idx", "test_idx"))
    assert len(set(tr) & set(va)) == 0 and len(set(tr) & set(te)) == 0
    assert len(set(va) & set(te)) == 0
    assert len(tr) + len(va) == n - n_test
    assert sorted(np.concatenate([tr, va, te]).tolist()) == list(range(n))

    s = load(out)
    assert isinstance(s, Splits)
    assert s.train_x.shape == (len(tr), 64) and s.train_x.dtype == torch.float32
    assert s.train_y.dtype == torch.int64
    for x, y, idx in ((s.train_x, s.train_y, tr), (s.val_x, s.val_y, va), (s.test_x, s.test_y, te)):
        ref = _reference_standardize(d.data[idx], d.data[tr], per_feature=True)
        np.testing.assert_allclose(x.numpy(), ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(y.numpy(), d.target[idx])
    assert s.train_x.mean(0).abs().max() < 1e-5
    varying = d.data[tr].std(axis=0) > 0
    np.testing.assert_allclose(s.train_x.std(0, correction=0).numpy()[varying], 1, atol=1e-4)
    assert s.val_x.mean(0).abs().max() > 1e-3  # val is not standardized with its own stats


def test_prepare_digits_deterministic(tmp_path: Path) -> None:
    def run(seed: int, tag: str) -> dict:
        prepare("digits", tmp_path / "raw", tmp_path / f"{tag}.pt", seed=seed)
        return torch.load(tmp_path / f"{tag}.pt", weights_only=True)

    a, b, c = run(0, "a"), run(0, "b"), run(1, "c")
    keys = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y", "val_idx", "test_idx")
    for k in keys:
        assert torch.equal(a[k], b[k]), k
    assert a["meta"] == b["meta"]
    assert not torch.equal(a["val_idx"], c["val_idx"])
    assert not torch.equal(a["test_idx"], c["test_idx"])


def test_prepare_rejects_bad_fractions(tmp_path: Path) -> None:
    for kw in ({"val_fraction": 1.0}, {"val_fraction": -0.1}, {"test_fraction": 0.0}):
        with pytest.raises(ValueError, match="fraction"):
            prepare("digits", tmp_path / "raw", tmp_path / "d.pt", **kw)


# ---------------------------------------------------------------- prepare: fake MNIST


def _fake_mnist(mirror: Path) -> tuple[DatasetSpec, dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    arrays = {
        "train_images": rng.integers(0, 256, size=(50, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, size=(50,), dtype=np.uint8),
        "test_images": rng.integers(0, 256, size=(20, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, size=(20,), dtype=np.uint8),
    }
    base = DATASETS["mnist"]
    sub = mirror / base.subdir
    sub.mkdir(parents=True)
    files = []
    for f in base.files:
        path = write_idx(sub / f.name, arrays[f.role], gz=True)
        files.append(replace(f, md5=md5(path.read_bytes())))
    return replace(base, files=tuple(files)), arrays


def test_prepare_fake_mnist_from_mirror(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    spec, arr = _fake_mnist(mirror)
    raw, out = tmp_path / "raw", tmp_path / "mnist.pt"
    meta = prepare(spec, raw, out, mirror=mirror, val_fraction=0.2, seed=0, download=False)
    assert (meta["n_train"], meta["n_val"], meta["n_test"]) == (40, 10, 20)
    assert meta["input_dim"] == 784 and meta["test_split"] == "official"
    assert meta["md5"] == {f.name: f.md5 for f in spec.files}
    assert sorted(p.name for p in raw.iterdir()) == sorted(f.name for f in spec.files)

    s = load(out)
    raw_obj = torch.load(out, weights_only=True)
    tr, va = raw_obj["train_idx"].numpy(), raw_obj["val_idx"].numpy()
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(50))
    assert raw_obj["test_idx"].tolist() == list(range(20))  # official test set, in order
    x_all = arr["train_images"].reshape(50, -1)
    x_test = arr["test_images"].reshape(20, -1)
    for x, ref in ((s.train_x, x_all[tr]), (s.val_x, x_all[va]), (s.test_x, x_test)):
        expect = _reference_standardize(ref, x_all[tr], per_feature=False)
        np.testing.assert_allclose(x.numpy(), expect, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(s.train_y.numpy(), arr["train_labels"][tr])
    np.testing.assert_array_equal(s.val_y.numpy(), arr["train_labels"][va])
    np.testing.assert_array_equal(s.test_y.numpy(), arr["test_labels"])
    assert abs(s.train_x.mean().item()) < 1e-5
    assert abs(s.train_x.std(correction=0).item() - 1) < 1e-5


def test_prepare_fake_mnist_rejects_bad_labels(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    spec, _ = _fake_mnist(mirror)
    bad = write_idx(
        mirror / spec.subdir / "t10k-labels-idx1-ubyte.gz",
        np.full((20,), 10, dtype=np.uint8),
        gz=True,
    )
    files = tuple(
        replace(f, md5=md5(bad.read_bytes())) if f.role == "test_labels" else f for f in spec.files
    )
    spec = replace(spec, files=files)
    with pytest.raises(ValueError, match="labels outside"):
        prepare(spec, tmp_path / "raw", tmp_path / "m.pt", mirror=mirror, download=False)
    assert not (tmp_path / "m.pt").exists()


# ---------------------------------------------------------------- safe_extract


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return path


def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info


_BAD_MEMBERS = {
    "dotdot": [(_info("../evil"), b"x")],
    "nested dotdot": [(_info("d/../../evil"), b"x")],
    "absolute": [(_info("/tmp/optlab-evil-abs"), b"x")],
    "symlink out": [(_info("link", tarfile.SYMTYPE, "../../outside"), None)],
    "absolute symlink": [(_info("link", tarfile.SYMTYPE, "/etc/passwd"), None)],
    "hardlink out": [(_info("hl", tarfile.LNKTYPE, "../outside"), None)],
    "through link": [
        (_info("a", tarfile.SYMTYPE, "."), None),
        (_info("a/b", tarfile.SYMTYPE, ".."), None),
        (_info("a/b/evil"), b"x"),
    ],
    "char device": [(_info("dev", tarfile.CHRTYPE), None)],
    "fifo": [(_info("fifo", tarfile.FIFOTYPE), None)],
}


@pytest.mark.parametrize("case", list(_BAD_MEMBERS))
def test_safe_extract_refuses(tmp_path: Path, case: str) -> None:
    work = tmp_path / "work"
    dest = work / "dest"
    dest.mkdir(parents=True)
    tar = _tar(tmp_path / "bad.tar.gz", [(_info("benign.txt"), b"ok"), *_BAD_MEMBERS[case]])
    with pytest.raises(ValueError, match="refusing"):
        safe_extract(tar, dest)
    assert list(dest.iterdir()) == []  # nothing extracted, not even the benign member
    assert sorted(p.name for p in work.iterdir()) == ["dest"]
    assert not Path("/tmp/optlab-evil-abs").exists()


def test_safe_extract_benign(tmp_path: Path) -> None:
    tar = _tar(
        tmp_path / "ok.tar.gz",
        [
            (_info("pkg", tarfile.DIRTYPE), None),
            (_info("pkg/data.txt"), b"payload"),
            (_info("pkg/alias", tarfile.SYMTYPE, "data.txt"), None),
            (_info("pkg/hard", tarfile.LNKTYPE, "pkg/data.txt"), None),
        ],
    )
    dest = tmp_path / "dest"
    paths = safe_extract(tar, dest)
    root = Path(os.path.realpath(dest))
    assert paths == [root / "pkg", root / "pkg/data.txt", root / "pkg/alias", root / "pkg/hard"]
    assert (dest / "pkg/data.txt").read_bytes() == b"payload"
    assert (dest / "pkg/alias").is_symlink()
    assert (dest / "pkg/alias").read_bytes() == b"payload"
    assert (dest / "pkg/hard").read_bytes() == b"payload"


# ---------------------------------------------------------------- load


def _six() -> dict[str, torch.Tensor]:
    return {
        "train_x": torch.zeros(4, 3),
        "train_y": torch.zeros(4, dtype=torch.int64),
        "val_x": torch.ones(2, 3),
        "val_y": torch.ones(2, dtype=torch.int64),
        "test_x": torch.full((1, 3), 2.0),
        "test_y": torch.full((1,), 2, dtype=torch.int64),
    }


class _Evil:
    """Unpickling this calls os.mkdir(marker): only possible without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_load_roundtrip_and_missing(tmp_path: Path) -> None:
    path = tmp_path / "p.pt"
    torch.save({**_six(), "meta": {"n_classes": 3, "input_dim": 3}}, path)
    s = load(path, device="cpu")
    assert s.n_classes == 3 and s.input_dim == 3
    for k, v in _six().items():
        assert torch.equal(getattr(s, k), v)
    assert s.split("val")[0] is s.val_x
    with pytest.raises(DatasetMissingError, match="dvc repro prepare"):
        load(tmp_path / "absent.pt")


def test_load_is_weights_only(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({**_six(), "meta": {"evil": _Evil(marker)}}, path)
    with pytest.raises(ValueError, match="weights-only"):
        load(path)
    assert not marker.exists()
    # The file really runs code when unpickled without weights_only: the check above matters.
    torch.load(path, weights_only=False)
    assert marker.exists()


# ---------------------------------------------------------------- batch_indices


def test_batch_indices_epoch() -> None:
    gen = torch.Generator().manual_seed(5)
    batches = list(batch_indices(10, 3, gen, "cpu"))
    assert [b.numel() for b in batches] == [3, 3, 3, 1]
    assert all(b.dtype == torch.int64 for b in batches)
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.cat(batches), expected)
    # the generator advances: the next epoch is a different permutation of the same indices
    nxt = torch.cat(list(batch_indices(10, 3, gen)))
    assert sorted(nxt.tolist()) == list(range(10)) and not torch.equal(nxt, expected)
    assert list(batch_indices(0, 4, gen)) == []
    assert [b.numel() for b in batch_indices(8, 4, gen)] == [4, 4]
    with pytest.raises(ValueError):
        next(batch_indices(5, 0, gen))
