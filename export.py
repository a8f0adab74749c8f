"""Exports a checkpoint of train.py for other runtimes: `python export.py model.onnx model.jax [--ckpt PATH]`.

The exported function takes images as MNIST stores them, uint8 [N, 28, 28, 1] with any N, and
returns class probabilities, float32 [N, 10]. The format follows the file name:
  .onnx  ONNX (opset 13), for onnxruntime and the many runtimes that read ONNX; via jax2onnx
  .jax   a serialized jax.export (StableHLO) that jax alone loads back, no Flax, no code of ours
"""
import argparse
import logging
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

import outputs
import train

DEFAULT_CHECKPOINT = os.path.join("workdir", outputs.CHECKPOINT)
# Opset 13 is the oldest with Softmax over one axis, as here, so older runtimes load the file too.
ONNX_OPSET = 13
# The .jax file holds one program for each: a file written on a laptop runs on a GPU server.
JAX_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


class ExportError(Exception):
    """The export cannot be written; the message says why and what to do."""


def classifier(params):
    """The exported function: uint8 images [N, 28, 28, 1] -> class probabilities [N, 10]."""
    return lambda images: jax.nn.softmax(train.logits(params, images))


def images_spec():
    """uint8 [N, 28, 28, 1] with a symbolic batch size N."""
    batch, = jax.export.symbolic_shape("N")
    return jax.ShapeDtypeStruct((batch, 28, 28, 1), jnp.uint8)


def to_onnx_bytes(params):
    """The classifier as an ONNX model, serialized; input 'images', output 'probabilities'."""
    from jax2onnx import to_onnx

    logging.getLogger("onnx_ir").setLevel(logging.ERROR)  # warns of untyped shape constants it skips
    model = to_onnx(classifier(params), [images_spec()], opset=ONNX_OPSET, model_name="mnist_cnn",
                    input_names=["images"], output_names=["probabilities"])
    return model.SerializeToString()


def to_jax_bytes(params):
    """The classifier as a serialized jax.export, for every platform in JAX_PLATFORMS."""
    exported = jax.export.export(jax.jit(classifier(params)), platforms=JAX_PLATFORMS)(images_spec())
    return bytes(exported.serialize())


FORMATS = {".onnx": to_onnx_bytes, ".jax": to_jax_bytes}


def check_destination(path):
    """ExportError unless path has a known suffix and its folder exists and is writable."""
    suffix = os.path.splitext(path)[1]
    if suffix not in FORMATS:
        raise ExportError(f"{path}: unknown export format {suffix or '(no suffix)'}; "
                          f"name the file *.onnx (ONNX) or *.jax (jax.export)")
    folder = os.path.dirname(path) or "."
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise ExportError(f"cannot write into {folder} ({e.strerror}); pick an existing, writable folder") from None


def parse_args(argv=None):
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="+", help="files to write: *.onnx, *.jax")
    parser.add_argument("--ckpt", default=DEFAULT_CHECKPOINT,
                        help=f"checkpoint of train.py (default: {DEFAULT_CHECKPOINT})")
    return parser.parse_args(argv)


def main(argv=None):
    """Writes each export whole or not at all; every error a user can cause is one line on stderr."""
    args = parse_args(argv)
    try:
        for path in args.out:
            check_destination(path)
        state, epoch, _, _ = train.load_checkpoint(args.ckpt)
        params = jax.device_get(state.params)
        for path in args.out:
            start = time.perf_counter()
            outputs.write_atomic(path, FORMATS[os.path.splitext(path)[1]](params))
            print(f"wrote {path}: epoch {epoch} of {args.ckpt}, {os.path.getsize(path) / 1e6:.1f} MB, "
                  f"{time.perf_counter() - start:.1f} s")
    except (ExportError, outputs.CheckpointError) as e:
        sys.exit(f"error: {e}")
    except outputs.WriteError as e:  # the disk filled up, or the folder went away, while writing
        sys.exit(f"error: {e}; free space or pick another folder")
    except KeyboardInterrupt:  # write_atomic removed its temp file
        sys.exit("interrupted; no partial file was left")


if __name__ == "__main__":
    main()
