"""Predicts with a checkpoint of train.py: `python infer.py --ckpt [PATH] [--image FILE ...]`.

Without --image it evaluates the checkpoint's test split, prints the first 25 predictions and
draws them; with --image it classifies your own pictures of digits.
"""
import argparse
import os
import struct
import sys
import warnings

import jax
import numpy as np

import input_pipeline
import outputs
import xla

DEFAULT_CHECKPOINT = os.path.join("workdir", outputs.CHECKPOINT)
# Pictures are read at most this large: a digit needs few pixels, and a phone photo read whole
# takes several times the time and memory (PERFORMANCE.md, section 7).
MAX_SIDE = 512
# What Pillow raises on damaged or unsupported files, from its source: OSError and SyntaxError, its
# own; ValueError ("Truncated IHDR chunk": test_fuzz.py found three kinds); EOFError and
# struct.error, where a parser (GIF and PNG frames; ICNS, DDS, BLP) reads past the end of its data.
PILLOW_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)


class ImageError(Exception):
    """An --image file cannot be used; the message says why."""


def read_picture(path):
    """The first frame of a picture as a viewer shows it: float32 gray [H, W] in 0-255, EXIF
    orientation applied, at most MAX_SIDE pixels a side. ImageError naming the file otherwise."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # notes on damage it reads past ("Corrupt EXIF data")
            # Above MAX_IMAGE_PIXELS Pillow only warns; 2x above, it refuses.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.draft(image.mode, (MAX_SIDE, MAX_SIDE))  # JPEG: decoded at 1/2 to 1/8 size
                image.thumbnail((MAX_SIDE, MAX_SIDE))
                layers = pixel_layers(ImageOps.exif_transpose(image))
    except FileNotFoundError:
        raise ImageError(f"{path} does not exist") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path} is not a picture Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{path} is too large to read safely ({e}); scale it down first") from None
    except PILLOW_ERRORS as e:
        if getattr(e, "errno", None):  # the file system's: no permission, a folder, ...
            raise ImageError(f"cannot read {path}: {e.strerror}") from None
        reason = e or type(e).__name__
        raise ImageError(f"{path} cannot be decoded ({reason}); is it damaged or cut short?"
                         ) from None
    return viewed_gray(*layers)


def pixel_layers(image):
    """Pillow's part of reading a decoded picture, where a damaged one fails: (gray float32 [H, W]
    with transparency shown on white, its opacity or None, whether deeper than 8 bits)."""
    from PIL import Image

    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return np.asarray(image, np.float32), None, True
    if not image.has_transparency_data:
        return np.asarray(image.convert("L"), np.float32), None, False
    rgba = image.convert("RGBA")
    on_white = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("L")
    return np.asarray(on_white, np.float32), np.asarray(rgba, np.float32)[..., 3], False


def viewed_gray(gray, opacity, deep):
    """float32 gray [H, W] in 0-255 of pixel_layers. Deeper than 8 bits: scaled, not clipped. With a
    transparent background the opacity is the drawing (light on dark), whatever the colours hold."""
    if deep:
        return (gray - gray.min()) * (255 / max(np.ptp(gray), 1e-6))
    if opacity is not None and np.median(border(opacity)) < 128:
        return opacity
    return gray


def border(array):
    """The outermost pixels of a 2-D array."""
    return np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]])


def mnist_like(path):
    """A picture as MNIST was made: uint8 [28, 28, 1], light digit on black, its 20x20 box
    scaled to fit, centred on its centre of mass."""
    from PIL import Image

    gray = read_picture(path)
    paper = np.median(border(gray))
    if paper > 127:  # dark ink on light paper, unlike MNIST
        gray, paper = 255 - gray, 255 - paper
    ink = np.clip(gray - paper, 0, None)  # the paper's own shade is not ink
    rows, cols = np.nonzero(ink > 0.25 * ink.max()) if ink.max() > 0 else ((), ())
    if len(rows) == 0:
        raise ImageError(f"{path} shows no digit (a uniform picture)")
    ink = ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    scale = 20 / max(ink.shape)
    size = (max(1, round(ink.shape[1] * scale)), max(1, round(ink.shape[0] * scale)))
    digit = np.asarray(Image.fromarray(ink * (255 / ink.max())).resize(size, Image.LANCZOS))
    digit = np.clip(digit, 0, 255)
    com_row, com_col = (np.indices(digit.shape) * digit).reshape(2, -1).sum(1) / digit.sum()
    top, left = (int(round(14 - com_row)), int(round(14 - com_col)))
    top, left = min(max(top, 0), 28 - digit.shape[0]), min(max(left, 0), 28 - digit.shape[1])
    canvas = np.zeros((28, 28), np.float32)
    canvas[top:top + digit.shape[0], left:left + digit.shape[1]] = digit
    return np.round(canvas).astype(np.uint8)[..., None]


@jax.jit
def predict(state, images):
    """Class probabilities [N, 10] of uint8 images [N, 28, 28, 1]."""
    return jax.nn.softmax(state.apply_fn({"params": state.params}, images))


@jax.jit
def log_probabilities(state, images):
    """Log class probabilities [N, 10] of uint8 images [N, 28, 28, 1]: finite where a probability
    rounds to 0."""
    return jax.nn.log_softmax(state.apply_fn({"params": state.params}, images))


def evaluate(state, images, labels, batch_size=1000):
    """{"loss", "accuracy"} of the model over every example, as train.py's log gives them."""
    log_probs = np.concatenate([log_probabilities(state, images[start:start + batch_size])
                                for start in range(0, len(images), batch_size)])
    loss = -log_probs[np.arange(len(labels)), labels].astype(np.float64).mean()
    return {"loss": float(loss), "accuracy": float(100 * (log_probs.argmax(-1) == labels).mean())}


def grid_figure(images, predicted, labels):
    """The quick start's 5x5 picture: each image titled with its prediction, wrong ones in red."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 12))
    axs = fig.subplots(5, 5)
    for ax, image, guess, label in zip(axs.flatten(), images, predicted, labels):
        ax.imshow(image[..., 0], cmap="gray")
        ax.set_title(f"label={guess}" + ("" if guess == label else f" (true {label})"),
                     color="black" if guess == label else "red")
        ax.axis("off")
    return fig


def parse_args(argv=None):
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--ckpt", nargs="?", const=DEFAULT_CHECKPOINT, default=DEFAULT_CHECKPOINT,
                        help="checkpoint of train.py (no value: train.py's default)")
    parser.add_argument("--image", nargs="+", metavar="FILE",
                        help="pictures to classify: PNG, JPEG, GIF, TIFF, WebP, ...")
    parser.add_argument("--data-dir", help="folder with the four IDX files; default: download them")
    parser.add_argument("--out", help="the 5x5 prediction grid; default: predictions.png in "
                        "--ckpt's folder")
    return parser.parse_args(argv)


def run(args):
    """Classifies --image files, or evaluates the test split and draws the first 25."""
    state, epoch, config, _ = outputs.load_checkpoint(args.ckpt)
    if args.image:
        images = np.stack([mnist_like(path) for path in args.image])
        for path, probs in zip(args.image, np.asarray(predict(state, images))):
            first, second, third = np.argsort(probs)[::-1][:3]
            print(f"{path}: {first} ({100 * probs[first]:.1f}%), then {second} "
                  f"({100 * probs[second]:.1f}%), {third} ({100 * probs[third]:.1f}%)")
        return
    images, labels = input_pipeline.load_dataset(config.dataset, args.data_dir, ["test"])["test"]
    tested = evaluate(state, images, labels)
    print(f"test epoch: {epoch}, loss: {tested['loss']:.5f}, accuracy: {tested['accuracy']:.2f}",
          flush=True)
    predicted = np.asarray(predict(state, images[:25])).argmax(-1)
    print("predicted:", " ".join(map(str, predicted)))
    print("true:     ", " ".join(map(str, labels[:25])))
    out = args.out or os.path.join(os.path.dirname(args.ckpt), "predictions.png")
    outputs.save_figure(out, grid_figure(images[:25], predicted, labels[:25]))
    print(f"wrote {out}")


def main(argv=None):
    """Runs run() and turns every error a user can cause into one line on stderr."""
    args = parse_args(argv)
    xla.use_compilation_cache()
    try:
        run(args)
    except (outputs.CheckpointError, input_pipeline.DataError, ImageError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # writing --out: a full disk, a read-only folder, ...
        sys.exit(f"error: cannot write {e.filename}: {e.strerror}; {outputs.what_to_do(e)} or pick "
                 f"another folder")


if __name__ == "__main__":
    main()
