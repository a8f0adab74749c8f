"""MNIST and Fashion-MNIST as numpy arrays, from the four IDX files in a folder or downloaded by
TFDS's download manager (checksums, cache); numpy parses them, TensorFlow is never imported."""
import gzip
import math
import os
import pathlib
import threading
import urllib.error
import urllib.request
import zlib

import numpy as np

DATASETS = ("mnist", "fashion_mnist")
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
ALL_FILES = sum(FILES.values(), ())
IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801
NUM_CLASSES = 10  # MNIST's digits, Fashion-MNIST's kinds of clothing


class DataError(Exception):
    """A data file or folder the user pointed at cannot be used; the message says why."""


def parse_idx(path, magic):
    """One IDX file (raw or .gz) as a uint8 array, its header's shape checked against its data."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            header = f.read(4)
            if len(header) < 4 or int.from_bytes(header, "big") != magic:
                raise DataError(f"{path} is not an IDX file of this kind (magic number is not "
                                f"{magic:#010x})")
            dims = f.read(4 * (magic & 0xFF))
            shape = tuple(int.from_bytes(dims[i:i + 4], "big") for i in range(0, len(dims) - 3, 4))
            if len(shape) != magic & 0xFF or 0 in shape:
                raise DataError(f"{path} has a damaged header: it gives the shape {shape}")
            size, data = math.prod(shape), bytearray()
            # In blocks, up to size + 1: no more memory than the file holds, whatever it claims.
            while len(data) <= size and (block := f.read(1 << 20)):
                data += block
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if len(data) != size:
        longer_or_shorter = "shorter" if len(data) < size else "longer"
        raise DataError(f"{path} is damaged or cut short: its header gives the shape {shape}, "
                        f"and the data that follows is {longer_or_shorter}")
    return np.frombuffer(data, np.uint8).reshape(shape)  # the bytearray's memory, not a copy


def find_file(data_dir, name):
    """Path of `name` or `name.gz` in data_dir."""
    for path in (os.path.join(data_dir, name), os.path.join(data_dir, name + ".gz")):
        if os.path.isfile(path):
            return path
    raise DataError(f"{data_dir} has no {name} (or {name}.gz); it needs the four standard "
                    f"MNIST files: {', '.join(ALL_FILES)}")


def parse_split(images_path, labels_path):
    """Images uint8 [N, 28, 28, 1] and labels int32 [N] from one pair of IDX files."""
    images = parse_idx(images_path, IMAGES_MAGIC)
    labels = parse_idx(labels_path, LABELS_MAGIC)
    if images.shape[1:] != (28, 28):
        raise DataError(f"{images_path} holds {images.shape[1]}x{images.shape[2]} images, "
                        f"not 28x28")
    if len(images) != len(labels):
        raise DataError(f"{images_path} has {len(images)} images but {labels_path} has "
                        f"{len(labels)} labels")
    if (bad := np.flatnonzero(labels >= NUM_CLASSES)).size:
        raise DataError(f"{labels_path} is damaged: label {labels[bad[0]]} at index {bad[0]}, "
                        f"where labels are 0 to {NUM_CLASSES - 1}")
    return images[..., None], labels.astype(np.int32)


def unreachable(url, seconds=10):
    """None if url's server answers within `seconds`, else why not (TFDS retries for minutes)."""
    answer = []

    def probe():
        try:
            request = urllib.request.Request(url, method="HEAD")
            urllib.request.urlopen(request, timeout=seconds).close()
            answer.append(None)
        except urllib.error.HTTPError as e:  # an answer: only a server error is worth no download
            answer.append(f"{e.code} {e.reason}" if e.code >= 500 else None)
        except (OSError, ValueError) as e:  # no connection, no name, a timeout
            answer.append(str(getattr(e, "reason", e)))

    thread = threading.Thread(target=probe, daemon=True)  # daemon: a hung DNS lookup cannot hold us
    thread.start()
    thread.join(seconds)
    return answer[0] if answer else f"no answer within {seconds} s"


def download(dataset):
    """Paths of the dataset's four files from TFDS's download cache, or downloaded through TFDS."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.download import resource

    builder = tfds.builder(dataset)
    download_dir = os.path.join(tfds.core.constants.get_default_data_dir(), "downloads")
    urls = {name: builder.URL + name + ".gz" for name in ALL_FILES}
    offline = (f"without network, pass --data-dir DIR with the four files {', '.join(urls)} "
               f"(raw or .gz)")
    cached = all(resource.is_locally_cached(pathlib.Path(download_dir) / resource.get_dl_fname(
        url, builder.url_infos[url].checksum)) for url in urls.values())
    if not cached and (reason := unreachable(urls[ALL_FILES[0]])):
        raise DataError(f"cannot download {dataset}: {reason}; {offline}")
    manager = tfds.download.DownloadManager(download_dir=download_dir, url_infos=builder.url_infos,
                                            dataset_name=dataset)
    try:
        return {name: os.fspath(path) for name, path in manager.download(urls).items()}
    except Exception as e:  # requests, TFDS and checksum errors share no base class
        raise DataError(f"download of {dataset} failed ({type(e).__name__}); {offline}") from None


def load_dataset(dataset, data_dir=None, splits=tuple(FILES)):
    """{split: (images, labels)} of the splits ('train', 'test') from data_dir, or downloaded."""
    if data_dir is not None and not os.path.isdir(data_dir):
        raise DataError(f"--data-dir {data_dir} is not a folder")
    paths = download(dataset) if data_dir is None else {
        name: find_file(data_dir, name) for name in ALL_FILES}
    return {split: parse_split(*(paths[name] for name in FILES[split])) for split in splits}
