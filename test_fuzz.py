"""The readers of files a user points at, fed thousands of randomly damaged files: IDX files (raw
and .gz), checkpoints, and pictures in six formats. Each damaged file must load or end in its
reader's own one-line error. Seeded: FUZZ_SEED=N picks other damage, FUZZ_CASES=N scales the count,
and a failure names the file that reproduces it."""
import gzip
import io
import os
import tracemalloc

import flax.linen as nn
import numpy as np
import pytest

import infer
import input_pipeline
import outputs
from conftest import synthetic_split
from model import MNIST_IMAGE, RunConfig, create_train_state

SEED = int(os.environ.get("FUZZ_SEED", 0))
SCALE = float(os.environ.get("FUZZ_CASES", 1))  # times the default count of each test


def mutate(data, rng):
    """data with one to three random damages: bits flipped, bytes set to edge values, bytes
    inserted, deleted or cut off. Half of them hit the first 32 bytes, where formats keep what
    their header claims."""
    data = bytearray(data)
    for _ in range(rng.integers(1, 4)):
        end = len(data) if rng.random() < 0.5 else min(len(data), 32)
        at = int(rng.integers(0, max(end, 1)))
        kind = rng.integers(0, 6)
        if kind == 0 and data:
            data[min(at, len(data) - 1)] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1 and data:
            data[min(at, len(data) - 1)] = int(rng.choice([0x00, 0x01, 0x7F, 0x80, 0xFF]))
        elif kind == 2:
            data[at:at] = rng.integers(0, 256, int(rng.integers(1, 9)), np.uint8).tobytes()
        elif kind == 3:
            del data[at:at + int(rng.integers(1, 9))]
        elif kind == 4:
            del data[at:]
        else:  # a 4-byte big-endian count, as IDX and PNG headers hold them
            data[at:at + 4] = int(rng.choice([0, 1, 2 ** 31, 2 ** 32 - 1])).to_bytes(4, "big")
    return bytes(data)


def fuzz(tmp_path, name, originals, read, expected_error, cases):
    """Writes `cases` damaged versions of the originals ({file name: bytes}) as `name`, each read
    with read(path); anything but a load or expected_error fails, keeping the file."""
    rng = np.random.default_rng([SEED, sum(map(ord, name))])
    outcomes = {"loaded": 0, "refused": 0}
    for case in range(int(cases * SCALE)):
        original_name, original = list(originals.items())[case % len(originals)]
        path = tmp_path / original_name
        path.write_bytes(mutate(original, rng))
        try:
            read(str(path))
            outcomes["loaded"] += 1
        except expected_error as e:
            assert str(e).count("\n") == 0 and str(path) in str(e), e
            outcomes["refused"] += 1
        except Exception as e:
            kept = tmp_path / f"crash-{case}-{original_name}"
            path.rename(kept)
            pytest.fail(f"FUZZ_SEED={SEED} case {case}: {kept} raised {type(e).__name__}: {e}")
    assert outcomes["refused"] > cases * SCALE / 4, outcomes  # damage reached the readers' checks
    return outcomes


# --- IDX files ---

def idx_bytes(array):
    """The bytes of a raw IDX file of a uint8 array."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    return header + array.tobytes()


@pytest.mark.parametrize("gz", [False, True])
def test_damaged_idx_files_load_or_raise_data_error(tmp_path, gz):
    """Damage in the data as the header claims it: in a .gz file, before compression as well."""
    images, labels = synthetic_split(20, 3)
    good = {"images": idx_bytes(images), "labels": idx_bytes(labels)}
    suffix = ".gz" if gz else ""
    for kind, data in good.items():
        (tmp_path / f"good-{kind}{suffix}").write_bytes(gzip.compress(data, 1) if gz else data)

    def read(path):
        kind, _, compressed = os.path.basename(path).partition("-")  # images, labels; -compressed
        if gz:  # the damaged bytes, compressed unless they are the compressed file's
            data = open(path, "rb").read()
            path += ".gz"
            open(path, "wb").write(data if compressed else gzip.compress(data, 1))
        other = str(tmp_path / f"good-{'labels' if kind == 'images' else 'images'}{suffix}")
        return input_pipeline.parse_split(*((path, other) if kind == "images" else (other, path)))

    originals = dict(good)
    if gz:
        originals.update({f"{kind}-compressed": gzip.compress(data, 1)
                          for kind, data in good.items()})
    fuzz(tmp_path, f"idx{suffix}", originals, read, input_pipeline.DataError, 1500)


@pytest.mark.parametrize("gz", [False, True])
def test_a_header_that_claims_more_takes_no_more_memory_than_the_data(tmp_path, gz):
    """2^31 images claimed, 640 held: refused, with no more memory than reading the intact file."""
    images = synthetic_split(640, 1)[0]
    header = bytearray(idx_bytes(images))
    header[4:8] = (2 ** 31).to_bytes(4, "big")
    peaks = []
    for name, data in (("intact", idx_bytes(images)), ("claims more", bytes(header))):
        path = tmp_path / (name + (".gz" if gz else ""))
        path.write_bytes(gzip.compress(data, 1) if gz else data)
        tracemalloc.start()
        try:
            input_pipeline.parse_idx(str(path), input_pipeline.IMAGES_MAGIC)
        except input_pipeline.DataError as e:
            assert name == "claims more" and "(2147483648, 28, 28)" in str(e), e
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] <= peaks[0] + 4096, peaks  # but for the error's message


# --- checkpoints ---

class Tiny(nn.Module):
    """A small model: its checkpoint goes through the same reader in a fraction of the time."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(nn.relu(nn.Dense(8)(x.reshape((x.shape[0], -1)))))


def test_damaged_checkpoints_load_or_raise_checkpoint_error(tmp_path):
    """What --resume, infer.py --ckpt and export.py --ckpt read: outputs.load_checkpoint."""
    history = [{"epoch": e, "train_loss": 0.5, "train_accuracy": 90.0, "test_loss": 0.4,
                "test_accuracy": 91.0, "epoch_time": 1.0} for e in (1, 2)]
    config = RunConfig(data_dir="/data")
    outputs.save(tmp_path, create_train_state(Tiny(), config, MNIST_IMAGE), 2, config, history)
    good = (tmp_path / "checkpoint.msgpack").read_bytes()
    fuzz(tmp_path, "checkpoint", {"checkpoint.msgpack": good},
         lambda path: outputs.load_checkpoint(path, Tiny()), outputs.CheckpointError, 1500)


# --- pictures ---

PICTURE_FORMATS = {"png": {}, "jpeg": {"quality": 90}, "gif": {},
                   "tiff": {"compression": "tiff_lzw"}, "webp": {"quality": 80}, "bmp": {}}


def pictures():
    """{file name: bytes} of a drawn digit in each format, in the modes users' files come in."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (40, 40), "white")
    ImageDraw.Draw(image).line([(8, 8), (30, 8), (16, 34)], fill="black", width=4)
    variants = {"png": [image, image.convert("LA"), image.convert("P")],
                "jpeg": [image, image.convert("L")],
                "gif": [image.convert("P")], "tiff": [image, image.convert("I;16")],
                "webp": [image, image.convert("RGBA")], "bmp": [image, image.convert("P")]}
    files = {}
    for kind, images in variants.items():
        for i, variant in enumerate(images):
            buffer = io.BytesIO()
            variant.save(buffer, kind, **PICTURE_FORMATS[kind])
            files[f"digit{i}.{kind}"] = buffer.getvalue()
    return files


@pytest.mark.parametrize("kind", PICTURE_FORMATS)
def test_damaged_pictures_load_or_raise_image_error(tmp_path, kind):
    """What infer.py --image reads, Pillow's decoders included."""
    originals = {name: data for name, data in pictures().items() if name.endswith(kind)}
    fuzz(tmp_path, kind, originals, infer.mnist_like, infer.ImageError, 300)
