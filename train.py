"""Trains the Flax quick start's CNN on MNIST: `python train.py --epochs 10`; `--help` lists flags.

First the recipe, which copies alone; then the machinery that wraps it from outside: speed and data
parallelism where the steps are jitted, hosts, checkpoints, and one line for every error."""
import argparse
import contextlib
import dataclasses
import itertools
import os
import signal
import sys
import threading
import time
import traceback

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from tqdm import tqdm

import distributed
import input_pipeline
import outputs
import xla
from model import CNN, RunConfig, create_train_state

# --- The recipe: copy it, with Config, create_train_state and init_state from model.py ----------


def train_step(state, batch):
    """One SGD step on a batch; the new state and the batch's metric sums."""
    def loss_fn(params):
        logits = state.apply_fn({"params": params}, batch["image"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, logits
    grads, logits = jax.grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads), metric_sums(logits, batch["label"])


def eval_step(state, batch):
    """The metric sums of a batch."""
    return metric_sums(state.apply_fn({"params": state.params}, batch["image"]), batch["label"])


def metric_sums(logits, labels):
    """A batch's loss and correct answers, summed, and its size: sums keep the metrics exact."""
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()
    return {"loss": loss, "correct": (logits.argmax(-1) == labels).sum(), "count": len(labels)}


def metrics(sums):
    """Mean loss and accuracy (%) of metric sums."""
    sums = {name: float(np.float64(value)) for name, value in jax.device_get(sums).items()}
    return {"loss": sums["loss"] / sums["count"], "accuracy": 100 * sums["correct"] / sums["count"]}


def train_batches(images, labels, batch_size, seed, epoch):
    """An epoch's batches, shuffled in an order set by (seed, epoch); a last partial one dropped."""
    order = np.random.default_rng([seed, epoch]).permutation(len(images))
    for index in order[:len(order) // batch_size * batch_size].reshape(-1, batch_size):
        yield {"image": images[index], "label": labels[index]}


def train_epoch(run_train_step, state, batches):
    """run_train_step over the batches; the new state and the epoch's metrics."""
    sums = {}
    for batch in batches:  # JAX runs each call asynchronously: metrics() waits for the last
        state, batch_sums = run_train_step(state, batch)
        sums = {name: sums.get(name, 0) + value for name, value in batch_sums.items()}
    return state, metrics(sums)


def evaluate(run_eval_step, state, images, labels, batch_size=1000):
    """The metrics of run_eval_step over every example, summed in float64."""
    batches = ({"image": images[i:i + batch_size], "label": labels[i:i + batch_size]}
               for i in range(0, len(images), batch_size))
    sums = jax.device_get([run_eval_step(state, batch) for batch in batches])
    return metrics({name: np.sum([s[name] for s in sums], dtype=np.float64) for name in sums[0]})


def train_and_evaluate(state, train_data, test_data, config, first_epoch=1, steps=None,
                       after_epoch=lambda state, metrics: None):
    """Trains state on train_data, (images, labels), up to epoch config.epochs, printing the quick
    start's log; returns the state and each epoch's metrics. steps: the steps, jitted, and how
    batches reach them (default: plain jax.jit); after_epoch(state, metrics) runs after each."""
    run_train_step, run_eval_step, feed = steps or (jax.jit(train_step), jax.jit(eval_step), iter)
    history = []
    for epoch in range(first_epoch, config.epochs + 1):
        start = time.perf_counter()
        batches = train_batches(*train_data, config.batch_size, config.seed, epoch)
        state, trained = train_epoch(run_train_step, state, feed(batches))
        seconds = time.perf_counter() - start
        tested = evaluate(run_eval_step, state, *test_data)
        for split, m in (("train", trained), ("test", tested)):
            print(f"{split} epoch: {epoch}, loss: {m['loss']:.5f}, accuracy: {m['accuracy']:.2f}")
        images = len(train_data[1]) // config.batch_size * config.batch_size
        print(f"epoch {epoch} time: {seconds:.2f} s, {images / seconds:.0f} images/s", flush=True)
        history.append({"epoch": epoch, **{f"train_{name}": x for name, x in trained.items()},
                        **{f"test_{name}": x for name, x in tested.items()}, "epoch_time": seconds})
        after_epoch(state, history[-1])
    return state, history


# --- The machinery: train.py's command line around the recipe -----------------------------------

def steps_per_call():
    """(train steps per jitted call, whether lax.scan unrolls them) here (PERFORMANCE.md, section
    7): on XLA:CPU 5, unrolled, as it runs gradient convolutions in a loop as plain loops; on
    accelerators 500, so that the host does not set the pace."""
    return (5, True) if jax.default_backend() == "cpu" else (500, False)


def train_steps(state, batches, unroll):
    """train_step over a stack of batches [k, B, ...]; the last state and the stack's sums."""
    if len(batches["label"]) == 1:
        # lax.scan makes a while loop even of one step, and XLA:CPU runs the gradient convolutions
        # inside a loop as plain loops (PERFORMANCE.md, section 7).
        return train_step(state, jax.tree.map(lambda a: a[0], batches))
    state, sums = jax.lax.scan(train_step, state, batches, unroll=unroll)
    return state, jax.tree.map(lambda stacked: stacked.sum(0), sums)


def jit_steps():
    """train_steps and eval_step, jitted with our XLA options; train_steps donates the state."""
    options = xla.compiler_options()
    return (jax.jit(train_steps, donate_argnums=0, static_argnums=2, compiler_options=options),
            jax.jit(eval_step, compiler_options=options))


def data_parallel(mesh, jitted_train, jitted_eval, unroll):
    """jit_steps' steps for train_and_evaluate, each batch split over the mesh's devices."""
    in_flight = []

    def run_train_step(state, stack):
        state, sums = jitted_train(state, shard(mesh, stack, batch_axis=1), unroll)
        # Two calls in flight, not a whole epoch: XLA:CPU with several devices on few cores
        # deadlocks with a deep queue (JAX 0.10.2, two devices on two cores).
        in_flight.append(sums)
        if len(in_flight) > 2:
            jax.block_until_ready(in_flight.pop(0))
        return state, sums

    def run_eval_step(state, batch):
        divisible = len(batch["label"]) % mesh.size == 0  # else each device takes it whole
        return jitted_eval(state, shard(mesh, batch, batch_axis=0 if divisible else None))

    return run_train_step, run_eval_step


def stacks(batches, size):
    """The batches stacked by `size`, [size, B, ...]; the last stack may hold fewer."""
    batches = iter(batches)  # one iterator for every islice: a tqdm bar restarts on each iter()
    while group := list(itertools.islice(batches, size)):
        yield {name: np.stack([batch[name] for batch in group]) for name in group[0]}


def shard(mesh, arrays, batch_axis):
    """Global arrays of every process's same batch, split along batch_axis (None: replicated)."""
    if batch_axis is None:
        sharding, shares = NamedSharding(mesh, P()), arrays
    else:
        sharding = NamedSharding(mesh, P(*[None] * batch_axis, "batch"))
        shares = {name: np.split(a, jax.process_count(), batch_axis)[jax.process_index()]
                  for name, a in arrays.items()}
    return {name: jax.make_array_from_process_local_data(sharding, a) for name, a in shares.items()}


def train(config, workdir, resume, interrupted):
    """train_and_evaluate on every device of every process, process 0 alone printing and saving."""
    mesh = jax.make_mesh((jax.device_count(),), ("batch",), axis_types=(AxisType.Auto,))
    if config.batch_size % jax.device_count():
        raise TrainingError(f"--batch-size {config.batch_size} is not divisible by the "
                            f"{jax.device_count()} devices; pick a multiple of "
                            f"{jax.device_count()}", every_process=True)
    is_main_process = jax.process_index() == 0
    _lock = outputs.claim_workdir(workdir, resume) if is_main_process else None  # held to the end
    data = input_pipeline.load_dataset(config.dataset, config.data_dir)
    if config.batch_size > len(data["train"][1]):
        raise TrainingError(f"--batch-size {config.batch_size} is larger than the "
                            f"{len(data['train'][1])} training images")
    state, done, history = resume_or_start(config, workdir, resume, data["train"][0][:1])
    state = jax.device_put(state, NamedSharding(mesh, P()))
    per_call, unroll = steps_per_call()

    def feed(batches):
        bar = tqdm(batches, total=len(data["train"][1]) // config.batch_size, unit="step",
                   leave=False, disable=not (sys.stderr.isatty() and is_main_process))
        return stacks(bar, per_call)

    def after_epoch(state, record):
        if not record["train_loss"] < 10 * np.log(10):  # guessing gives ln 10; also catches nan
            raise TrainingError(f"the loss became {record['train_loss']:.4g} in epoch "
                                f"{record['epoch']}; lower --learning-rate")
        history.append(record)
        if is_main_process:
            outputs.save(workdir, state, record["epoch"], config, history)
        if interrupted.is_set():
            raise KeyboardInterrupt

    # Process 0 alone prints: print() writes nothing where sys.stdout is None.
    with contextlib.nullcontext() if is_main_process else contextlib.redirect_stdout(None):
        steps = (*data_parallel(mesh, *jit_steps(), unroll), feed)
        return train_and_evaluate(state, data["train"], data["test"], config, done + 1, steps,
                                  after_epoch)[0]


def resume_or_start(config, workdir, resume, images):
    """(state, epochs done, history), fresh or from the checkpoint, which process 0 reads."""
    if not (resume and jax.process_index() == 0):
        state, done, history = create_train_state(CNN(), config, images), 0, []
    else:
        path = os.path.join(workdir, outputs.CHECKPOINT)
        state, done, saved, history = outputs.load_checkpoint(path)
        changed = [f"--{name.replace('_', '-')} {value} (checkpoint: {getattr(saved, name)})"
                   for name, value in dataclasses.asdict(config).items()
                   if name not in ("epochs", "data_dir") and value != getattr(saved, name)]
        if changed:
            raise TrainingError(f"cannot resume with other settings than the checkpoint's: "
                                f"{', '.join(changed)}")
        if done >= config.epochs:
            print(f"{path} already holds epoch {done}; pass a larger --epochs to go on")
    if resume and jax.process_count() > 1:
        state, done = multihost_utils.broadcast_one_to_all((state, done))
    return state, int(done), history


class TrainingError(Exception):
    """Training cannot start or go on; every_process: each process of a run finds it alike."""

    def __init__(self, message, every_process=False):
        super().__init__(message)
        self.every_process = every_process


def parse_args(argv=None):
    """The command line: (the run's RunConfig, all flags); the defaults are RunConfig's."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--epochs", type=int, default=RunConfig.epochs, help="train up to this epoch")
    add("--batch-size", type=int, default=RunConfig.batch_size, help="global batch size")
    add("--learning-rate", type=float, default=RunConfig.learning_rate, help="SGD's")
    add("--momentum", type=float, default=RunConfig.momentum, help="SGD's momentum")
    add("--seed", type=int, default=RunConfig.seed, help="of the initialization and the shuffling")
    add("--dataset", choices=input_pipeline.DATASETS, default=RunConfig.dataset)
    add("--data-dir", help="folder with the four IDX files (raw or .gz); default: download them")
    add("--workdir", default="./workdir", help="where checkpoint, history and plot go")
    add("--resume", action="store_true", help="continue the run in --workdir")
    distributed.add_flags(parser)
    args = parser.parse_args(argv)
    for flag in ("epochs", "batch_size", "learning_rate", "num_processes", "peer_timeout"):
        if getattr(args, flag) is not None and not getattr(args, flag) > 0:
            parser.error(f"argument --{flag.replace('_', '-')}: must be greater than 0, got "
                         f"{getattr(args, flag)}")
    distributed.check_flags(parser, args)
    if not 0 <= args.seed < 2 ** 63:  # what jax.random.key and numpy's generators take
        parser.error(f"argument --seed: must be 0 to {2 ** 63 - 1}, got {args.seed}")
    return RunConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig)}), args


def main(argv=None):
    """Runs train() and turns every error a user can cause into one line on stderr."""
    config, args = parse_args(argv)
    xla.use_compilation_cache(several_processes=args.distributed)
    interrupted = threading.Event()

    def interrupt(signum, frame):
        # The event too: JAX's garbage-collection callback swallows an exception raised in it.
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
    except (TrainingError, outputs.CheckpointError, input_pipeline.DataError,
            distributed.StartError) as e:
        message, every_process = f"error: {e}", getattr(e, "every_process", False)
    except OSError as e:  # a write failed (full disk, read-only, ...): the last epoch's files stay
        saved, go_on = outputs.last_checkpoint(args.workdir)
        message = (f"error: cannot write {e.filename}: {e.strerror}; {saved}; "
                   f"{outputs.what_to_do(e)}, then {go_on}")
    except KeyboardInterrupt:
        message = "interrupted; {}; {}".format(*outputs.last_checkpoint(args.workdir))
    except Exception as e:
        if not args.distributed:
            raise  # a bug: its traceback
        # Another process is gone, or a bug, whose traceback leave() prints: JAX's own exit would
        # wait for the other processes, then abort.
        message = distributed.lost_peer_message(e) or traceback.format_exc().rstrip()
    if args.distributed:
        distributed.leave(message, every_process)
    sys.exit(message)


if __name__ == "__main__":
    main()
