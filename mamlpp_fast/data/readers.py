"""Find the images of a few-shot dataset and decode them to compact uint8 arrays.

What the authors' data.py does, and what we do instead:
- It walks `dataset_path` (os.walk) for *.png / *.jpg / *.jpeg files and labels each image by the path
  parts `indexes_of_folders_indicating_class` joined with "/" (Omniglot: [-3, -2] = alphabet/character).
  We do the same, and also read images inside any *.zip file found under the folder (the official
  Omniglot zips) with `zipfile`, in place: a zip member's path is `<zip path>/<member name>`, so the
  same negative indexes pick the same folders. Nothing is extracted and nothing is written.
- Its class list is `sorted(labels)`; the image list of a class is in os.walk order (file-system
  dependent). We sort both (images by file name) so that every machine sees the same order, and we drop
  an image whose (class, file name) was already seen: Greek and Latin are in both Omniglot "small" zips
  with identical files, and a folder next to its own zip must not double the images.
- Omniglot images are opened as 1-bit (mode "1") PNGs and resized with `Image.resize`; Pillow always
  uses nearest-neighbour for mode "1" (the original asks for LANCZOS, which Pillow replaces by NEAREST
  for this mode), giving values 0/1 with the white background = 1. Any other mode is an error here,
  because a grey-level image would silently give values outside {0, 1}.
- RGB images (mini-ImageNet) are resized with Pillow's default filter then converted to RGB, as the
  original; values stay uint8 here, /255 and the ImageNet mean/std normalisation happen per batch in the
  sampler (same float32 arithmetic as the original's ToTensor + Normalize on a float image).
- The original resizes to `(image_height, image_width)`, which Pillow reads as (width, height); we pass
  (width, height), which is the same for the square images of every shipped configuration.
"""
from __future__ import annotations

import io
import os
import threading
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DatasetError

__all__ = [
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageRef",
    "ImageDecoder",
    "find_images",
    "label_from_path",
    "group_by_class",
    "resolve_dataset_path",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Modes that convert to RGB / L without losing meaning. 1-bit, 32-bit int and float images are refused.
_COLOUR_MODES = ("RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "CMYK", "YCbCr")


@dataclass(frozen=True)
class ImageRef:
    """One image: a file on disk (`zip_path` None) or a member of a zip file.

    `path` is what labels are computed from and what error messages show: the file path, or
    `<zip path>/<member name>` for a zip member (always with "/" separators).
    """

    path: str
    zip_path: Optional[str] = None
    member: Optional[str] = None

    @property
    def name(self) -> str:
        """The file name (last path part)."""
        return self.path.rsplit("/", 1)[-1]


def resolve_dataset_path(dataset_path, data_dir=None, dataset_dir=None, environ: Optional[Mapping] = None) -> Path:
    """Return the dataset folder to read.

    `data_dir`, when given, is the dataset folder itself and wins. Otherwise a relative `dataset_path`
    is joined to `dataset_dir` (our config key) or else to the DATASET_DIR environment variable, as the
    original's parser does (`os.path.join(os.environ['DATASET_DIR'], dataset_path)`). If that joined path
    does not exist but `dataset_path` itself does (relative to the working directory, e.g. a config
    whose path was already joined once), the latter is used.
    """
    if data_dir is not None:
        return Path(os.path.expanduser(str(data_dir)))
    if dataset_path is None:
        raise DatasetError("no dataset path given (dataset_path is None and no data_dir)")
    path = Path(os.path.expanduser(str(dataset_path)))
    if path.is_absolute():
        return path
    env = os.environ if environ is None else environ
    root = dataset_dir if dataset_dir not in (None, "") else env.get("DATASET_DIR")
    if root:
        joined = Path(os.path.expanduser(str(root))) / path
        if joined.exists() or not path.exists():
            return joined
    return path


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _zip_members(zip_path: str) -> list[ImageRef]:
    """Image members of one zip file, without extracting anything."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            names = [info.filename for info in zf.infolist() if not info.is_dir()]
    except (zipfile.BadZipFile, OSError) as exc:
        raise DatasetError(f"cannot read zip file {zip_path}: {exc}") from exc
    zp = zip_path.replace(os.sep, "/")
    refs = []
    for member in sorted(names):
        parts = member.split("/")
        # macOS archive junk (__MACOSX/..., ._name) is not an image of the dataset.
        if any(p == "__MACOSX" for p in parts) or parts[-1].startswith("._"):
            continue
        if _is_image_name(parts[-1]):
            refs.append(ImageRef(path=f"{zp}/{member}", zip_path=zip_path, member=member))
    return refs


def find_images(root) -> list[ImageRef]:
    """All images under `root`: image files found recursively, and image members of every *.zip.

    `root` may also be a single .zip file. Raises DatasetError when `root` does not exist or holds no
    image. Directories and files are visited in sorted order, so the result is deterministic; symlinked
    folders are followed, each real folder once.
    """
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"dataset folder not found: {root}")
    refs: list[ImageRef] = []
    if root.is_file():
        if root.suffix.lower() != ".zip":
            raise DatasetError(f"dataset path is a file but not a .zip: {root}")
        refs.extend(_zip_members(str(root)))
    else:
        walk_errors: list[OSError] = []
        # Symlinked folders are followed (datasets are often linked in from another disk); each real
        # folder is visited once, which also stops symlink loops.
        seen = {os.path.realpath(root)}
        for dirpath, dirnames, filenames in os.walk(root, onerror=walk_errors.append, followlinks=True):
            kept = []
            for d in sorted(dirnames):
                real = os.path.realpath(os.path.join(dirpath, d))
                if real not in seen:
                    seen.add(real)
                    kept.append(d)
            dirnames[:] = kept
            for fname in sorted(filenames):
                full = os.path.join(dirpath, fname)
                if fname.startswith("._"):
                    continue
                if _is_image_name(fname):
                    refs.append(ImageRef(path=full.replace(os.sep, "/")))
                elif fname.lower().endswith(".zip"):
                    refs.extend(_zip_members(full))
        if walk_errors and not refs:
            raise DatasetError(f"cannot list dataset folder {root}: {walk_errors[0]}")
    if not refs:
        raise DatasetError(
            f"no images found under {root} (looked for {', '.join(IMAGE_EXTENSIONS)} files, "
            f"also inside .zip files)")
    return refs


def label_from_path(path: str, indexes: Sequence[int], labels_as_int: bool = False):
    """Class label of an image: the path parts at `indexes` joined with "/" (the original's rule)."""
    parts = path.split("/")
    try:
        label = "/".join(parts[int(i)] for i in indexes)
    except IndexError:
        raise DatasetError(
            f"image path {path} has too few folders for indexes_of_folders_indicating_class="
            f"{list(indexes)}") from None
    if labels_as_int:
        try:
            return int(label)
        except ValueError:
            raise DatasetError(f"labels_as_int is set but the label {label!r} of {path} is not an integer") from None
    return label


def group_by_class(refs: Iterable[ImageRef], indexes: Sequence[int], labels_as_int: bool = False) -> dict:
    """Map label -> list of ImageRef, labels sorted (as the original), images sorted by file name.

    An image whose file name already appears in its class (the same image in a folder and in a zip, or
    in two zips) is kept once: the first one in the sorted walk.
    """
    by_class: dict = {}
    for ref in refs:
        label = label_from_path(ref.path, indexes, labels_as_int)
        by_class.setdefault(label, {}).setdefault(ref.name, ref)
    return {label: [by_class[label][n] for n in sorted(by_class[label])] for label in sorted(by_class)}


class ImageDecoder:
    """Decodes ImageRefs to uint8 arrays of shape (C, H, W) for one kind of dataset.

    kind "omniglot": 1-bit images only, nearest resize, values 0/1 (background 1), C must be 1.
    kind "rgb": any colour mode Pillow can convert; resize with Pillow's default filter, then RGB (C=3)
    or L (C=1), values 0..255.

    Zip files are opened once per thread and kept open (ZipFile objects are not thread-safe); call
    `close()` when done. Every failure raises DatasetError naming the image.
    """

    def __init__(self, kind: str, height: int, width: int, channels: int):
        if kind not in ("omniglot", "rgb"):
            raise ValueError(f"unknown image kind {kind!r}")
        if kind == "omniglot" and channels != 1:
            raise DatasetError(f"Omniglot images have one channel, but image_channels={channels}")
        if kind == "rgb" and channels not in (1, 3):
            raise DatasetError(f"image_channels must be 1 or 3 for colour images, got {channels}")
        self.kind, self.height, self.width, self.channels = kind, int(height), int(width), int(channels)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all_zips: list[zipfile.ZipFile] = []

    # -- opening -------------------------------------------------------------------------------
    def _zip(self, zip_path: str) -> zipfile.ZipFile:
        handles = getattr(self._local, "zips", None)
        if handles is None:
            handles = self._local.zips = {}
        zf = handles.get(zip_path)
        if zf is None:
            zf = zipfile.ZipFile(zip_path)
            handles[zip_path] = zf
            with self._lock:
                self._all_zips.append(zf)
        return zf

    def _open(self, ref: ImageRef) -> Image.Image:
        if ref.zip_path is not None:
            try:
                data = self._zip(ref.zip_path).read(ref.member)
            except (OSError, ValueError, zipfile.BadZipFile, KeyError, zlib.error, EOFError, RuntimeError,
                    NotImplementedError) as exc:
                # The archive's index is intact but this member's data is not (bad CRC, truncated or
                # corrupt compressed stream, unsupported compression or encryption).
                raise DatasetError(f"cannot read member {ref.member} of zip file {ref.zip_path}: "
                                   f"{type(exc).__name__}: {exc}") from exc
        try:
            if ref.zip_path is None:
                return Image.open(ref.path)
            return Image.open(io.BytesIO(data))
        except (UnidentifiedImageError, OSError, ValueError, zipfile.BadZipFile, KeyError,
                Image.DecompressionBombError, SyntaxError) as exc:
            raise DatasetError(f"cannot read image {ref.path}: {exc}") from exc

    def _check_mode(self, ref: ImageRef, img: Image.Image) -> None:
        if self.kind == "omniglot":
            if img.mode != "1":
                raise DatasetError(
                    f"image {ref.path} has mode {img.mode!r}; Omniglot images must be 1-bit (mode '1')")
        elif img.mode not in _COLOUR_MODES:
            raise DatasetError(
                f"image {ref.path} has mode {img.mode!r}, which cannot be read as a colour/grey image "
                f"(expected one of {', '.join(_COLOUR_MODES)})")

    def check(self, ref: ImageRef) -> None:
        """Open the image header and check its mode, without decoding the pixels."""
        img = self._open(ref)
        try:
            self._check_mode(ref, img)
        finally:
            img.close()

    def decode(self, ref: ImageRef) -> np.ndarray:
        """Decode one image to a uint8 array (C, H, W)."""
        img = self._open(ref)
        try:
            self._check_mode(ref, img)
            try:
                img.load()
                size = (self.width, self.height)
                if self.kind == "omniglot":
                    if img.size != size:
                        img = img.resize(size, resample=Image.NEAREST)
                    arr = np.asarray(img, dtype=np.uint8)[None]  # bool -> 0/1
                else:
                    if img.size != size:
                        img = img.resize(size)  # Pillow's default filter, as the original
                    img = img.convert("RGB" if self.channels == 3 else "L")
                    arr = np.asarray(img, dtype=np.uint8)
                    arr = arr.transpose(2, 0, 1) if self.channels == 3 else arr[None]
            except (OSError, ValueError, SyntaxError) as exc:
                raise DatasetError(f"cannot decode image {ref.path}: {exc}") from exc
        finally:
            img.close()
        return np.ascontiguousarray(arr)

    def decode_many(self, refs: Sequence[ImageRef], num_workers: int = 0) -> np.ndarray:
        """Decode images into one uint8 array (len(refs), C, H, W), in parallel threads when useful.

        Pillow releases the GIL while decoding, so threads give a real speed-up on JPEG/PNG data.
        """
        out = np.empty((len(refs), self.channels, self.height, self.width), dtype=np.uint8)
        if num_workers is None or num_workers <= 0:
            num_workers = min(8, os.cpu_count() or 1)
        if num_workers == 1 or len(refs) < 256:
            for i, ref in enumerate(refs):
                out[i] = self.decode(ref)
            return out
        chunk = max(64, len(refs) // (num_workers * 4))
        starts = list(range(0, len(refs), chunk))

        def work(start: int) -> None:
            for i in range(start, min(start + chunk, len(refs))):
                out[i] = self.decode(refs[i])

        with ThreadPoolExecutor(max_workers=num_workers) as pool:
            for _ in pool.map(work, starts):  # re-raises the first DatasetError
                pass
        return out

    def close(self) -> None:
        """Close the zip files this decoder opened (in any thread)."""
        with self._lock:
            zips, self._all_zips = self._all_zips, []
        for zf in zips:
            try:
                zf.close()
            except Exception:  # pragma: no cover - closing a read-only handle does not fail in practice
                pass
        self._local = threading.local()

    def after_fork(self) -> None:
        """In a forked child process: forget the zip files inherited from the parent (their file offsets
        are shared with it) without closing them; the child opens its own on first use."""
        self._lock = threading.Lock()
        self._all_zips = []
        self._local = threading.local()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass
