"""The lab's data loaders: the strict IDX reader on crafted files, the digits split, and the real MNIST sample."""

import functools
import gzip
import contextlib
import http.server
import os
import re
import shutil
import socket
import struct
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from normkit.lab import data
from normkit.lab.data import DataError, load_dataset, read_idx, read_idx_split, write_idx


def write_dataset(directory, train=20, test=10, compress=True, side=28):
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    for part, count in (("train", train), ("test", test)):
        images_stem, labels_stem = data.IDX_FILES[part]
        write_idx(directory / (images_stem + suffix), rng.integers(0, 256, (count, side, side), dtype=np.uint8))
        write_idx(directory / (labels_stem + suffix), rng.integers(0, 10, count, dtype=np.uint8))
    return directory


@pytest.mark.parametrize("compress", [True, False])
def test_idx_round_trip(tmp_path, compress):
    array = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    path = tmp_path / ("images" + (".gz" if compress else ""))
    write_idx(path, array)
    np.testing.assert_array_equal(read_idx(path, data.IDX_IMAGES_MAGIC), array)


def test_load_good_dataset_any_size(tmp_path):
    write_dataset(tmp_path / "mnist", train=37, test=5)
    splits = load_dataset("mnist", tmp_path)  # DIR/<dataset>/ is found from DIR
    images, labels = splits.train
    assert images.shape == (37, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (37,) and labels.dtype == torch.int64
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert splits.test[0].shape == (5, 1, 28, 28)


def test_uncompressed_files_in_dir_itself(tmp_path, monkeypatch):
    write_dataset(tmp_path, compress=False)
    monkeypatch.setenv("NORMKIT_DATA", str(tmp_path))
    assert load_dataset("fashion-mnist").train[0].shape[0] == 20


def test_truncated_file_names_file_and_sizes(tmp_path):
    write_dataset(tmp_path, compress=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: truncated: header says shape \(20, 28, 28\)"):
        load_dataset("mnist", tmp_path)


def test_trailing_bytes_are_refused(tmp_path):
    write_dataset(tmp_path, compress=False)
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes() + bytes(3))  # 20 labels, then 3 bytes the header does not account for
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: has trailing bytes: header says shape \(20,\) = "
                                        r"20 bytes of data, file has 23"):
        load_dataset("mnist", tmp_path)


def test_a_header_with_huge_sizes_says_how_many_bytes(tmp_path):
    write_dataset(tmp_path, compress=False)
    side = 2**32 - 1
    (tmp_path / "train-images-idx3-ubyte").write_bytes(struct.pack(">HBB3I", 0, 8, 3, side, side, side) + bytes(10))
    with pytest.raises(DataError, match=rf"truncated: header says shape \({side}, {side}, {side}\) = {side**3} bytes"):
        load_dataset("mnist", tmp_path)


def test_a_file_without_images_is_refused(tmp_path):
    write_dataset(tmp_path, compress=False)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((0, 28, 28), dtype=np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(0, dtype=np.uint8))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte: holds no images"):
        load_dataset("mnist", tmp_path)


def test_a_gzip_file_without_the_gz_name_is_read_as_gzip(tmp_path):
    """A compressed file saved under the uncompressed name holds the same array (its bytes start as gzip)."""
    array = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    write_idx(tmp_path / "images.gz", array)
    (tmp_path / "images.gz").rename(tmp_path / "train-images-idx3-ubyte")
    np.testing.assert_array_equal(read_idx(tmp_path / "train-images-idx3-ubyte", data.IDX_IMAGES_MAGIC), array)


def test_truncated_gzip_stream(tmp_path):
    write_dataset(tmp_path)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:15])
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: cannot be read as gzip"):
        load_dataset("mnist", tmp_path)


def test_wrong_magic(tmp_path):
    write_dataset(tmp_path, compress=False)
    path = tmp_path / "train-labels-idx1-ubyte"
    raw = bytearray(path.read_bytes())
    raw[0:4] = struct.pack(">I", 0x12345678)
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte: magic number 0x12345678 is not an IDX"):
        load_dataset("mnist", tmp_path)


def test_swapped_images_and_labels(tmp_path):
    write_dataset(tmp_path, compress=False)
    images, labels = tmp_path / "train-images-idx3-ubyte", tmp_path / "train-labels-idx1-ubyte"
    content = images.read_bytes()
    images.write_bytes(labels.read_bytes())
    labels.write_bytes(content)
    with pytest.raises(DataError, match="magic number 0x00000801, expected 0x00000803"):
        load_dataset("mnist", tmp_path)


def test_a_file_of_other_dimensions_is_not_called_a_swap(tmp_path):
    """A 4-dimensional uint8 IDX file (magic 0x00000804) where images belong is neither images nor labels: the
    error must not suggest swapping the image and label files, which would not help."""
    write_dataset(tmp_path, compress=False)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((20, 28, 28, 1), dtype=np.uint8))
    with pytest.raises(DataError, match="magic number 0x00000804, expected 0x00000803") as refusal:
        load_dataset("mnist", tmp_path)
    assert "swapped" not in str(refusal.value) and "4 dimensions" in str(refusal.value)


def test_a_data_dir_that_is_a_file_is_called_one(tmp_path, monkeypatch):
    """NORMKIT_DATA or --data-dir naming a file: the error says so, rather than that the path does not exist."""
    afile = tmp_path / "train-images-idx3-ubyte.gz"
    afile.write_bytes(b"")
    monkeypatch.setenv("NORMKIT_DATA", str(afile))
    with pytest.raises(DataError, match="is a file, not a folder"):
        load_dataset("mnist")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("mnist", tmp_path / "missing")


@contextlib.contextmanager
def _unprivileged_folder():
    """A folder anyone may traverse, and a context in which file permissions apply: root reads every file, so
    under root the block runs with the effective uid of `nobody` (the real uid stays 0, which takes it back)."""
    folder = Path(tempfile.mkdtemp(prefix="normkit-permissions-"))  # (pytest's tmp_path is 0700: nobody cannot enter)
    folder.chmod(0o755)

    @contextlib.contextmanager
    def unprivileged():
        if not hasattr(os, "geteuid") or os.geteuid() != 0:
            yield
            return
        try:
            os.seteuid(65534)
        except PermissionError:  # (a container without CAP_SETUID: root reads every file, nothing to test)
            pytest.skip("running as root without the right to switch to an unprivileged user")
        try:
            yield
        finally:
            os.seteuid(0)
    try:
        yield folder, unprivileged
    finally:
        for path in folder.rglob("*"):
            path.chmod(0o755)
        shutil.rmtree(folder)


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")
def test_an_unreadable_file_or_folder_is_called_one_not_a_malformed_file():
    """A file the user may not read is a permission problem, not "a truncated or malformed file; fetch it
    again"; a folder that cannot be searched is a DataError naming it, not a bare PermissionError."""
    with _unprivileged_folder() as (folder, unprivileged):
        for name in ("gz", "plain"):
            write_dataset(folder / name / "mnist", compress=name == "gz")
            for path in (folder / name, folder / name / "mnist", *(folder / name / "mnist").iterdir()):
                path.chmod(0o755 if path.is_dir() else 0o644)
        (folder / "gz" / "mnist" / "t10k-labels-idx1-ubyte.gz").chmod(0)
        (folder / "plain" / "mnist" / "train-images-idx3-ubyte").chmod(0)
        with unprivileged():
            for name, unreadable in (("gz", "t10k-labels-idx1-ubyte.gz"), ("plain", "train-images-idx3-ubyte")):
                with pytest.raises(DataError, match=rf"mnist/{unreadable}: cannot be read \(permission denied") as refused:
                    load_dataset("mnist", folder / name)
                assert "malformed" not in str(refused.value) and "fetch it again" not in str(refused.value)
        (folder / "gz" / "mnist").chmod(0o700)  # DIR/mnist exists but cannot be searched
        (folder / "plain").chmod(0o700)  # the data dir itself cannot be searched
        with unprivileged():
            with pytest.raises(DataError, match=rf"mnist: cannot look for train-images-idx3-ubyte\[\.gz\] in "
                                                rf"{folder / 'gz' / 'mnist'} \(permission denied"):
                load_dataset("mnist", folder / "gz")
            with pytest.raises(DataError, match=rf"mnist: data directory {folder / 'plain'} cannot be read "
                                                rf"\(permission denied"):
                load_dataset("mnist", folder / "plain")


def test_a_gzip_and_a_plain_copy_must_agree(tmp_path):
    """`gunzip -k` leaves both train-labels-idx1-ubyte and train-labels-idx1-ubyte.gz: the same data is read
    alike, while two copies that differ (a stale plain file beside the .gz `normkit download` verified) are
    refused, naming both, instead of one silently shadowing the other."""
    write_dataset(tmp_path)
    expected = load_dataset("mnist", tmp_path)
    gz = tmp_path / "train-labels-idx1-ubyte.gz"
    plain = tmp_path / "train-labels-idx1-ubyte"
    plain.write_bytes(gzip.decompress(gz.read_bytes()))
    splits = load_dataset("mnist", tmp_path)
    assert torch.equal(splits.train[1], expected.train[1]) and torch.equal(splits.train[0], expected.train[0])
    labels = read_idx(gz, data.IDX_LABELS_MAGIC)
    other = labels.copy()
    other[0] = (other[0] + 1) % 10
    write_idx(plain, other)
    with pytest.raises(DataError, match=f"{re.escape(str(plain))} and {re.escape(str(gz))} both exist but hold "
                                        "different data"):
        load_dataset("mnist", tmp_path)
    plain.unlink()
    # split_test_set reads the t10k files the same way.
    test_labels = tmp_path / "t10k-labels-idx1-ubyte"
    write_idx(test_labels, np.zeros(10, dtype=np.uint8))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte and .*t10k-labels-idx1-ubyte.gz both exist"):
        data.split_test_set(tmp_path, tmp_path / "split", train_count=5)
    assert not (tmp_path / "split").exists()


def test_count_mismatch(tmp_path):
    write_dataset(tmp_path, compress=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(19, dtype=np.uint8))
    with pytest.raises(DataError, match="holds 20 images but .* holds 19 labels"):
        load_dataset("mnist", tmp_path)


def test_missing_file_is_named(tmp_path):
    write_dataset(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"missing file .*t10k-images-idx3-ubyte\[\.gz\].*normkit download mnist"):
        load_dataset("mnist", tmp_path)


def test_a_missing_file_error_says_what_stands_in_its_place(tmp_path):
    """Where the file is not found, the error says what is there: a symbolic link whose target is gone, a folder
    under the file's name, or the file under a classic mirror's variant of its name (Kaggle's dotted
    ``train-images.idx3-ubyte``, an upper-case copy), which the reader does not take."""
    write_dataset(tmp_path / "link")
    gone = tmp_path / "link" / "t10k-images-idx3-ubyte.gz"
    gone.rename(tmp_path / "elsewhere.gz")
    gone.symlink_to(tmp_path / "moved.gz")
    with pytest.raises(DataError, match=r"missing file .*t10k-images-idx3-ubyte\[\.gz\] \(t10k-images-idx3-ubyte.gz "
                                        rf"is a symbolic link to {re.escape(str(tmp_path / 'moved.gz'))}, which does "
                                        r"not exist\)"):
        load_dataset("mnist", tmp_path / "link")
    (tmp_path / "elsewhere.gz").rename(tmp_path / "moved.gz")  # the link is good again
    assert load_dataset("mnist", tmp_path / "link").test[0].shape == (10, 1, 28, 28)

    write_dataset(tmp_path / "folder")
    (tmp_path / "folder" / "train-labels-idx1-ubyte.gz").unlink()
    (tmp_path / "folder" / "train-labels-idx1-ubyte.gz").mkdir()
    with pytest.raises(DataError, match=r"missing file .*train-labels-idx1-ubyte\[\.gz\] \(train-labels-idx1-ubyte.gz "
                                        r"is a folder, not a file\)"):
        load_dataset("mnist", tmp_path / "folder")

    mirror = write_dataset(tmp_path / "kaggle", compress=False)
    for path in list(mirror.iterdir()):
        path.rename(mirror / path.name.replace("-idx", ".idx"))  # train-images.idx3-ubyte, ...
    labels = mirror / "T10K-LABELS.IDX1-UBYTE.GZ"  # an upper-case gzip copy
    labels.write_bytes(gzip.compress((mirror / "t10k-labels.idx1-ubyte").read_bytes()))
    (mirror / "t10k-labels.idx1-ubyte").unlink()
    with pytest.raises(DataError, match=r"missing file .*train-images-idx3-ubyte\[\.gz\] \(found "
                                        r"train-images.idx3-ubyte: rename it train-images-idx3-ubyte,"):
        load_dataset("mnist", mirror)
    (mirror / "t10k-images.idx3-ubyte").rename(mirror / "t10k-images-idx3-ubyte")
    with pytest.raises(DataError, match=r"\(found T10K-LABELS.IDX1-UBYTE.GZ: rename it t10k-labels-idx1-ubyte.gz,"):
        data.load_test_split("mnist", mirror)
    (mirror / "train-images.idx3-ubyte").rename(mirror / "train-images-idx3-ubyte")
    (mirror / "train-labels.idx1-ubyte").rename(mirror / "TRAIN_LABELS.IDX1-UBYTE.GZ")  # .GZ, yet plain bytes
    with pytest.raises(DataError, match=r"\(found TRAIN_LABELS.IDX1-UBYTE.GZ: rename it train-labels-idx1-ubyte, "):
        read_idx_split(mirror, "train", "mnist")
    (mirror / "TRAIN_LABELS.IDX1-UBYTE.GZ").rename(mirror / "train-labels.idx1-ubyte")
    # Following the advice gives a folder the reader takes.
    (mirror / "T10K-LABELS.IDX1-UBYTE.GZ").rename(mirror / "t10k-labels-idx1-ubyte.gz")
    (mirror / "train-labels.idx1-ubyte").rename(mirror / "train-labels-idx1-ubyte")
    assert load_dataset("mnist", mirror).train[0].shape == (20, 1, 28, 28)


def test_no_data_dir(monkeypatch):
    monkeypatch.delenv("NORMKIT_DATA", raising=False)
    with pytest.raises(DataError, match="pass --data-dir DIR or set NORMKIT_DATA"):
        load_dataset("kmnist")


def test_empty_normkit_data_counts_as_unset(tmp_path, monkeypatch):
    write_dataset(tmp_path, compress=False)
    monkeypatch.chdir(tmp_path)  # "" is not the current folder
    monkeypatch.setenv("NORMKIT_DATA", "")
    with pytest.raises(DataError, match="no data directory; pass --data-dir DIR or set NORMKIT_DATA"):
        load_dataset("mnist")


def copy_test_files(source: Path, target: Path) -> Path:
    """``target`` holding only the t10k files of ``source``, as the shared MNIST sample folder does."""
    target.mkdir(parents=True)
    for path in source.glob("t10k-*"):
        (target / path.name).write_bytes(path.read_bytes())
    return target


def test_the_test_split_alone_reads_only_the_test_files(tmp_path):
    full = write_dataset(tmp_path / "full" / "mnist", train=20, test=10)
    expected = load_dataset("mnist", tmp_path / "full").test
    only_test = copy_test_files(full, tmp_path / "only-test" / "mnist")
    for folder in (tmp_path / "full", tmp_path / "only-test"):
        images, labels = data.load_test_split("mnist", folder)
        assert torch.equal(images, expected[0]) and torch.equal(labels, expected[1])
    # A damaged training file: training refuses it, evaluation never opens it.
    (full / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: cannot be read as gzip"):
        load_dataset("mnist", tmp_path / "full")
    assert torch.equal(data.load_test_split("mnist", tmp_path / "full")[0], expected[0])
    with pytest.raises(DataError, match="missing file .*train-images-idx3-ubyte"):
        load_dataset("mnist", tmp_path / "only-test")  # training still needs both splits
    (only_test / "t10k-labels-idx1-ubyte.gz").unlink()
    # The hint lists the two files evaluation needs, not the four of training.
    with pytest.raises(DataError, match=r"missing file .*t10k-labels-idx1-ubyte\[\.gz\].* put the two IDX files "
                                        r"\(t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, gzip or not\)"):
        data.load_test_split("mnist", tmp_path / "only-test")


def test_a_folder_of_test_files_only_says_how_to_split_it(tmp_path, monkeypatch):
    # The shared MNIST sample holds the 10,000 t10k images only: training's error gives the command that makes
    # a train/test pair of them (train = the first 8,000), and following it gives a folder training reads.
    source = copy_test_files(write_dataset(tmp_path / "full", train=3, test=8010), tmp_path / "sample")
    images, labels = read_idx_split(source, "test", "mnist", ("test",))
    with pytest.raises(DataError, match="test files only") as refused:
        load_dataset("mnist", source)
    command = re.search(r'`python -c "(.*?)"`', str(refused.value)).group(1)
    monkeypatch.setenv("HOME", str(tmp_path))
    exec(command.replace("DIR/", "~/split/"), {})  # (lab.md's form: a folder under ~)
    splits = load_dataset("mnist", tmp_path / "split")
    assert torch.equal(splits.train[1], torch.from_numpy(labels[:8000].astype(np.int64)))
    assert torch.equal(splits.test[0], torch.tensor(images[8000:]).float().div(255).unsqueeze(1))
    (source / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="missing file .*train-images") as refused:
        load_dataset("mnist", source)
    assert "test files only" not in str(refused.value)  # the hint is for a folder with both test files


def test_splitting_a_folder_into_itself_is_refused_and_keeps_its_files(tmp_path):
    """split_test_set(DIR, DIR) would overwrite DIR's t10k files with the split's last images: the 10,000-image
    sample (plain files here, as after gunzip) would be lost. It is refused, whichever spelling names DIR."""
    sample = write_dataset(tmp_path / "sample", train=3, test=30, compress=False)
    for name in [path.name for path in sample.glob("train-*")]:
        (sample / name).unlink()
    before = {path.name: path.read_bytes() for path in sample.iterdir()}
    (tmp_path / "alias").symlink_to(sample)
    for target in (sample, tmp_path / "alias", sample / ".." / "sample"):
        with pytest.raises(DataError, match="is the source folder"):
            data.split_test_set(sample, target, train_count=20)
        assert {path.name: path.read_bytes() for path in sample.iterdir()} == before
    data.split_test_set(sample, tmp_path / "split", train_count=20)  # another folder is fine
    assert load_dataset("mnist", tmp_path / "split").test[0].shape == (10, 1, 28, 28)


def test_the_digits_test_split_alone_is_the_documented_one():
    images, labels = data.load_test_split("digits")
    expected = data.load_digits_28().test
    assert images.shape == (360, 1, 28, 28)
    assert torch.equal(images, expected[0]) and torch.equal(labels, expected[1])


def test_digits_fixed_split():
    first, second = data.load_digits_28(), data.load_digits_28()
    assert first.train[0].shape == (1437, 1, 28, 28) and first.test[0].shape == (360, 1, 28, 28)
    assert torch.equal(first.test[1], second.test[1])  # the documented split never moves
    assert 0.0 <= first.train[0].min() and first.train[0].max() <= 1.0
    assert torch.bincount(first.test[1]).min() >= 35  # stratified: every digit is in the test set


def _bilinear_half_pixel(size_in, size_out):
    """The (size_out, size_in) matrix of bilinear resizing with half-pixel centers (PIL's and OpenCV's rule):
    output pixel i samples source coordinate (i + 0.5) * size_in / size_out - 0.5, clamped to the image."""
    matrix = np.zeros((size_out, size_in))
    for i in range(size_out):
        source = min(max((i + 0.5) * size_in / size_out - 0.5, 0.0), size_in - 1.0)
        low = int(np.floor(source))
        high, fraction = min(low + 1, size_in - 1), source - low
        matrix[i, low] += 1.0 - fraction
        matrix[i, high] += fraction
    return matrix


def test_digits_are_their_8x8_sources_resized_bilinearly():
    splits = data.load_digits_28()
    resize = _bilinear_half_pixel(8, 28)
    for (images, _), source in zip((splits.train, splits.test), splits.sources, strict=True):
        expected = np.einsum("ia,nab,jb->nij", resize, source[:40].astype(np.float64) / 16.0, resize)
        np.testing.assert_allclose(images[:40, 0].numpy(), expected, rtol=0, atol=1e-6)


@pytest.fixture
def file_server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/served: (base URL, folder)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", served
    finally:
        server.shutdown()
        server.server_close()


def _closed_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # closed when the with-block ends: connections are refused


def _flat_idx_folder(flat: Path) -> Path:
    """A folder with the four IDX files straight in it (20 train, 10 test images), no DIR/mnist/ below."""
    for part, count in (("train", 20), ("test", 10)):
        write_idx(flat / data.IDX_FILES[part][0], np.full((count, 28, 28), 7, dtype=np.uint8))
        write_idx(flat / data.IDX_FILES[part][1], np.arange(count, dtype=np.uint8) % 10)
    return flat


def test_download_without_network_says_where_files_go(tmp_path, monkeypatch):
    monkeypatch.setitem(data.DOWNLOADS, "mnist", dict(data.DOWNLOADS["mnist"],
                                                      mirrors=(f"http://127.0.0.1:{_closed_port()}/",)))
    with pytest.raises(DataError, match=r"could not download train-images-idx3-ubyte.gz .*copy the canonical files"):
        data.download("mnist", tmp_path / "data", timeout=5)
    assert not list((tmp_path / "data").rglob("*.gz"))


def test_a_failed_download_leaves_no_folder_that_hides_the_files_beside_it(tmp_path, monkeypatch):
    """IDX files straight in DIR, then a download that fails (offline): it left an empty DIR/mnist/, which the reader
    takes before DIR, so the runs on DIR's files stopped with "missing file DIR/mnist/..."."""
    monkeypatch.setitem(data.DOWNLOADS, "mnist", dict(data.DOWNLOADS["mnist"],
                                                      mirrors=(f"http://127.0.0.1:{_closed_port()}/",)))
    flat = _flat_idx_folder(tmp_path / "flat")
    before = load_dataset("mnist", flat)
    with pytest.raises(DataError, match="could not download"):
        data.download("mnist", flat, timeout=5)
    assert not (flat / "mnist").exists()
    assert torch.equal(load_dataset("mnist", flat).train[0], before.train[0])
    # Folders above it that the download made go too; folders that were there stay.
    with pytest.raises(DataError, match="could not download"):
        data.download("mnist", tmp_path / "new" / "data", timeout=5)
    assert not (tmp_path / "new").exists() and tmp_path.is_dir()


def test_a_download_stopped_half_way_names_the_complete_files_beside_it(tmp_path, monkeypatch, file_server):
    """A download that fetched one file and failed on the next keeps the verified file in DIR/mnist/, which the reader
    takes before DIR: a run on the complete set in DIR must not stop at a bare "missing file" in DIR/mnist/."""
    url, served = file_server
    payloads = {name: gzip.compress(name.encode(), mtime=0) for name in data.DOWNLOADS["mnist"]["md5"]}
    first = next(iter(payloads))
    (served / first).write_bytes(payloads[first])  # the server has the first file only
    monkeypatch.setitem(data.DOWNLOADS, "mnist", {"mirrors": (url,), "md5": {k: data._md5(v) for k, v in payloads.items()}})
    flat = _flat_idx_folder(tmp_path / "flat")
    before = load_dataset("mnist", flat)
    with pytest.raises(DataError, match="could not download"):
        data.download("mnist", flat, timeout=5)
    assert [path.name for path in (flat / "mnist").iterdir()] == [first]  # kept: a retry fetches the rest only
    with pytest.raises(DataError, match=rf"missing file {re.escape(str(flat / 'mnist'))}/.*holds only part of the "
                                        rf"files.*`normkit download mnist --data-dir {re.escape(str(flat))}`.*remove "
                                        rf"{re.escape(str(flat / 'mnist'))} to read the files in {re.escape(str(flat))}"):
        load_dataset("mnist", flat)
    (flat / "mnist" / first).unlink()
    (flat / "mnist").rmdir()  # the remedy it names
    assert torch.equal(load_dataset("mnist", flat).train[0], before.train[0])


def test_download_into_a_file_or_an_impossible_folder_is_refused_before_any_fetch(tmp_path, monkeypatch):
    # A mirror that would fail is never asked: the folder is refused first, and the file is left alone.
    monkeypatch.setitem(data.DOWNLOADS, "mnist", dict(data.DOWNLOADS["mnist"],
                                                      mirrors=(f"http://127.0.0.1:{_closed_port()}/",)))
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for data_dir in (afile, afile / "under"):
        with pytest.raises(DataError, match=f"--data-dir {data_dir}: {afile} is a file, not a folder") as refused:
            data.download("mnist", data_dir, timeout=5)
        assert "could not download" not in str(refused.value)
    assert afile.read_text() == "keep me"
    if Path("/proc/self").is_dir():  # (Linux: no folder can be made in /proc, not even by root)
        with pytest.raises(DataError, match="--data-dir /proc/normkit: cannot create /proc/normkit/mnist"):
            data.download("mnist", "/proc/normkit", timeout=5)


def test_a_transfer_cut_short_is_a_failed_mirror(tmp_path, monkeypatch):
    """A server that promises more bytes than it sends (http.client.IncompleteRead, not an OSError): the mirror
    counts as failed, the error says where the files go, and nothing is written."""

    class CutShort(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"\x1f\x8b only part")
            self.wfile.flush()
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CutShort)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setitem(data.DOWNLOADS, "mnist", dict(data.DOWNLOADS["mnist"],
                                                          mirrors=(f"http://127.0.0.1:{server.server_address[1]}/",)))
        with pytest.raises(DataError, match=r"could not download train-images-idx3-ubyte.gz .*IncompleteRead.*"
                                            r"copy the canonical files"):
            data.download("mnist", tmp_path / "data", timeout=5)
    finally:
        server.shutdown()
        server.server_close()
    assert not list((tmp_path / "data").rglob("*.gz"))


def test_download_verifies_checksum_and_keeps_good_files(tmp_path, monkeypatch, file_server):
    url, served = file_server
    payloads = {name: gzip.compress(name.encode(), mtime=0) for name in data.DOWNLOADS["kmnist"]["md5"]}
    for name, payload in payloads.items():
        (served / name).write_bytes(payload)
    # A dead mirror first, then the live one: the download falls through to the mirror that works.
    monkeypatch.setitem(data.DOWNLOADS, "kmnist", {"mirrors": (f"http://127.0.0.1:{_closed_port()}/", url),
                                                   "md5": {k: data._md5(v) for k, v in payloads.items()}})
    target = data.download("kmnist", tmp_path / "data", timeout=5)
    assert sorted(p.name for p in target.iterdir()) == sorted(payloads)
    assert all((target / name).read_bytes() == payload for name, payload in payloads.items())
    for name in payloads:  # the server now hands out tampered files
        (served / name).write_bytes(b"tampered")
    assert data.download("kmnist", tmp_path / "data", timeout=5) == target  # verified files are not fetched again
    (target / "t10k-images-idx3-ubyte.gz").write_bytes(b"corrupt")
    with pytest.raises(DataError, match="checksum"):
        data.download("kmnist", tmp_path / "data", timeout=5)
    assert (target / "t10k-images-idx3-ubyte.gz").read_bytes() == b"corrupt"  # a bad download replaces nothing


def test_real_mnist_sample(mnist_split_dir):
    splits = load_dataset("mnist", mnist_split_dir)
    assert splits.train[0].shape == (8000, 1, 28, 28) and splits.test[0].shape == (2000, 1, 28, 28)
    assert set(splits.test[1].unique().tolist()) == set(range(10))
    # MNIST digits are white on black: mostly zeros, some full-intensity strokes.
    assert 0.7 < (splits.train[0] == 0).float().mean() < 0.9 and splits.train[0].max() == 1.0


def test_real_shared_files_read_directly():
    shared = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "mnist"
    if not (shared / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real MNIST sample not found at {shared}")
    images = read_idx(shared / "t10k-images-idx3-ubyte.gz", data.IDX_IMAGES_MAGIC)
    labels = read_idx(shared / "t10k-labels-idx1-ubyte.gz", data.IDX_LABELS_MAGIC)
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # the well-known first MNIST test labels
