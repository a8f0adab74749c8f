"""infer.py in this process: pictures read as users save them, the test split, bad input."""
import io
import os
import re
import subprocess
import sys
import zlib

import numpy as np
import pytest

import infer
import input_pipeline
from conftest import (HERE, MNIST_DATA_DIR, assert_clean_error, broken_checkpoint, epoch_lines,
                      load_checkpoint, synthetic_split)


def test_infer_evaluates_like_train_and_draws_the_grid(run_main, data_dir, trained, tmp_path):
    workdir, stdout = trained
    run = run_main(infer.main, "--ckpt", workdir / "checkpoint.msgpack", "--data-dir", data_dir,
                   "--out", tmp_path / "grid.png")
    assert run.returncode == 0, run.stderr
    assert epoch_lines(run.stdout) == epoch_lines(stdout)[-1:]
    predicted = re.search(r"^predicted: ([\d ]+)$", run.stdout, re.M).group(1).split()
    true = re.search(r"^true: +([\d ]+)$", run.stdout, re.M).group(1).split()
    assert len(predicted) == 25 and true == [str(c) for c in synthetic_split(203, 2)[1][:25]]
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def draw_seven(size, dark_on_light, rgb):
    """A '7' drawn with strokes proportional to size, off-centre, as a PIL image."""
    from PIL import Image, ImageDraw

    ink, paper = (0, 255) if dark_on_light else (255, 0)
    image = Image.new("RGB" if rgb else "L", (size, size), (paper,) * 3 if rgb else paper)
    draw = ImageDraw.Draw(image)
    s = size / 28
    fill = (ink,) * 3 if rgb else ink
    draw.line([(3 * s, 4 * s), (15 * s, 4 * s), (8 * s, 22 * s)], fill=fill,
              width=max(1, round(2 * s)))
    return image


def test_mnist_like_normalizes_any_picture(tmp_path):
    draw_seven(28, False, False).save(tmp_path / "small.png")
    draw_seven(280, True, True).save(tmp_path / "large.png")
    draw_seven(280, True, True).save(tmp_path / "large.jpg", quality=90)
    small, large, jpeg = (infer.mnist_like(str(tmp_path / name))
                          for name in ("small.png", "large.png", "large.jpg"))
    for image in (small, large, jpeg):
        assert image.shape == (28, 28, 1) and image.dtype == np.uint8 and image.max() > 200
        rows, cols = np.nonzero(image[..., 0] > 0)
        side = max(rows.max() - rows.min(), cols.max() - cols.min()) + 1
        assert side in (20, 21, 22)  # 20 and the resampling's halo
        centre = (np.indices((28, 28)) * image[..., 0]).reshape(2, -1).sum(1) / image.sum()
        assert np.abs(centre - 14).max() <= 1.0
    assert np.corrcoef(large.ravel(), small.ravel())[0, 1] > 0.8
    assert np.corrcoef(large.ravel(), jpeg.ravel())[0, 1] > 0.95


# EXIF orientation: the transpose that stores a picture so that a viewer, undoing it, shows it
# upright.
STORED_SIDEWAYS = {3: "ROTATE_180", 6: "ROTATE_90", 8: "ROTATE_270"}
PICTURE_KINDS = ["exif3", "exif6", "exif8", "alpha_black", "alpha_blue", "gray16", "gif", "tiff"]


def save_picture(paper, stem, kind):
    """Saves an "L" picture (dark ink on light paper) as users' pictures arrive, and its plain
    version; returns both paths. kind: a phone JPEG stored sideways with an EXIF orientation tag;
    a PNG drawing whose ink is its opacity over a transparent background (colour channels black or
    blue); a 16-bit PNG scan; the first frame of an animated GIF or of a multi-page TIFF."""
    from PIL import Image

    if kind.startswith("exif"):
        orientation = int(kind[4:])
        exif = Image.Exif()
        exif[0x0112] = orientation
        paper.save(plain := f"{stem}_plain.jpg", quality=95)
        paper.transpose(getattr(Image.Transpose, STORED_SIDEWAYS[orientation])).save(
            path := f"{stem}.jpg", quality=95, exif=exif)
        return path, plain
    paper.save(plain := f"{stem}_plain.png")
    if kind.startswith("alpha"):
        rgba = np.zeros(paper.size[::-1] + (4,), np.uint8)
        rgba[..., 2] = 255 if kind == "alpha_blue" else 0
        rgba[..., 3] = 255 - np.asarray(paper)
        Image.fromarray(rgba, "RGBA").save(path := f"{stem}.png")
    elif kind == "gray16":
        Image.fromarray(np.asarray(paper).astype(np.uint16) * 257).save(path := f"{stem}.png")
    else:
        noise = np.random.default_rng(0).integers(0, 256, paper.size[::-1], np.uint8)
        other = Image.fromarray(noise)
        path = f"{stem}.{kind}"
        paper.save(path, save_all=True, append_images=[other])
    return path, plain


@pytest.mark.parametrize("kind", PICTURE_KINDS)
def test_pictures_as_they_arrive_read_like_their_plain_version(tmp_path, kind):
    from PIL import ImageFilter

    paper = draw_seven(280, True, False).filter(ImageFilter.GaussianBlur(3))  # every shade of gray
    path, plain = save_picture(paper, str(tmp_path / kind), kind)
    read, expected = infer.mnist_like(path).astype(int), infer.mnist_like(plain).astype(int)
    assert expected.max() > 200
    assert np.abs(read - expected).mean() < 1.0 and np.abs(read - expected).max() <= 32


PICTURE_MEMORY = """
import re, sys
import infer
def peak_mb():  # this process's own peak: ru_maxrss would count the parent's from before exec
    return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
before = peak_mb()
infer.mnist_like(sys.argv[1])
print(peak_mb() - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"),
                    reason="reads its peak memory from /proc")
def test_a_large_photo_is_read_at_reduced_size_like_a_small_one(tmp_path):
    from PIL import Image

    photo = Image.new("RGB", (4000, 3000), "white")  # 12 megapixels, as phones take them
    photo.paste(draw_seven(2800, True, True), (600, 100))
    photo.save(tmp_path / "photo.jpg", quality=90)
    draw_seven(280, True, False).save(tmp_path / "small.png")
    read = infer.mnist_like(str(tmp_path / "photo.jpg")).astype(int)
    expected = infer.mnist_like(str(tmp_path / "small.png")).astype(int)
    assert np.abs(read - expected).mean() < 3.0
    assert np.corrcoef(read.ravel(), expected.ravel())[0, 1] > 0.97
    # Peak memory it adds in a process of its own: decoded whole, an RGB photo of this size took
    # 187 MB.
    run = subprocess.run([sys.executable, "-c", PICTURE_MEMORY, tmp_path / "photo.jpg"],
                         capture_output=True, text=True, cwd=HERE, timeout=120)
    assert run.returncode == 0 and float(run.stdout) < 40, run.stdout + run.stderr


def test_infer_classifies_images(run_main, trained, tmp_path):
    workdir, _ = trained
    draw_seven(280, True, True).save(tmp_path / "a.png")
    draw_seven(28, False, False).save(tmp_path / "b.jpg")
    run = run_main(infer.main, "--ckpt", workdir / "checkpoint.msgpack", "--image",
                   tmp_path / "a.png", tmp_path / "b.jpg")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    pattern = r"^.+: (\d) \((\d+\.\d)%\), then (\d) \((\d+\.\d)%\), (\d) \((\d+\.\d)%\)$"
    assert len(lines) == 2 and all(re.match(pattern, line) for line in lines)
    first, p1, second, p2, third, p3 = re.match(pattern, lines[0]).groups()
    assert len({first, second, third}) == 3 and float(p1) >= float(p2) >= float(p3)


# --- real MNIST (MNIST_DATA_DIR) ---

def test_real_mnist_one_epoch_then_infer_on_pictures(run_main, real_trained, tmp_path):
    from PIL import Image

    workdir, stdout = real_trained
    assert epoch_lines(stdout)[-1][3] >= 97.0
    images, labels = input_pipeline.load_dataset("mnist", MNIST_DATA_DIR)["test"]
    plain, drawn = [], []
    for i in range(10):
        Image.fromarray(images[i, ..., 0]).save(plain_path := tmp_path / f"plain{i}.png")
        big = Image.fromarray(255 - images[i, ..., 0]).resize((280, 280), Image.BICUBIC)
        big = big.convert("RGB")
        big.save(drawn_path := tmp_path / f"drawn{i}.png")
        plain.append(plain_path)
        drawn.append(drawn_path)
    for files in (plain, drawn):
        infer_run = run_main(infer.main, "--ckpt", workdir / "checkpoint.msgpack", "--image",
                             *files)
        assert infer_run.returncode == 0, infer_run.stderr
        guesses = [int(line.split(": ")[1][0]) for line in infer_run.stdout.strip().splitlines()]
        assert sum(g == l for g, l in zip(guesses, labels[:10])) >= 9, guesses


def test_real_digits_saved_as_users_save_pictures_are_classified_as_plain_ones(real_trained,
                                                                               tmp_path):
    from PIL import Image

    state = load_checkpoint(real_trained[0] / "checkpoint.msgpack")[0]
    images = input_pipeline.load_dataset("mnist", MNIST_DATA_DIR, ["test"])["test"][0][:10]
    papers = [Image.fromarray(255 - image[..., 0]).resize((280, 280), Image.BICUBIC)
              for image in images]
    for kind in PICTURE_KINDS:
        paths = [save_picture(paper, str(tmp_path / f"{kind}{i}"), kind)
                 for i, paper in enumerate(papers)]
        read, plain = (np.asarray(infer.predict(state, np.stack([infer.mnist_like(p[j])
                                                                 for p in paths])))
                       for j in (0, 1))
        assert (read.argmax(-1) == plain.argmax(-1)).all(), kind
        assert np.abs(read - plain).max() < 0.05, kind


# --- errors a user can cause ---

@pytest.mark.parametrize("damage, message", [
    ("missing", r"cannot read checkpoint .*nothing.msgpack: No such file or directory"),
    ("foreign", r"is not a checkpoint of train.py, or it is truncated"),
    ("truncated", r"is not a checkpoint of train.py, or it is truncated"),
    ("mismatched", r"does not fit this model \(other parameter shapes\)"),
])
def test_infer_bad_checkpoint(run_main, trained, tmp_path, damage, message):
    path = broken_checkpoint(tmp_path / "nothing.msgpack", trained[0], damage)
    assert_clean_error(run_main(infer.main, "--ckpt", path, "--image", tmp_path / "x.png"), message)


def png(width, height, rows):
    """A grayscale PNG file's bytes that says it is width x height and holds the given raw rows."""
    def chunk(kind, data):
        crc = zlib.crc32(kind + data).to_bytes(4, "big")
        return len(data).to_bytes(4, "big") + kind + data + crc
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def cut_short(picture_format):
    """The first half of a noisy 280 x 280 picture file."""
    from PIL import Image

    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (280, 280), np.uint8)
    Image.fromarray(noise).save(buffer, picture_format)
    return buffer.getvalue()[:len(buffer.getvalue()) // 2]


@pytest.mark.parametrize("content, message", [
    (None, r"x.png does not exist"),
    (b"not a picture", r"x.png is not a picture Pillow can read"),
    (png(30000, 30000, bytes(30001)),
     r"x.png is too large to read safely \(Image size \(900000000 pixels\) exceeds limit.*\); "
     r"scale it down first"),
    (cut_short("PNG"),
     r"x.png cannot be decoded \(image file is truncated\); is it damaged or cut short\?"),
    (cut_short("JPEG"),
     r"x.png cannot be decoded \(image file is truncated.*\); is it damaged or cut short\?"),
    ("folder", r"cannot read .*x.png: Is a directory"),
])
def test_infer_bad_image(run_main, trained, tmp_path, content, message):
    if content == "folder":
        (tmp_path / "x.png").mkdir()
    elif content is not None:
        (tmp_path / "x.png").write_bytes(content)
    run = run_main(infer.main, "--ckpt", trained[0] / "checkpoint.msgpack", "--image",
                   tmp_path / "x.png")
    assert_clean_error(run, message)
