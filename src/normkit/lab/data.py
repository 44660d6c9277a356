"""Datasets for the lab as in-memory torch tensors: the embedded digits and MNIST-format IDX files, read strictly.

Every dataset comes back as ``Splits(train, test)`` of ``(images, labels)`` where images are float32
``(N, 1, 28, 28)`` in [0, 1] and labels int64 ``(N,)``. The validation split is taken from ``train``
by the trainer, never from ``test``.

IDX format (http://yann.lecun.com/exdb/mnist/): a big-endian header ``0x00 0x00 <dtype> <ndim>`` then
``ndim`` big-endian uint32 sizes, then the data. Images are ``0x00000803`` (uint8, 3 dims), labels
``0x00000801`` (uint8, 1 dim). Files may be gzip-compressed (``.gz``) or not.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import math
import os
import re
import struct
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = ("digits", "mnist", "fashion-mnist", "kmnist")
IMAGE_SIDE = 28

# The fixed split of scikit-learn's 1,797 digits: stratified, 20% test, seed 0 -> 1,437 train / 360 test.
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0

IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801

# Canonical IDX file names, shared by MNIST, Fashion-MNIST and KMNIST.
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# Where the canonical files live and their published MD5 checksums (the same ones torchvision verifies).
DOWNLOADS = {
    "mnist": {
        "mirrors": ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        "md5": {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    },
    "fashion-mnist": {
        "mirrors": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"),
        "md5": {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    },
    "kmnist": {
        "mirrors": ("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
        "md5": {
            "train-images-idx3-ubyte.gz": "bdb82020997e1d708af4cf47b453dcf7",
            "train-labels-idx1-ubyte.gz": "e144d726b3acfaa3e44228e80efcd344",
            "t10k-images-idx3-ubyte.gz": "5c965bf0a639b31b8f53240b1b52f4d7",
            "t10k-labels-idx1-ubyte.gz": "7320c461ea6c1c855c0b718fb2a4b134",
        },
    },
}


class DataError(ValueError):
    """A dataset file is missing, truncated or not what its name says."""


@dataclass
class Splits:
    """A dataset's training and test images (N, 1, 28, 28 float tensors in [0, 1]) and labels."""
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    # The integer images the float tensors were made from (train, test; IDX uint8 pixels, the digits' values
    # 0..16), row for row: the data fingerprint hashes these, a quarter of the float32 bytes (0.05 s for MNIST
    # instead of 0.4 s) and free of float rounding. None (splits built by hand): the tensors are hashed.
    sources: tuple[np.ndarray, np.ndarray] | None = None


# --------------------------------------------------------------------------------------------- IDX files

GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    compressed = path.suffix == ".gz"
    try:
        # A .gz name must be gzip; a file without it is read as gzip too when it starts as one (a download saved
        # under the uncompressed name), where its bytes would otherwise be called a foreign magic number.
        with open(path, "rb") as probe:
            compressed = compressed or probe.read(2) == GZIP_MAGIC
        if compressed:
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        # gzip raises EOFError for a truncated stream, BadGzipFile for a non-gzip file or a failed CRC check,
        # and zlib.error for a compressed stream whose bytes were damaged.
        raise DataError(f"{path}: cannot be read as gzip (a truncated or malformed file; fetch it again): "
                        f"{error}") from None
    except OSError as error:
        # The operating system refused the read (permissions, an I/O error): the file's bytes were never seen, so
        # nothing says it is truncated or malformed, and fetching it again would not help.
        raise DataError(f"{path}: cannot be read ({_os_reason(error)})") from None


def _os_reason(error: OSError, what: str = "the file and the folders above it") -> str:
    if isinstance(error, PermissionError):
        return f"permission denied: check the permissions of {what}"
    return error.strerror or str(error)


def read_idx(path: str | os.PathLike, expected_magic: int | None = None) -> np.ndarray:
    """Read one uint8 IDX file (gzip or not) into an array, checking its magic number and its size."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(f"{path}: {len(raw)} bytes is too short for an IDX header (needs at least 4)")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    magic = struct.unpack(">I", raw[:4])[0]
    if zero != 0 or dtype_code != 0x08 or ndim == 0:
        raise DataError(f"{path}: magic number 0x{magic:08x} is not an IDX uint8 file "
                        f"(expected 0x{expected_magic or IDX_IMAGES_MAGIC:08x})")
    if expected_magic is not None and magic != expected_magic:
        kinds = {IDX_IMAGES_MAGIC: "images", IDX_LABELS_MAGIC: "labels"}
        # Only the other kind's magic means a swap; any other dimension count is simply not this kind of file.
        hint = ("are image and label files swapped?" if magic in kinds
                else f"a uint8 IDX file of {ndim} dimensions, not {kinds.get(expected_magic, 'this kind of file')}")
        raise DataError(f"{path}: magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
                        f"({kinds.get(expected_magic, 'IDX')}); {hint}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated header ({len(raw)} bytes, {ndim} dimensions need {header})")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = math.prod(shape)  # Python ints: three sizes near 2**32 overflow int64
    available = len(raw) - header
    if available != expected:
        what = "truncated" if available < expected else "has trailing bytes"
        raise DataError(f"{path}: {what}: header says shape {tuple(shape)} = {expected} bytes of data, file has {available}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzip when the name ends in .gz), atomically."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    payload = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path = Path(path)
    if path.suffix == ".gz":
        # mtime=0: the same array always gives the same bytes.
        payload = gzip.compress(payload, mtime=0)
    atomic_write_bytes(path, payload)


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write to a temporary file beside ``path`` and rename it, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX)
    try:
        # mkstemp creates 0600 files; give the result the mode a plain open() would (0666 minus the umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        with os.fdopen(handle, "wb") as stream:
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename is None:
            # A full disk fails the write, which names no file: say which one could not be written.
            raise OSError(error.errno, f"{error.strerror} (the previous {path.name}, if any, is unchanged)",
                          str(path)) from error
        raise


TEMPORARY_SUFFIX = ".tmp"


def leftover_temporaries(folder: Path, names: tuple[str, ...]) -> list[Path]:
    """The temporaries ``atomic_write_bytes`` made for ``folder/<name>`` and never renamed (a process killed
    mid-write): exactly mkstemp's names, ``.<name>.`` + 8 characters of its alphabet + ``.tmp``, nothing else."""
    pattern = re.compile("|".join(rf"\.{re.escape(name)}\.[a-z0-9_]{{8}}{re.escape(TEMPORARY_SUFFIX)}" for name in names))
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir() if pattern.fullmatch(path.name) and path.is_file())


def _find_idx(directory: Path, stem: str, dataset: str, needed: tuple[str, ...] = tuple(IDX_FILES)) -> Path:
    """``directory/stem`` or ``stem.gz``; when missing, the error lists the files of the ``needed`` splits."""
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        try:
            if candidate.is_file():
                return candidate
        except PermissionError:
            raise DataError(f"{dataset}: cannot look for {stem}[.gz] in {directory} "
                            f"({_os_reason(PermissionError(), 'that folder and the folders above it')})") from None
    files = [name for part in needed for name in IDX_FILES[part]]
    hint = ""
    if stem in IDX_FILES["train"] and all((directory / name).is_file() or (directory / f"{name}.gz").is_file()
                                         for name in IDX_FILES["test"]):
        # The test files alone (the shared 10,000-image MNIST sample): say how to make a train/test pair of them.
        hint = (f"; this folder holds the test files only: `python -c \"from normkit.lab.data import split_test_set; "
                f"split_test_set({str(directory)!r}, 'DIR/{dataset}')\"` writes train = its first 8,000 images and "
                f"test = the rest into DIR/{dataset}/, then pass --data-dir DIR")
    parent = directory.parent
    if directory.name == dataset and all((parent / name).is_file() or (parent / f"{name}.gz").is_file()
                                         for name in files):
        # DIR/<dataset>/ is read before DIR: one a download stopped half-way (the files it verified are kept, to be
        # resumed) hid the complete set in DIR behind "missing file", with no word of where the others were.
        raise DataError(f"{dataset}: missing file {directory / stem}[.gz]; {directory} holds only part of the files "
                        f"(a download that stopped half-way?) and is read before {parent}, which holds them all: "
                        f"finish it with `normkit download {dataset} --data-dir {parent}`, or remove {directory} "
                        f"to read the files in {parent}")
    raise DataError(f"{dataset}: missing file {directory / stem}[.gz]{_near_misses(directory, stem)}; run "
                    f"`normkit download {dataset} --data-dir "
                    f"{directory.parent if directory.name == dataset else directory}` where a network is available, "
                    f"or put the {'four' if len(files) == 4 else 'two'} IDX files ({', '.join(files)}, "
                    f"gzip or not) in {directory}{hint}")


def _canonical_form(name: str) -> str:
    """A file name as the classic mirrors vary it, folded: case, ``.gz``, and ``.`` for ``-`` (Kaggle's
    ``train-images.idx3-ubyte``, Windows copies' ``TRAIN-IMAGES-IDX3-UBYTE``)."""
    name = name.lower()
    name = name[:-3] if name.endswith(".gz") else name
    return name.replace(".", "-").replace("_", "-")


def _near_misses(directory: Path, stem: str) -> str:
    """What stands in the folder where ``stem[.gz]`` was looked for, for the missing-file error: a broken symbolic
    link or a folder under the name itself, or the file under a variant of its name the reader does not take."""
    notes = []
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_symlink() and not candidate.exists():
            notes.append(f"{candidate.name} is a symbolic link to {os.readlink(candidate)}, which does not exist")
        elif candidate.is_dir():
            notes.append(f"{candidate.name} is a folder, not a file")
    try:
        variants = sorted(path.name for path in directory.iterdir() if path.name not in (stem, f"{stem}.gz")
                          and _canonical_form(path.name) == stem and path.is_file())
    except OSError:
        variants = []
    for variant in variants:
        try:
            with open(directory / variant, "rb") as probe:
                gzipped = probe.read(2) == GZIP_MAGIC
        except OSError:
            gzipped = False
        canonical = stem + (".gz" if gzipped else "")  # by its bytes: a .GZ suffix may name a plain file
        notes.append(f"found {variant}: rename it {canonical}, the reader takes the canonical names only")
    return f" ({'; '.join(notes)})" if notes else ""


def _read_found_idx(path: Path, expected_magic: int) -> np.ndarray:
    """``read_idx`` of a file ``_find_idx`` found. When the folder holds both ``stem`` and ``stem.gz`` (e.g. after
    ``gunzip -k``), both are read and must hold the same array: otherwise which one a run trained on would depend
    on a lookup order nobody sees (a stale or damaged plain copy shadowing the file ``normkit download`` verified)."""
    array = read_idx(path, expected_magic)
    twin = path.with_name(path.name + ".gz") if path.suffix != ".gz" else None
    if twin is not None and twin.is_file():
        other = read_idx(twin, expected_magic)
        if other.shape != array.shape or not np.array_equal(other, array):
            raise DataError(f"{path} and {twin} both exist but hold different data (shapes {array.shape} and "
                            f"{other.shape}); remove the wrong one (`normkit download` verifies the .gz files)")
    return array


def data_folder(data_dir: str | os.PathLike | None) -> str | os.PathLike | None:
    """The data folder to read: ``data_dir`` (--data-dir), else $NORMKIT_DATA, else None (neither is set)."""
    # An empty NORMKIT_DATA (`NORMKIT_DATA= normkit ...`) is unset, not the current folder.
    return data_dir if data_dir is not None else (os.environ.get("NORMKIT_DATA") or None)


def dataset_directory(dataset: str, data_dir: str | os.PathLike | None) -> Path:
    """``DIR/<dataset>`` when that folder exists, else ``DIR`` itself; DIR is --data-dir, else $NORMKIT_DATA."""
    root = data_folder(data_dir)
    if root is None:
        raise DataError(f"{dataset}: no data directory; pass --data-dir DIR or set NORMKIT_DATA "
                        f"(files go in DIR/{dataset}/ or DIR/; `normkit download {dataset} --data-dir DIR` fetches them)")
    root = Path(root).expanduser()
    try:
        if not root.is_dir():
            # (named by where it came from, with what to do: "data directory X does not exist" named neither)
            raise DataError(f"{dataset}: data directory {root}{'' if data_dir is not None else ' (NORMKIT_DATA)'} "
                            + ("is a file, not a folder" if root.exists() else "does not exist")
                            + f"; pass --data-dir with the folder that holds the {dataset} files (`normkit download "
                            f"{dataset} --data-dir DIR` fetches them)")
        return root / dataset if (root / dataset).is_dir() else root
    except PermissionError:
        # A folder on the way that cannot be searched: is_dir() raises rather than answers.
        raise DataError(f"{dataset}: data directory {root} cannot be read ({_os_reason(PermissionError(), 'it and the folders above it')})") from None


def load_idx_split(directory: Path, part: str, dataset: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One split (images, labels) from a dataset folder's IDX files, checked file by file."""
    images, labels = read_idx_split(directory, part, dataset)
    return idx_tensors(images, labels)


def idx_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 IDX images and labels as the lab's float32 (N, 1, 28, 28) in [0, 1] and int64 (N,)."""
    pixels = torch.from_numpy(images.copy()).to(torch.float32).div_(255.0).unsqueeze(1)
    return pixels, torch.from_numpy(labels.astype(np.int64))


def read_idx_split(directory: Path, part: str, dataset: str,
                   needed: tuple[str, ...] = tuple(IDX_FILES)) -> tuple[np.ndarray, np.ndarray]:
    """The checked uint8 images (N, 28, 28) and labels (N,) of one split's IDX files; ``needed`` names the splits
    the caller reads, whose files a missing-file error lists."""
    images_stem, labels_stem = IDX_FILES[part]
    images_path, labels_path = (_find_idx(directory, stem, dataset, needed) for stem in (images_stem, labels_stem))
    images = _read_found_idx(images_path, IDX_IMAGES_MAGIC)
    labels = _read_found_idx(labels_path, IDX_LABELS_MAGIC)
    if images.ndim != 3:
        raise DataError(f"{images_path}: images must have 3 dimensions (N, rows, cols), got shape {images.shape}")
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: labels must have 1 dimension (N,), got shape {labels.shape}")
    if images.shape[0] == 0:
        # Zero images would "train" nothing or report a NaN test accuracy: a file cut to its header.
        raise DataError(f"{images_path}: holds no images (its header says 0); fetch it again")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} labels")
    if images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise DataError(f"{images_path}: images are {images.shape[1]}x{images.shape[2]}, the lab's models expect 28x28")
    if labels.size and labels.max() > 9:
        raise DataError(f"{labels_path}: label {int(labels.max())} is outside 0..9")
    return images, labels


# --------------------------------------------------------------------------------------------- datasets

def load_digits_28() -> Splits:
    """scikit-learn's 8x8 digits (values 0..16), scaled to [0, 1] and resized bilinearly to 28x28 for LeNet."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:
        # (scikit-learn is a lab extra: without it the digits were a traceback, from train, evaluate and compare alike)
        raise DataError(f"--dataset digits needs scikit-learn, which bundles the digits and cannot be imported here "
                        f"({error}); install the lab extras: pip install \"normkit[lab]\", or use an MNIST-format "
                        "--dataset with --data-dir") from None

    bunch = load_digits()
    values = bunch.images.astype(np.uint8)  # integers 0..16 stored as float64: exact
    images = torch.from_numpy(values.astype(np.float32) / 16.0).unsqueeze(1)
    images = F.interpolate(images, size=(IMAGE_SIDE, IMAGE_SIDE), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    train_index, test_index = train_test_split(np.arange(len(labels)), test_size=DIGITS_TEST_FRACTION,
                                               random_state=DIGITS_SPLIT_SEED, stratify=bunch.target)
    sources = (values[train_index], values[test_index])
    train_index, test_index = torch.from_numpy(train_index), torch.from_numpy(test_index)
    return Splits(train=(images[train_index].contiguous(), labels[train_index]),
                  test=(images[test_index].contiguous(), labels[test_index]), sources=sources)


def load_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Splits:
    """The named dataset's splits: digits (embedded) or IDX files from ``data_dir`` (else $NORMKIT_DATA)."""
    if name == "digits":
        return load_digits_28()
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    directory = dataset_directory(name, data_dir)
    (train_images, train_labels), (test_images, test_labels) = (read_idx_split(directory, part, name)
                                                                for part in ("train", "test"))
    return Splits(train=idx_tensors(train_images, train_labels), test=idx_tensors(test_images, test_labels),
                  sources=(train_images, test_images))


def load_test_split(name: str, data_dir: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The named dataset's test split alone, (images, labels) as in ``load_dataset``: what evaluating a model
    needs. The training files are neither needed nor read (a folder of the two t10k files will do)."""
    if name == "digits":
        # The documented fixed split is drawn over all 1,797 digits (stratified): its test part is load_digits_28's.
        return load_digits_28().test
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return idx_tensors(*read_idx_split(dataset_directory(name, data_dir), "test", name, needed=("test",)))


# --------------------------------------------------------------------------------------------- download

def _md5(payload: bytes) -> str:
    return hashlib.md5(payload, usedforsecurity=False).hexdigest()


def download(name: str, data_dir: str | os.PathLike, timeout: float = 30.0) -> Path:
    """Fetch the four canonical files of ``name`` into DATA_DIR/<name>/, verify their MD5, write atomically.

    Files already present with the right checksum are kept. Without a network the error says where to put them.
    """
    if name not in DOWNLOADS:
        raise DataError(f"nothing to download for {name!r}; downloadable: {', '.join(DOWNLOADS)} (digits is embedded)")
    target = Path(data_dir).expanduser() / name
    # The folder first: a data dir that is a file, or one that cannot be made, would fail only after a download
    # (or, offline, be named as the place to copy the files to).
    for folder in (target, *target.parents):
        if folder.exists() and not folder.is_dir():
            raise DataError(f"--data-dir {data_dir}: {folder} is a file, not a folder; choose a folder path "
                            "(created if missing)")
    created = [folder for folder in (target, *target.parents) if not folder.exists()]  # (deepest first)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"--data-dir {data_dir}: cannot create {target} ({error.strerror or error}); choose a "
                        "folder you can write to") from None
    spec = DOWNLOADS[name]
    for filename, checksum in spec["md5"].items():
        path = target / filename
        if path.is_file() and _md5(path.read_bytes()) == checksum:
            continue
        failures = []
        for mirror in spec["mirrors"]:
            try:
                with urllib.request.urlopen(mirror + filename, timeout=timeout) as response:
                    payload = response.read()
            except (OSError, http.client.HTTPException) as error:  # (a transfer cut short: IncompleteRead)
                failures.append(f"{mirror + filename}: {type(error).__name__}: {error}")
                continue
            if _md5(payload) != checksum:
                failures.append(f"{mirror + filename}: checksum {_md5(payload)} != published {checksum}")
                continue
            atomic_write_bytes(path, payload)
            break
        else:
            # The folders made for it go again while empty: an empty DIR/<name>/ would be read instead of DIR, so a
            # failed download stopped runs on the IDX files in DIR itself ("missing file DIR/<name>/...").
            for folder in created:
                try:
                    folder.rmdir()
                except OSError:
                    break  # (not empty: a file of this download, or someone else's)
            raise DataError(f"could not download {filename} ({'; '.join(failures)}). Without a network, copy the "
                            f"canonical files ({', '.join(spec['md5'])}) into {target} and pass --data-dir {target.parent}")
    return target


def split_test_set(source: str | os.PathLike, target: str | os.PathLike, train_count: int = 8000) -> Path:
    """Write a train/test pair of IDX files to ``target`` from a folder holding only the 10,000-image
    t10k files (the shared MNIST sample): train = the first ``train_count`` images, test = the rest."""
    source, target = Path(source).expanduser(), Path(target).expanduser()
    if target.is_dir() and source.is_dir() and target.samefile(source):
        # The split's test files would replace the 10,000-image originals with their last 2,000.
        raise DataError(f"split_test_set: the target {target} is the source folder; writing there would replace its "
                        "t10k files with the split's test part; choose another folder")
    images = _read_found_idx(_find_idx(source, IDX_FILES["test"][0], "mnist", ("test",)), IDX_IMAGES_MAGIC)
    labels = _read_found_idx(_find_idx(source, IDX_FILES["test"][1], "mnist", ("test",)), IDX_LABELS_MAGIC)
    if not 0 < train_count < len(labels):
        raise DataError(f"train_count={train_count} must leave images on both sides of {len(labels)}")
    for part, rows in (("train", slice(0, train_count)), ("test", slice(train_count, None))):
        write_idx(target / IDX_FILES[part][0], images[rows])
        write_idx(target / IDX_FILES[part][1], labels[rows])
    return target
