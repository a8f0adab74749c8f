"""What train.py writes to --workdir after every epoch, and reads back: the checkpoint, the
history and the plot. Every file is written whole or not at all."""
import io
import json
import os
import tempfile

import jax
import numpy as np
from flax import serialization

CHECKPOINT, HISTORY, PLOT = "checkpoint.msgpack", "history.json", "metrics.png"
CONFIG_KEYS = ("dataset", "batch_size", "learning_rate", "momentum", "seed")  # the settings a checkpoint records


class CheckpointError(Exception):
    """A checkpoint, or --workdir, cannot be read, written or used; the message names the file."""


def make_workdir(workdir):
    """Creates workdir; CheckpointError before any training if files cannot be written there."""
    try:
        os.makedirs(workdir, exist_ok=True)
        tempfile.TemporaryFile(dir=workdir).close()
    except OSError as e:
        raise CheckpointError(f"--workdir {workdir} is not writable: {e.strerror}") from None


def write_atomic(path, data):
    """Writes bytes to path via a temp file and os.replace: readers see the old or the new file.
    When it cannot (disk full, quota, read-only), OSError naming the file and the reason, with the
    file as it was and no temp file left behind."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(f"cannot write {path}: {e.strerror}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path, state, epoch, config, history):
    """Everything needed to use or resume the run, as one msgpack file."""
    checkpoint = {"state": serialization.to_state_dict(jax.device_get(state)), "epoch": epoch,
                  "config": config, "history": history}
    write_atomic(path, serialization.msgpack_serialize(checkpoint))


def read_checkpoint(path):
    """The raw checkpoint dict; CheckpointError naming the file when it is missing or broken."""
    try:
        with open(path, "rb") as f:
            checkpoint = serialization.msgpack_restore(f.read())
        if not isinstance(checkpoint, dict) or set(checkpoint) != {"state", "epoch", "config", "history"} \
                or set(checkpoint["config"]) != set(CONFIG_KEYS):
            raise ValueError
        return checkpoint
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror}") from None
    except Exception:  # msgpack raises many unrelated types on foreign or truncated bytes
        raise CheckpointError(f"{path} is not a checkpoint of train.py, or it is truncated") from None


def load_checkpoint(path, create_train_state):
    """(state, epoch, config, history) of a checkpoint, checked against the shapes of the state
    that create_train_state(seed, learning_rate, momentum) makes."""
    checkpoint = read_checkpoint(path)
    config = checkpoint["config"]
    # The shapes alone: eval_shape traces create_train_state without compiling or running it.
    target = jax.eval_shape(lambda: create_train_state(config["seed"], config["learning_rate"], config["momentum"]))
    saved, expected = checkpoint["state"], serialization.to_state_dict(target)
    if jax.tree.structure(saved) != jax.tree.structure(expected) or any(
            np.shape(a) != b.shape for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(expected))):
        raise CheckpointError(f"{path} does not fit this model (other parameter shapes)")
    return serialization.from_state_dict(target, saved), checkpoint["epoch"], config, checkpoint["history"]


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
    ax_loss, ax_acc = fig.subplots(1, 2)
    epochs = [h["epoch"] for h in history]
    for ax, metric in ((ax_loss, "loss"), (ax_acc, "accuracy")):
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
    """Checkpoint, history and plot of the run so far, into workdir."""
    save_checkpoint(os.path.join(workdir, CHECKPOINT), state, epoch, config, history)
    write_atomic(os.path.join(workdir, HISTORY), json.dumps(history, indent=1).encode())
    save_figure(os.path.join(workdir, PLOT), plot_history(history))
