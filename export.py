"""Exports a checkpoint for other runtimes: `python export.py model.onnx model.jax [--ckpt PATH]`.

The exported function takes images as MNIST stores them, uint8 [N, 28, 28, 1] with any N, and
returns class probabilities, float32 [N, 10]. The format follows the file name:
  .onnx  ONNX (opset 13), for onnxruntime and the many runtimes that read ONNX; via jax2onnx
  .jax   a serialized jax.export (StableHLO) that JAX alone loads back, no Flax, no code of ours,
         in every JAX from 0.10.2 on, whichever of them wrote it
"""
import argparse
import dataclasses
import logging
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

import outputs

DEFAULT_CHECKPOINT = os.path.join("workdir", outputs.CHECKPOINT)
# Opset 13 is the oldest with Softmax over one axis, as here, so older runtimes load the file too.
ONNX_OPSET = 13
# The .jax file holds one program for each: a file written on a laptop runs on a GPU server.
JAX_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
# The oldest JAX that requirements.txt admits (the last for Python 3.11), and its StableHLO: JAX
# writes the StableHLO of about a month before its release, which older JAX cannot read.
OLDEST_JAX, OLDEST_STABLEHLO = "0.10.2", "1.17.0"


def classifier(state):
    """The exported function: uint8 images [N, 28, 28, 1] -> class probabilities [N, 10]."""
    return lambda images: jax.nn.softmax(state.apply_fn({"params": state.params}, images))


def images_spec():
    """uint8 [N, 28, 28, 1] with a symbolic batch size N."""
    batch, = jax.export.symbolic_shape("N")
    return jax.ShapeDtypeStruct((batch, 28, 28, 1), jnp.uint8)


def to_onnx_bytes(state):
    """The classifier as an ONNX model, serialized; input 'images', output 'probabilities'."""
    from jax2onnx import to_onnx

    logging.getLogger("onnx_ir").setLevel(logging.ERROR)  # warns of untyped constants it skips
    model = to_onnx(classifier(state), [images_spec()], opset=ONNX_OPSET, model_name="mnist_cnn",
                    input_names=["images"], output_names=["probabilities"])
    return model.SerializeToString()


def to_jax_bytes(state):
    """The classifier as a serialized jax.export, for every platform in JAX_PLATFORMS, in a
    StableHLO no newer than OLDEST_STABLEHLO."""
    from jaxlib.mlir.dialects import stablehlo

    exported = jax.export.export(jax.jit(classifier(state)), platforms=JAX_PLATFORMS)(images_spec())
    module = stablehlo.deserialize_portable_artifact_str(exported.mlir_module_serialized)
    jax_choice = stablehlo.get_version_from_compatibility_requirement(
        stablehlo.StablehloCompatibilityRequirement.WEEK_4)
    target = stablehlo.get_smaller_version(OLDEST_STABLEHLO, jax_choice)  # JAX's, where older
    exported = dataclasses.replace(
        exported, mlir_module_serialized=stablehlo.serialize_portable_artifact_str(module, target))
    return bytes(exported.serialize())


FORMATS = {".onnx": to_onnx_bytes, ".jax": to_jax_bytes}


def destination_problem(path):
    """Why path cannot be written as an export, before any work: an unknown suffix, or a folder
    that does not exist or is not writable; None if it can."""
    suffix = os.path.splitext(path)[1]
    if suffix not in FORMATS:
        return (f"{path}: unknown export format {suffix or '(no suffix)'}; "
                f"name the file *.onnx (ONNX) or *.jax (jax.export)")
    folder = os.path.dirname(path) or "."
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        return f"cannot write into {folder} ({e.strerror}); pick an existing, writable folder"
    return None


def parse_args(argv=None):
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="+", help="files to write: *.onnx, *.jax")
    parser.add_argument("--ckpt", default=DEFAULT_CHECKPOINT,
                        help=f"checkpoint of train.py (default: {DEFAULT_CHECKPOINT})")
    args = parser.parse_args(argv)
    for path in args.out:
        if problem := destination_problem(path):
            parser.error(problem)
    return args


def main(argv=None):
    """Writes each export whole or not at all; every error a user can cause is one line."""
    args = parse_args(argv)
    try:
        state, epoch, _, _ = outputs.load_checkpoint(args.ckpt)
        for path in args.out:
            start = time.perf_counter()
            outputs.write_atomic(path, FORMATS[os.path.splitext(path)[1]](state))
            loads = (f", JAX {jax.__version__}; loads in JAX {OLDEST_JAX} and newer"
                     if path.endswith(".jax") else "")
            seconds, megabytes = time.perf_counter() - start, os.path.getsize(path) / 1e6
            print(f"wrote {path}: epoch {epoch} of {args.ckpt}, {megabytes:.1f} MB, "
                  f"{seconds:.1f} s{loads}")
    except outputs.CheckpointError as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # the disk filled up, or the folder went away or turned read-only
        sys.exit(f"error: cannot write {e.filename}: {e.strerror}; {outputs.what_to_do(e)} or pick "
                 f"another folder")
    except KeyboardInterrupt:  # write_atomic removed its temp file
        sys.exit("interrupted; no partial file was left")


if __name__ == "__main__":
    main()
