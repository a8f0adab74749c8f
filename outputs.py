"""What train.py writes to --workdir, one run at a time, each file whole or not at all."""
import dataclasses
import errno
import fcntl
import functools
import io
import json
import numbers
import os

import jax
import numpy as np
from flax import serialization, traverse_util

import input_pipeline
from model import CNN, MNIST_IMAGE, RunConfig, create_train_state

CHECKPOINT, HISTORY, PLOT = "checkpoint.msgpack", "history.json", "metrics.png"
LOCK = ".lock"  # held by the run that writes the folder, and naming its process
HISTORY_KEYS = ("epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy")  # the plot's


class CheckpointError(Exception):
    """A checkpoint, or --workdir, cannot be read, written or used; the message names the file."""


def claim_workdir(workdir, resume):
    """workdir, created and locked for this process (the returned file; the OS unlocks it when the
    process ends); CheckpointError if it is not writable, in use, or holds a run and not resume."""
    path = os.path.join(workdir, LOCK)
    try:
        os.makedirs(workdir, exist_ok=True)
        # Read-only: a file open for writing would keep its file system from turning read-only.
        lock = os.fdopen(os.open(path, os.O_RDONLY | os.O_CREAT, 0o644))
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with open(path, "w") as f:
            print(os.getpid(), file=f)  # for the line below, to the next run that tries
    except BlockingIOError:
        raise CheckpointError(f"--workdir {workdir} is in use by another run (process "
                              f"{lock.read().strip()}); let it end, or pick another --workdir"
                              ) from None
    except OSError as e:
        raise CheckpointError(f"--workdir {workdir} is not writable: {e.strerror}") from None
    if not resume and os.path.lexists(os.path.join(workdir, CHECKPOINT)):
        raise CheckpointError(f"--workdir {workdir} holds a run already, in {CHECKPOINT}; continue "
                              f"it with --resume, or pick another --workdir")
    return lock


def write_atomic(path, data):
    """bytes to path through a temp file, so that readers see the old or the new file; or the
    OSError of the cause (named for path), the file as it was, no temp file left behind."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from None  # path, not the temp file's name
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def what_to_do(error):
    """What a user can do about a failed write: free space, clear the path or make it writable."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return "free space"
    if error.errno in (errno.EISDIR, errno.ENOTDIR):
        return f"move what is at {error.filename} out of the way"
    return f"make {os.path.dirname(error.filename) or '.'} writable"


def read_checkpoint(path):
    """The checkpoint dict, its config a RunConfig; CheckpointError if unreadable or foreign."""
    try:
        with open(path, "rb") as f:
            checkpoint = serialization.msgpack_restore(f.read())
        checkpoint["config"] = RunConfig(**checkpoint["config"])
        if set(checkpoint) != {"state", "epoch", "config", "history"} or not well_formed(
                checkpoint):
            raise ValueError
        return checkpoint
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror}") from None
    except Exception:  # msgpack raises many unrelated types on foreign or truncated bytes
        raise CheckpointError(f"{path} is not a checkpoint of train.py, or it is truncated"
                              ) from None


def well_formed(checkpoint):
    """Whether a checkpoint's settings, epoch and history have the types train.py writes."""
    config, epoch, history = checkpoint["config"], checkpoint["epoch"], checkpoint["history"]
    return (all(isinstance(getattr(config, f.name), f.type) or f.type is float and isinstance(
                getattr(config, f.name), int) for f in dataclasses.fields(config))
            and config.dataset in input_pipeline.DATASETS
            and isinstance(epoch, int) and isinstance(history, list) and len(history) == epoch
            and all(isinstance(h, dict) and all(isinstance(h.get(key), numbers.Real)
                                                for key in HISTORY_KEYS) for h in history))


def load_checkpoint(path, model=CNN()):
    """(state, epoch, config, history) of a checkpoint whose arrays fit a state of `model`."""
    checkpoint = read_checkpoint(path)
    # The shapes alone: eval_shape traces create_train_state without compiling or running it. The
    # optimizer's settings are the checkpoint's; its seed only draws values that the file replaces.
    settings = dataclasses.replace(checkpoint["config"], seed=0)
    target = jax.eval_shape(lambda: create_train_state(model, settings, MNIST_IMAGE))
    flat = functools.partial(traverse_util.flatten_dict, keep_empty_nodes=True)  # keys of any type
    saved, expected = checkpoint["state"], flat(serialization.to_state_dict(target))
    leaves = flat(saved) if isinstance(saved, dict) else {}
    if leaves.keys() != expected.keys() or not all(
            got is want if want is traverse_util.empty_node  # an empty node where one belongs
            else np.shape(got) == want.shape and np.asarray(got).dtype.kind == want.dtype.kind
            for got, want in zip(map(leaves.get, expected), expected.values())):
        raise CheckpointError(f"{path} does not fit this model (other parameter shapes)")
    if not all(np.isfinite(leaf).all() for leaf in leaves.values()
               if leaf is not traverse_util.empty_node):
        raise CheckpointError(f"{path} holds parameters that are not finite numbers; it is damaged")
    return (serialization.from_state_dict(target, saved), checkpoint["epoch"], checkpoint["config"],
            checkpoint["history"])


def last_checkpoint(workdir):
    """What a line that stops the run says of the checkpoint in workdir, and how to go on."""
    path = os.path.join(workdir, CHECKPOINT)
    try:
        epoch = read_checkpoint(path)["epoch"]
    except CheckpointError:
        return "no checkpoint was saved yet", "run again"
    return f"last checkpoint: {path} (epoch {epoch})", "continue with --resume"


def plot_history(history):
    """The quick start's two panels: loss and accuracy per epoch, train and test; a Figure."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(15, 5))
    epochs = [h["epoch"] for h in history]
    for ax, metric in zip(fig.subplots(1, 2), ("loss", "accuracy")):
        ax.set_title(metric.capitalize())
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for split in ("train", "test"):
            ax.plot(epochs, [h[f"{split}_{metric}"] for h in history], label=f"{split}_{metric}")
        ax.legend()
    return fig


def save_figure(path, figure):
    """A matplotlib Figure as a PNG file, written whole or not at all."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    write_atomic(path, buffer.getvalue())


def save(workdir, state, epoch, config, history):
    """The run so far into workdir: a checkpoint (all it takes to resume), its history, its plot."""
    checkpoint = {"state": serialization.to_state_dict(jax.device_get(state)), "epoch": epoch,
                  "config": dataclasses.asdict(config), "history": history}
    write_atomic(os.path.join(workdir, CHECKPOINT), serialization.msgpack_serialize(checkpoint))
    write_atomic(os.path.join(workdir, HISTORY), json.dumps(history, indent=1).encode())
    save_figure(os.path.join(workdir, PLOT), plot_history(history))
