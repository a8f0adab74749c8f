"""Trains the Flax quick start's CNN on MNIST: `python train.py --epochs 10`. `--help` lists the flags.

Data parallel over every device (jax.sharding): batches are split along the batch axis, the
parameters and optimizer state are replicated, and jit inserts the gradient all-reduce.
"""
import argparse
import functools
import math
import os
import signal
import sys
import threading
import time

import memory

if __name__ == "__main__":  # before the imports below (2.6 s), which a restart repeats
    memory.restart_with_huge_pages(__file__)

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization
from flax.training import train_state
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

import distributed
import input_pipeline
import outputs
from model import CNN
from xla import jit_with_xla_options

# Train steps per jitted call (a lax.scan over a stack of batches), and whether the scan is
# unrolled, by backend. XLA:CPU: 5 unrolled, the measured best (PERFORMANCE.md); a rolled scan is 8x
# slower there. GPUs and TPUs: a long rolled scan, so that the host's loop and its transfers
# (numpy batches, one call at a time) stop setting the pace.
CALLS = {"cpu": (5, True)}
ACCELERATOR_CALLS = (500, False)
EVAL_BATCH_SIZE = 1000
# Guessing gives a loss of ln 10 = 2.30. An epoch that averages far above it has diverged
# (--learning-rate 1e4: 8.9e15 in epoch 1); healthy runs average at most 0.51 in epoch 1
# (learning rates 0.001 to 0.1 on MNIST, PERFORMANCE.md).
DIVERGED_LOSS = 10 * math.log(10)


def backend_calls():
    """(steps per call, unrolled) for the backend JAX runs on."""
    return CALLS.get(jax.default_backend(), ACCELERATOR_CALLS)


class TrainingError(Exception):
    """Training cannot start or go on; the message says why and what to do."""


class SettingsError(TrainingError):
    """The flags do not fit the devices: every process of a distributed run finds it alike."""


@functools.partial(jax.jit, static_argnames=("learning_rate", "momentum"))  # one compilation, not one per op
def create_train_state(seed, learning_rate, momentum):
    """A fresh TrainState: CNN parameters from jax.random.key(seed), SGD with momentum."""
    model = CNN()
    params = model.init(jax.random.key(seed), jnp.ones([1, 28, 28, 1]))["params"]
    return train_state.TrainState.create(apply_fn=model.apply, params=params,
                                         tx=optax.sgd(learning_rate, momentum))


def logits(params, images):
    """The model's logits of uint8 images."""
    return CNN().apply({"params": params}, images.astype(jnp.float32) / 255)


def metric_sums(batch_logits, labels, mask):
    """[loss sum, correct count, example count] over the examples where mask is 1."""
    losses = optax.softmax_cross_entropy_with_integer_labels(batch_logits, labels)
    correct = batch_logits.argmax(-1) == labels
    return jnp.stack([(losses * mask).sum(), (correct * mask).sum(), mask.sum()])


def train_step(state, images, labels):
    """One SGD step on a uint8 batch; returns the new state and the batch's metric sums."""
    def loss_fn(params):
        batch_logits = logits(params, images)
        return optax.softmax_cross_entropy_with_integer_labels(batch_logits, labels).mean(), batch_logits

    grads, batch_logits = jax.grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads), metric_sums(batch_logits, labels, jnp.ones(labels.shape))


@jit_with_xla_options(donate_argnums=0, static_argnames="unroll")
def train_steps(state, sums, images, labels, unroll=True):
    """train_step over a stack of batches [k, B, ...]; adds their metric sums to `sums`."""
    if len(images) == 1:
        # lax.scan emits a while loop for a single step even unrolled, and XLA:CPU runs the
        # convolution gradients inside a loop as plain loops: 270 ms a step, not 14 (PERFORMANCE.md).
        state, batch_sums = train_step(state, images[0], labels[0])
        return state, sums + batch_sums
    state, batch_sums = jax.lax.scan(lambda s, batch: train_step(s, *batch), state,
                                     (images, labels), unroll=unroll)
    return state, sums + batch_sums.sum(0)


@jit_with_xla_options()
def eval_step(params, images, labels, mask):
    """Metric sums of one padded evaluation batch."""
    return metric_sums(logits(params, images), labels, mask)


def make_mesh():
    """A 1-D mesh over every device of every process, named 'batch'."""
    return jax.make_mesh((jax.device_count(),), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))


def shard(mesh, spec, array):
    """A global array from this process's share of `array`, split along the axis named 'batch'."""
    axis = spec.index("batch")
    share = array.shape[axis] // jax.process_count()
    local = np.take(array, np.arange(share) + jax.process_index() * share, axis=axis)
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), local)


def train_epoch(state, mesh, images, labels, config, epoch, calls):
    """One pass over the training set in jitted calls of `calls` = (steps, unrolled); returns
    the state and [loss, accuracy %, seconds]."""
    steps_per_call, unroll = calls
    sums = jax.device_put(jnp.zeros(3), NamedSharding(mesh, P()))
    batches = input_pipeline.train_batches(images, labels, config["batch_size"], config["seed"],
                                           epoch, steps_per_call)
    steps = len(images) // config["batch_size"]
    start, in_flight = time.perf_counter(), []
    with tqdm(total=steps, disable=not sys.stderr.isatty() or jax.process_index() > 0, leave=False,
              unit="step") as bar:
        for stack_images, stack_labels in batches:
            state, sums = train_steps(state, sums, shard(mesh, P(None, "batch"), stack_images),
                                      shard(mesh, P(None, "batch"), stack_labels), unroll)
            # Keep two calls in flight, not the whole epoch: XLA:CPU with several devices on few
            # cores deadlocks with a deep queue, and a NaN loss stops the run within a few steps.
            in_flight.append(sums)
            if len(in_flight) > 2 and not np.isfinite(float(in_flight.pop(0)[0])):
                break
            bar.update(len(stack_labels))
        loss_sum, correct, count = np.asarray(sums, np.float64)
    if not loss_sum / count < DIVERGED_LOSS:  # also catches nan
        raise TrainingError(f"the loss became {loss_sum / count:.4g} in epoch {epoch}; lower --learning-rate")
    return state, [float(loss_sum / count), float(100 * correct / count), time.perf_counter() - start]


def evaluate(params, mesh, images, labels):
    """[loss, accuracy %] over every example: the last batch is padded and masked out."""
    batch_size = -(-EVAL_BATCH_SIZE // jax.device_count()) * jax.device_count()
    batch_sums = [eval_step(params, *(shard(mesh, P("batch"), a) for a in batch))
                  for batch in input_pipeline.eval_batches(images, labels, batch_size)]
    loss_sum, correct, count = np.sum(jax.device_get(batch_sums), 0, np.float64)
    return [float(loss_sum / count), float(100 * correct / count)]


def load_checkpoint(path):
    """(state, epoch, config, history) of a checkpoint, checked against the model's shapes."""
    checkpoint = outputs.read_checkpoint(path)
    config = checkpoint["config"]
    # The shapes alone: eval_shape traces create_train_state without compiling or running it.
    target = jax.eval_shape(lambda: create_train_state(config["seed"], config["learning_rate"],
                                                       config["momentum"]))
    saved, expected = checkpoint["state"], serialization.to_state_dict(target)
    if jax.tree.structure(saved) != jax.tree.structure(expected) or any(
            np.shape(a) != b.shape for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(expected))):
        raise outputs.CheckpointError(f"{path} does not fit this model (other parameter shapes)")
    return serialization.from_state_dict(target, saved), checkpoint["epoch"], config, checkpoint["history"]


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
    """The command line; defaults are the Flax quick start's."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--epochs", type=positive(int), default=10, help="train up to this epoch")
    parser.add_argument("--batch-size", type=positive(int), default=32, help="global batch size")
    parser.add_argument("--learning-rate", type=positive(float), default=0.01, help="SGD learning rate")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialization and shuffling")
    parser.add_argument("--dataset", choices=input_pipeline.DATASETS, default="mnist")
    parser.add_argument("--data-dir", help="folder with the four IDX files (raw or .gz); "
                        "default: download through TFDS")
    parser.add_argument("--workdir", default="./workdir", help="where checkpoint, history and plot go")
    parser.add_argument("--resume", action="store_true", help="continue the run in --workdir")
    distributed.add_flags(parser, positive(int))
    args = parser.parse_args(argv)
    distributed.check_flags(parser, args)
    return args


def train(args, interrupted):
    """Trains and evaluates epoch by epoch, writing checkpoint, history and plot after each;
    stops with KeyboardInterrupt between epochs once the `interrupted` event is set."""
    config = {key: getattr(args, key) for key in outputs.CONFIG_KEYS}
    mesh = make_mesh()
    if config["batch_size"] % jax.device_count():
        raise SettingsError(f"--batch-size {config['batch_size']} is not divisible by the "
                            f"{jax.device_count()} devices; pick a multiple of {jax.device_count()}")
    writer = jax.process_index() == 0
    checkpoint_path = os.path.join(args.workdir, outputs.CHECKPOINT)
    if writer:
        outputs.make_workdir(args.workdir)
    data = input_pipeline.load_dataset(args.dataset, args.data_dir)
    train_images, train_labels = data["train"]
    if config["batch_size"] > len(train_images):
        raise TrainingError(f"--batch-size {config['batch_size']} is larger than the "
                            f"{len(train_images)} training images")
    if args.resume and writer:
        state, done, saved_config, history = load_checkpoint(checkpoint_path)
        changed = [f"--{k.replace('_', '-')} {config[k]} (checkpoint: {saved_config[k]})"
                   for k in outputs.CONFIG_KEYS if config[k] != saved_config[k]]
        if changed:
            raise TrainingError(f"cannot resume with other settings than the checkpoint's: {', '.join(changed)}")
        if done >= args.epochs:
            print(f"{checkpoint_path} already holds epoch {done}; pass a larger --epochs to go on")
    else:
        state, done, history = create_train_state(args.seed, args.learning_rate, args.momentum), 0, []
    if args.resume:
        # Process 0 alone writes checkpoints, so it alone reads one and sends it to the others:
        # their hosts need no shared --workdir.
        state, done = multihost_utils.broadcast_one_to_all((state, done))
    state, first_epoch = jax.device_put(state, NamedSharding(mesh, P())), int(done) + 1
    calls = backend_calls()
    for epoch in range(first_epoch, args.epochs + 1):
        if interrupted.is_set():
            raise KeyboardInterrupt
        state, (train_loss, train_accuracy, seconds) = train_epoch(
            state, mesh, train_images, train_labels, config, epoch, calls)
        test_loss, test_accuracy = evaluate(state.params, mesh, *data["test"])
        history.append({"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_accuracy,
                        "test_loss": test_loss, "test_accuracy": test_accuracy, "epoch_time": seconds})
        if writer:
            print(f"train epoch: {epoch}, loss: {train_loss:.5f}, accuracy: {train_accuracy:.2f}")
            print(f"test epoch: {epoch}, loss: {test_loss:.5f}, accuracy: {test_accuracy:.2f}")
            print(f"epoch {epoch} time: {seconds:.2f} s, "
                  f"{len(train_labels) // config['batch_size'] * config['batch_size'] / seconds:.0f} images/s",
                  flush=True)
            outputs.save(args.workdir, state, epoch, config, history)
        memory.release_free_memory()
    return state


def last_checkpoint(workdir):
    """What a line that stops the run says of the checkpoint in workdir, and how to go on."""
    path = os.path.join(workdir, outputs.CHECKPOINT)
    try:
        epoch = outputs.read_checkpoint(path)["epoch"]
    except outputs.CheckpointError:
        return "no checkpoint was saved yet", "run again"
    return f"last checkpoint: {path} (epoch {epoch})", "continue with --resume"


def main(argv=None):
    """Runs train() and turns every error a user can cause into one line on stderr."""
    args = parse_args(argv)
    memory.limit_arenas()
    interrupted = threading.Event()

    def interrupt(signum, frame):
        # The event too: a KeyboardInterrupt raised inside JAX's garbage-collection callback is
        # swallowed there (seen in 1 of 15 runs), so train() checks the event between epochs.
        interrupted.set()
        raise KeyboardInterrupt

    for signum in (signal.SIGINT, signal.SIGTERM):  # SIGTERM ends like Ctrl-C
        signal.signal(signum, interrupt)
    every_process = False  # whether every process of a distributed run stops with this error
    try:
        if args.distributed:
            distributed.start(args)
        train(args, interrupted)
        return
    except (TrainingError, outputs.CheckpointError, input_pipeline.DataError, distributed.StartError) as e:
        message, every_process = f"error: {e}", isinstance(e, SettingsError)
    except outputs.WriteError as e:  # a full disk, a quota: the previous files are intact
        saved, go_on = last_checkpoint(args.workdir)
        message = f"error: {e}; {saved}; free space, then {go_on}"
    except KeyboardInterrupt:
        message = "interrupted; {}; {}".format(*last_checkpoint(args.workdir))
    except (jax.errors.JaxRuntimeError, ValueError) as e:  # a collective whose peer is gone (Gloo: ValueError)
        if not args.distributed:
            raise
        message = distributed.lost_peer_message(e)
    if args.distributed:
        distributed.leave(message, every_process)
    sys.exit(message)


if __name__ == "__main__":
    main()
