"""Trains the Flax quick start's CNN on MNIST: `python train.py --epochs 10`. `--help` lists the flags.

The train_step and eval_step, jitted in one place with several steps per call, the epoch loop and
its log; then data parallelism over every device (batches split, parameters replicated, jit adds
the gradient all-reduce), resume, and one line on stderr for every error a user can cause.
"""
import argparse
import dataclasses
import math
import os
import signal
import sys
import threading
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

import distributed
import input_pipeline
import outputs
import xla
from model import Config, create_train_state, model_logits

EVAL_BATCH_SIZE = 1000
# Train steps per jitted call, and whether lax.scan unrolls them, by backend (PERFORMANCE.md,
# section 7). XLA:CPU: 5, unrolled, since in a rolled loop it runs the gradient convolutions as
# plain loops. Accelerators: a long rolled scan, so that the host's loop does not set the pace.
STEPS_PER_CALL = {"cpu": (5, True)}
ACCELERATOR_STEPS_PER_CALL = (500, False)
# Guessing gives a loss of ln 10 = 2.30: an epoch that averages far above it has diverged.
DIVERGED_LOSS = 10 * math.log(10)


def train_step(state, batch):
    """One SGD step on a batch of uint8 images; returns the new state and the batch's metric sums."""
    def loss_fn(params):
        logits = model_logits(state, params, batch["image"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean(), logits

    grads, logits = jax.grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads), metric_sums(logits, batch["label"], jnp.ones(batch["label"].shape))


def eval_step(state, batch):
    """The metric sums of an evaluation batch, whose padding (mask 0) does not count."""
    logits = model_logits(state, state.params, batch["image"])
    return metric_sums(logits, batch["label"], batch["mask"])


def metric_sums(logits, labels, mask):
    """Loss sum, correct count and example count where mask is 1: sums keep an epoch's metrics exact."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = logits.argmax(-1) == labels
    return {"loss": (losses * mask).sum(), "correct": (correct * mask).sum(), "count": mask.sum()}


def train_steps(state, sums, batches, unroll=True):
    """train_step over a stack of batches [k, B, ...], in one jitted call; adds their metric sums to sums."""
    if len(batches["label"]) == 1:
        # lax.scan makes a while loop even of one step, and XLA:CPU runs the gradient convolutions
        # inside a loop as plain loops (PERFORMANCE.md, section 7).
        state, batch_sums = train_step(state, jax.tree.map(lambda a: a[0], batches))
        return state, jax.tree.map(jnp.add, sums, batch_sums)
    state, batch_sums = jax.lax.scan(train_step, state, batches, unroll=unroll)
    return state, jax.tree.map(lambda total, stacked: total + stacked.sum(0), sums, batch_sums)


def jit_steps():
    """(train_steps, eval_step) jitted, the one place they are, as the loop runs them: with our XLA
    options less any the running XLA refuses, and train_steps donating the state it replaces."""
    options = xla.compiler_options()
    return (jax.jit(train_steps, donate_argnames="state", static_argnames="unroll", compiler_options=options),
            jax.jit(eval_step, compiler_options=options))


def steps_per_call():
    """(steps per jitted call, unrolled) for the backend JAX runs on."""
    return STEPS_PER_CALL.get(jax.default_backend(), ACCELERATOR_STEPS_PER_CALL)


def train_epoch(run_train_steps, state, mesh, images, labels, config, epoch, calls):
    """One pass over the training set, `calls` = (steps per call, unrolled); (state, epoch's metrics)."""
    steps, unroll = calls
    sums = jax.device_put({name: np.float32(0) for name in ("loss", "correct", "count")}, NamedSharding(mesh, P()))
    start, in_flight = time.perf_counter(), []
    with tqdm(total=len(images) // config.batch_size, unit="step", leave=False,
              disable=not sys.stderr.isatty() or jax.process_index() > 0) as bar:
        for batches in input_pipeline.train_batches(images, labels, config.batch_size, config.seed, epoch, steps):
            state, sums = run_train_steps(state, sums, shard(mesh, batches, batch_axis=1), unroll)
            # JAX runs calls asynchronously. Two in flight, not the whole epoch: XLA:CPU with several
            # devices on few cores deadlocks with a deep queue, and a NaN loss stops the run at once.
            in_flight.append(sums["loss"])
            if len(in_flight) > 2 and not np.isfinite(float(in_flight.pop(0))):
                break
            bar.update(len(batches["label"]))
    totals = {name: float(np.float64(value)) for name, value in jax.device_get(sums).items()}
    loss = totals["loss"] / totals["count"]
    if not loss < DIVERGED_LOSS:  # also catches nan
        raise TrainingError(f"the loss became {loss:.4g} in epoch {epoch}; lower --learning-rate")
    return state, {"loss": loss, "accuracy": 100 * totals["correct"] / totals["count"],
                   "seconds": time.perf_counter() - start}


def evaluate(run_eval_step, state, mesh, images, labels):
    """{"loss", "accuracy"} over every example: the last batch is padded and its padding masked out."""
    batch_size = -(-EVAL_BATCH_SIZE // jax.device_count()) * jax.device_count()
    sums = jax.device_get([run_eval_step(state, shard(mesh, batch, batch_axis=0))
                           for batch in input_pipeline.eval_batches(images, labels, batch_size)])
    totals = {name: np.sum([s[name] for s in sums], dtype=np.float64) for name in sums[0]}
    return {"loss": float(totals["loss"] / totals["count"]), "accuracy": float(100 * totals["correct"] / totals["count"])}


def train(config, workdir, resume, interrupted):
    """The epoch loop and its log, with the settings of `config`, writing to workdir; resume: go
    on from its checkpoint. Stops with KeyboardInterrupt between epochs once `interrupted` is set."""
    mesh = make_mesh()
    if config.batch_size % jax.device_count():
        raise TrainingError(f"--batch-size {config.batch_size} is not divisible by the {jax.device_count()} "
                            f"devices; pick a multiple of {jax.device_count()}", every_process=True)
    is_main_process = jax.process_index() == 0  # it alone prints and writes
    if is_main_process:
        outputs.make_workdir(workdir)
    data = input_pipeline.load_dataset(config.dataset, config.data_dir)
    num_train = len(data["train"][1])
    if config.batch_size > num_train:
        raise TrainingError(f"--batch-size {config.batch_size} is larger than the {num_train} training images")
    state, done, history = resume_or_start(config, workdir, resume, is_main_process)
    state = jax.device_put(state, NamedSharding(mesh, P()))
    run_train_steps, run_eval_step = jit_steps()
    images_per_epoch = num_train // config.batch_size * config.batch_size
    for epoch in range(done + 1, config.epochs + 1):
        if interrupted.is_set():
            raise KeyboardInterrupt
        state, trained = train_epoch(run_train_steps, state, mesh, *data["train"], config, epoch, steps_per_call())
        tested = evaluate(run_eval_step, state, mesh, *data["test"])
        history.append({"epoch": epoch, "train_loss": trained["loss"], "train_accuracy": trained["accuracy"],
                        "test_loss": tested["loss"], "test_accuracy": tested["accuracy"],
                        "epoch_time": trained["seconds"]})
        if is_main_process:
            print(f"train epoch: {epoch}, loss: {trained['loss']:.5f}, accuracy: {trained['accuracy']:.2f}")
            print(f"test epoch: {epoch}, loss: {tested['loss']:.5f}, accuracy: {tested['accuracy']:.2f}")
            print(f"epoch {epoch} time: {trained['seconds']:.2f} s, "
                  f"{images_per_epoch / trained['seconds']:.0f} images/s", flush=True)
            outputs.save(workdir, state, epoch, config, history)
    return state


def resume_or_start(config, workdir, resume, is_main_process):
    """(state, epochs done, history), fresh or resumed; process 0 alone reads the checkpoint and sends it."""
    if not (resume and is_main_process):
        state, done, history = create_train_state(config.seed, config.learning_rate, config.momentum), 0, []
    else:
        path = os.path.join(workdir, outputs.CHECKPOINT)
        state, done, saved, history = outputs.load_checkpoint(path, create_train_state)
        changed = [f"--{name.replace('_', '-')} {value} (checkpoint: {getattr(saved, name)})"
                   for name, value in dataclasses.asdict(config).items()
                   if name not in ("epochs", "data_dir") and value != getattr(saved, name)]
        if changed:
            raise TrainingError(f"cannot resume with other settings than the checkpoint's: {', '.join(changed)}")
        if done >= config.epochs:
            print(f"{path} already holds epoch {done}; pass a larger --epochs to go on")
    if resume:
        state, done = multihost_utils.broadcast_one_to_all((state, done))
    return state, int(done), history


def make_mesh():
    """A 1-D mesh over every device of every process, named 'batch'."""
    return jax.make_mesh((jax.device_count(),), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))


def shard(mesh, arrays, batch_axis):
    """Global arrays, split over the mesh along batch_axis, from this process's share of each array."""
    sharding = NamedSharding(mesh, P(*[None] * batch_axis, "batch"))
    share = next(iter(arrays.values())).shape[batch_axis] // jax.process_count()
    mine = np.arange(share) + jax.process_index() * share
    return {name: jax.make_array_from_process_local_data(sharding, np.take(array, mine, axis=batch_axis))
            for name, array in arrays.items()}


class TrainingError(Exception):
    """Training cannot start or go on; the message says why and what to do. every_process: every
    process of a distributed run finds it alike (flags that do not fit the devices)."""

    def __init__(self, message, every_process=False):
        super().__init__(message)
        self.every_process = every_process


def positive(kind):
    """An argparse type: `kind` (int or float) that must be > 0."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
        return value
    return parse


def parse_args(argv=None):
    """The command line: (the run's Config, all flags); the defaults are Config's, the Flax quick start's."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--epochs", type=positive(int), default=Config.epochs, help="train up to this epoch")
    parser.add_argument("--batch-size", type=positive(int), default=Config.batch_size, help="global batch size")
    parser.add_argument("--learning-rate", type=positive(float), default=Config.learning_rate, help="SGD learning rate")
    parser.add_argument("--momentum", type=float, default=Config.momentum, help="SGD momentum")
    parser.add_argument("--seed", type=int, default=Config.seed, help="seed of the initialization and shuffling")
    parser.add_argument("--dataset", choices=input_pipeline.DATASETS, default=Config.dataset)
    parser.add_argument("--data-dir", help="folder with the four IDX files (raw or .gz); default: download through TFDS")
    parser.add_argument("--workdir", default="./workdir", help="where checkpoint, history and plot go")
    parser.add_argument("--resume", action="store_true", help="continue the run in --workdir")
    distributed.add_flags(parser, positive(int))
    args = parser.parse_args(argv)
    distributed.check_flags(parser, args)
    if not 0 <= args.seed < 2 ** 63:  # what jax.random.key and numpy's generators take
        parser.error(f"argument --seed: must be 0 to {2 ** 63 - 1}, got {args.seed}")
    return Config(**{field.name: getattr(args, field.name) for field in dataclasses.fields(Config)}), args


def main(argv=None):
    """Runs train() and turns every error a user can cause into one line on stderr."""
    config, args = parse_args(argv)
    xla.use_compilation_cache(several_processes=args.distributed)
    interrupted = threading.Event()

    def interrupt(signum, frame):
        # The event too: JAX's garbage-collection callback swallows a KeyboardInterrupt raised in it.
        interrupted.set()
        raise KeyboardInterrupt

    for signum in (signal.SIGINT, signal.SIGTERM):  # SIGTERM ends like Ctrl-C
        signal.signal(signum, interrupt)
    every_process = False  # whether every process of a distributed run stops with this error
    try:
        if args.distributed:
            distributed.start(args)
        train(config, args.workdir, args.resume, interrupted)
        return
    except (TrainingError, outputs.CheckpointError, input_pipeline.DataError, distributed.StartError) as e:
        message, every_process = f"error: {e}", getattr(e, "every_process", False)
    except OSError as e:  # a write failed (full disk, read-only, ...): the files of the last epoch are intact
        saved, go_on = outputs.last_checkpoint(args.workdir)
        message = f"error: cannot write {e.filename}: {e.strerror}; {saved}; {outputs.what_to_do(e)}, then {go_on}"
    except KeyboardInterrupt:
        message = "interrupted; {}; {}".format(*outputs.last_checkpoint(args.workdir))
    except Exception as e:
        if not args.distributed:
            raise  # a bug: its traceback
        # Another process is gone, or a bug, whose traceback leave() prints: JAX's own exit would
        # wait for the other processes, then abort.
        message = distributed.lost_peer_message(e) if distributed.lost_peer(e) else traceback.format_exc().rstrip()
    if args.distributed:
        distributed.leave(message, every_process)
    sys.exit(message)


if __name__ == "__main__":
    main()
