"""Benchmarks train.py against the Flax quick start's way: `python bench.py [--data-dir DIR]`.

Absolute times drift on shared machines, so the two ways and the two batch sizes alternate in
rounds and the table shows medians and their ratios. Also: evaluation speed, FLOPs against a matmul
ceiling, and as whole processes: the wall time and peak memory of `train.py --epochs 1`, its start
to the first step with an empty and a warm compilation cache, and `infer.py --ckpt`.
"""
import argparse
import gzip
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import input_pipeline
import outputs
import train
import xla
from model import CNN, MNIST_IMAGE, Config, create_train_state

HERE = os.path.dirname(os.path.abspath(__file__))
# The environment settings of glibc's malloc that README.md suggests; the table names those set.
MALLOC_SETTINGS = ("GLIBC_TUNABLES", "MALLOC_ARENA_MAX")


def new_state():
    """A fresh train state of train.py's model with the quick start's settings."""
    return create_train_state(CNN(), Config(), MNIST_IMAGE)


@jax.jit
def quickstart_train_step(state, images, labels):
    """The quick start's train_step: gradients only, its metrics come from a second pass."""
    def loss_fn(params):
        logits = state.apply_fn({"params": params}, images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return state.apply_gradients(grads=jax.grad(loss_fn)(state.params))


@jax.jit
def quickstart_compute_metrics(state, metrics, images, labels):
    """The quick start's compute_metrics: a second forward pass, merged clu-style per batch."""
    logits = state.apply_fn({"params": state.params}, images)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    correct = (logits.argmax(-1) == labels).sum()
    return {"loss_total": metrics["loss_total"] + loss, "loss_count": metrics["loss_count"] + 1,
            "accuracy_total": metrics["accuracy_total"] + correct,
            "accuracy_count": metrics["accuracy_count"] + labels.size}


def time_ours(jitted, images, labels, batch_size, steps, mesh):
    """Seconds per step as train.py's loop runs its steps (`jitted`: train.jit_steps(), fed by
    data_parallel and stacks), over `steps` batches, after a warm-up call."""
    state = jax.device_put(new_state(), NamedSharding(mesh, P()))
    steps_per_call, unroll = train.steps_per_call()
    run_train_step, _ = train.data_parallel(mesh, *jitted, unroll)
    stacks = list(itertools.islice(  # only the stacks the timing uses, not the whole epoch
        train.stacks(train.train_batches(images, labels, batch_size, 0, 1), steps_per_call),
        -(-steps // steps_per_call) + 1))
    warm = [stacks[0]] + [s for s in stacks[1:] if len(s["label"]) != len(stacks[0]["label"])][:1]
    for stack in warm:  # compile every stack size first
        state, sums = run_train_step(state, stack)
    jax.block_until_ready(sums)
    start, done = time.perf_counter(), 0
    for stack in stacks:
        if done >= steps:
            break
        state, sums = run_train_step(state, stack)
        done += len(stack["label"])
    jax.block_until_ready(sums)
    return (time.perf_counter() - start) / done


def time_quickstart(images, labels, batch_size, steps):
    """Seconds per step the quick start's way: float32 batches from the host, two jitted calls."""
    state = new_state()
    metrics = {name: jnp.zeros(())
               for name in ("loss_total", "loss_count", "accuracy_total", "accuracy_count")}
    batches = itertools.islice(train.train_batches(images, labels, batch_size, 0, 1), steps + 1)
    batches = [(batch["image"].astype(np.float32) / 255, batch["label"]) for batch in batches]
    state = quickstart_train_step(state, *batches[0])
    metrics = quickstart_compute_metrics(state, metrics, *batches[0])
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for batch_images, batch_labels in batches[1:]:
        state = quickstart_train_step(state, batch_images, batch_labels)
        metrics = quickstart_compute_metrics(state, metrics, batch_images, batch_labels)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / (len(batches) - 1)


def matmul_gflops(sizes=(1024, 2048), rounds=5):
    """{way: GFLOP/s} of a float32 square matmul on the CPU, each way's best over sizes and rounds:
    XLA as train.py compiles it, XLA's defaults, and numpy's BLAS. The fastest is the ceiling:
    on 2 AVX2 cores numpy's BLAS ran at 151 GFLOP/s where XLA's defaults gave 120 (JAX 0.11.2)."""
    ways = {"XLA as train.py compiles it": (jax.jit(lambda x: x @ x,
                                                    compiler_options=xla.XLA_OPTIONS), jnp.ones),
            "XLA's defaults": (jax.jit(lambda x: x @ x), jnp.ones),
            "numpy's BLAS": (lambda x: x @ x, np.ones)}
    best = dict.fromkeys(ways, 0.0)
    for size in sizes:
        for way, (matmul, ones) in ways.items():
            a = ones((size, size), np.float32)
            jax.block_until_ready(matmul(a))  # compiles
            seconds = min(time_it(lambda: jax.block_until_ready(matmul(a))) for _ in range(rounds))
            best[way] = max(best[way], 2 * size ** 3 / seconds / 1e9)
    return best


def train_step_flops(jitted_train, batch_size):
    """FLOPs per image of one train step, from XLA's cost analysis of train.py's jitted train_steps
    compiled for a call of one step, which adds no loop."""
    stack = {"image": jnp.zeros((1, batch_size, 28, 28, 1), jnp.uint8),
             "label": jnp.zeros((1, batch_size), jnp.int32)}
    cost = jitted_train.lower(new_state(), stack, True).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"] / batch_size


def layer_parts(params, batch_size):
    """The train step cut into its parts, as (name, function, arguments): each convolution and
    dense layer forward and backward (input and weight gradients), relu and pooling, the loss,
    the optimizer update. Each part is jitted alone, so its time includes one call's dispatch."""
    import flax.linen as nn

    rng = np.random.default_rng(0)
    conv1, conv2 = nn.Conv(32, (3, 3)), nn.Conv(64, (3, 3))
    dense1, dense2 = nn.Dense(256), nn.Dense(10)
    parts = []

    def relu_pool(x):
        return nn.avg_pool(nn.relu(x), (2, 2), (2, 2))

    def layer(name, module, p, x, inputs_gradient=True):
        def apply(x, p):
            return module.apply({"params": p}, x)
        out = jax.eval_shape(apply, x, p)
        g = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)
        parts.append((f"{name} forward", apply, (x, p)))
        if inputs_gradient:
            parts.append((f"{name} input gradient",
                          lambda x, p, g: jax.vjp(lambda x: apply(x, p), x)[1](g), (x, p, g)))
        parts.append((f"{name} weight gradient",
                      lambda x, p, g: jax.vjp(lambda p: apply(x, p), p)[1](g), (x, p, g)))

    def elementwise(name, fn, x):
        g = jnp.asarray(rng.standard_normal(jax.eval_shape(fn, x).shape), jnp.float32)
        parts.append((f"{name} forward", fn, (x,)))
        parts.append((f"{name} backward", lambda x, g: jax.vjp(fn, x)[1](g), (x, g)))

    def features(*shape):
        return jnp.asarray(rng.standard_normal((batch_size, *shape)), jnp.float32)

    images = jnp.asarray(rng.integers(0, 256, (batch_size, 28, 28, 1)), jnp.uint8)
    parts.append(("images to float", lambda x: x.astype(jnp.float32) / 255, (images,)))
    layer("conv1 (1 -> 32 channels)", conv1, params["Conv_0"], features(28, 28, 1),
          inputs_gradient=False)
    elementwise("relu + avgpool 1", relu_pool, features(28, 28, 32))
    layer("conv2 (32 -> 64 channels)", conv2, params["Conv_1"], features(14, 14, 32))
    elementwise("relu + avgpool 2", relu_pool, features(14, 14, 64))
    layer("dense1 (3136 -> 256)", dense1, params["Dense_0"], features(3136))
    elementwise("relu", nn.relu, features(256))
    layer("dense2 (256 -> 10)", dense2, params["Dense_1"], features(256))
    labels = jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32)

    def loss(logits, labels):
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    parts.append(("loss forward and backward", jax.grad(loss), (features(10), labels)))
    state = new_state()
    parts.append(("SGD momentum update", lambda state, grads: state.apply_gradients(grads=grads),
                  (state, params)))
    return parts


def time_call(fn, args, repeats=200):
    """(median seconds of one call of jitted fn over rounds of `repeats` calls, XLA's cost
    analysis), from one compilation."""
    compiled = jax.jit(fn, compiler_options=xla.XLA_OPTIONS).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            out = compiled(*args)
        jax.block_until_ready(out)
        rounds.append((time.perf_counter() - start) / repeats)
    return statistics.median(rounds), compiled.cost_analysis()


def step_breakdown(images, labels, mesh, batch_size=32):
    """Rows (part, milliseconds, MFLOP, GFLOP/s) of one train step at batch_size, parts timed
    alone, then the host side of a call of steps: gathering a stack of batches and sending it;
    and the milliseconds of one empty jitted call, which each part's time includes."""
    params = new_state().params
    rows = []
    for name, fn, args in layer_parts(params, batch_size):
        seconds, cost = time_call(fn, args)
        flops = (cost[0] if isinstance(cost, list) else cost).get("flops", 0)
        rows.append((name, 1e3 * seconds, flops / 1e6, flops / seconds / 1e9))
    steps_per_call, _ = train.steps_per_call()
    steps = len(images) // batch_size

    def stacks():
        return train.stacks(train.train_batches(images, labels, batch_size, 0, 1), steps_per_call)
    gather = time_it(lambda: sum(1 for _ in stacks())) / steps  # an epoch's shuffle and gathers
    stack = next(stacks())
    send = statistics.median(time_it(lambda: jax.block_until_ready(
        train.shard(mesh, stack, batch_axis=1))) for _ in range(20)) / steps_per_call
    rows += [("host: shuffle, gather and stack the batches", 1e3 * gather, 0, 0),
             (f"host: send them to the device, {steps_per_call} steps per call", 1e3 * send, 0, 0)]
    return rows, 1e3 * time_call(lambda x: x, (jnp.zeros(()),))[0]


# Peak RSS must come from a small parent: a child forked from this big process would count
# the parent's pages it held until exec.
MEASURE = ("import resource, subprocess, sys; "
           "code = subprocess.call([sys.executable, *sys.argv[1:]]); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
           "sys.exit(code)")


# train.py as a user starts it, up to the result of its first jitted call, then an exit: the start
# a user waits through before training runs.
FIRST_STEP = """
import sys, jax, train
jit_steps = train.jit_steps
def first_call_then_exit():
    jitted_train, jitted_eval = jit_steps()
    def run(*args):
        jax.block_until_ready(jitted_train(*args))
        print("first step done", flush=True)
        raise SystemExit(0)
    return run, jitted_eval
train.jit_steps = first_call_then_exit
train.main(sys.argv[1:])
"""


def time_process(args, until=None, env=None):
    """(wall seconds, peak RSS in MB) of a script run as a process; stops timing at `until`."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", MEASURE, *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=HERE,
                               env={**os.environ, **(env or {})})
    seconds = None
    for line in process.stdout:
        if until and line.startswith(until) and seconds is None:
            seconds = time.perf_counter() - start
    stderr = process.stderr.read().strip().splitlines()
    if process.wait():
        sys.exit(f"error: {' '.join(args)} failed: {stderr[-2:]}")
    return seconds or time.perf_counter() - start, int(stderr[-1]) / 1024


def write_random_dataset(folder):
    """Random uint8 data of MNIST's shapes, as the four IDX files."""
    rng = np.random.default_rng(0)
    for split, num in (("train", 60000), ("test", 10000)):
        for name, shape, magic in zip(input_pipeline.FILES[split], ((num, 28, 28), (num,)),
                                      (0x803, 0x801)):
            array = rng.integers(0, 256 if len(shape) > 1 else 10, shape).astype(np.uint8)
            header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in shape)
            with gzip.open(os.path.join(folder, name + ".gz"), "wb") as f:
                f.write(header + array.tobytes())
    return folder


def time_it(fn):
    """Wall seconds of fn()."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", help="the four MNIST files; default: random data alike")
    parser.add_argument("--steps", type=int, default=300, help="timed steps per measurement")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds of the two ways at both batch sizes")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or write_random_dataset(tmp)
        data = input_pipeline.load_dataset("mnist", data_dir)
        images, labels = data["train"]
        mesh = jax.make_mesh((jax.device_count(),), ("batch",), axis_types=(AxisType.Auto,))
        # As train.py: a state first, then the steps jitted. Probing XLA's options before any other
        # compilation left the 5-step call about 5% slower on JAX 0.12 (PERFORMANCE.md, section 7).
        jax.block_until_ready(new_state())
        jitted = train.jit_steps()
        rows, figures = [], {"device": f"{jax.device_count()}x {jax.devices()[0].device_kind}",
                             "cpu_count": os.cpu_count(), "machine": platform.machine(),
                             "data": "MNIST" if args.data_dir else "random",
                             "malloc_settings": " ".join(f"{name}={os.environ[name]}"
                                                         for name in MALLOC_SETTINGS
                                                         if name in os.environ)}
        seconds = {batch_size: ([], []) for batch_size in (32, 128)}  # ours, the quick start's
        for _ in range(args.rounds):  # both batch sizes in every round: drift hits them alike
            for batch_size in seconds:
                ours, theirs = seconds[batch_size]
                ours.append(time_ours(jitted, images, labels, batch_size, args.steps, mesh))
                theirs.append(time_quickstart(images, labels, batch_size, args.steps))
        for batch_size in seconds:
            ours, theirs = (statistics.median(s) for s in seconds[batch_size])
            figures[f"batch{batch_size}"] = {"ours_steps_per_s": 1 / ours,
                                             "quickstart_steps_per_s": 1 / theirs,
                                             "ours_images_per_s": batch_size / ours,
                                             "speedup": theirs / ours}
            rows += [(f"train, batch {batch_size}, ours",
                      f"{1 / ours:.1f} steps/s, {batch_size / ours:.0f} images/s"),
                     (f"train, batch {batch_size}, quick start's way", f"{1 / theirs:.1f} steps/s, "
                      f"{batch_size / theirs:.0f} images/s"),
                     (f"train, batch {batch_size}, speed-up", f"{theirs / ours:.2f}x"),
                     (f"train, batch {batch_size}, ours: one epoch of {len(images)} images",
                      f"{len(images) // batch_size * ours:.2f} s")]
        test_images, test_labels = data["test"]
        state = jax.device_put(new_state(), NamedSharding(mesh, P()))
        _, run_eval_step = train.data_parallel(mesh, *jitted, True)
        train.evaluate(run_eval_step, state, test_images, test_labels)
        eval_seconds = min(time_it(lambda: train.evaluate(run_eval_step, state, test_images,
                                                          test_labels)) for _ in range(3))
        flops = train_step_flops(jitted[0], 32)
        achieved = flops * figures["batch32"]["ours_images_per_s"] / 1e9
        figures.update(eval_seconds=eval_seconds, train_flops_per_image=flops,
                       achieved_gflops=achieved)
        rows += [(f"evaluate {len(test_images)} test images", f"{eval_seconds:.3f} s"),
                 ("train step FLOPs per image (XLA)", f"{flops / 1e6:.1f} MFLOP")]
        if jax.default_backend() == "cpu":  # a GPU's matmul peak says nothing of a batch-32 step
            figures["matmul_gflops"] = matmuls = matmul_gflops()
            fastest = max(matmuls, key=matmuls.get)
            rows += [("float32 matmul, best of 1024² and 2048²",
                      ", ".join(f"{way} {gflops:.0f}" for way, gflops in matmuls.items())
                      + " GFLOP/s"),
                     ("achieved at batch 32 / matmul ceiling",
                      f"{achieved:.0f} / {matmuls[fastest]:.0f} GFLOP/s "
                      f"({100 * achieved / matmuls[fastest]:.0f}%, the ceiling from {fastest})")]
        else:
            rows.append(("achieved at batch 32", f"{achieved:.0f} GFLOP/s"))
        breakdown, dispatch_ms = step_breakdown(images, labels, mesh)
        figures["batch32_breakdown"] = {name: {"ms": ms, "mflop": mflop}
                                        for name, ms, mflop, _ in breakdown}
        figures["dispatch_ms"] = dispatch_ms
        workdir = os.path.join(tmp, "workdir")
        train_seconds, train_mb = time_process(["train.py", "--epochs", "1", "--data-dir", data_dir,
                                                "--workdir", workdir])
        infer_seconds, _ = time_process(["infer.py", "--ckpt",
                                         os.path.join(workdir, outputs.CHECKPOINT),
                                         "--data-dir", data_dir], until="test epoch")
        cache = {"XDG_CACHE_HOME": os.path.join(tmp, "cache")}  # empty, then filled by the first
        first_step = [time_process(["-c", FIRST_STEP, "--data-dir", data_dir, "--workdir",
                                    os.path.join(tmp, cache_state)],  # a fresh run's workdir
                                   until="first step done", env=cache)[0]
                      for cache_state in ("cold", "warm")]
        figures.update(train_1_epoch_seconds=train_seconds, train_peak_mb=train_mb,
                       infer_to_accuracy_seconds=infer_seconds, first_step_seconds=first_step)
        rows += [("python train.py --epochs 1: wall time", f"{train_seconds:.1f} s"),
                 ("python train.py --epochs 1: peak memory", f"{train_mb:.0f} MB"),
                 ("python infer.py --ckpt: start to accuracy", f"{infer_seconds:.1f} s"),
                 ("python train.py: start to its first step, empty / warm compilation cache",
                  f"{first_step[0]:.1f} / {first_step[1]:.1f} s")]
    print(f"{figures['device']} ({figures['cpu_count']} CPUs, {figures['machine']}), "
          f"{figures['data']} data, medians of {args.rounds} rounds"
          + (f", {figures['malloc_settings']}" if figures["malloc_settings"] else ""))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(f"\nA batch-32 train step, part by part (each part jitted and timed alone, "
          f"{jax.default_backend()}):")
    width = max(len(name) for name, *_ in breakdown)
    print(f"{'part':<{width}}  {'ms':>6}  {'MFLOP':>6}  {'GFLOP/s':>7}")
    for name, ms, mflop, gflops in breakdown:
        print(f"{name:<{width}}  {ms:6.3f}" + (f"  {mflop:6.1f}  {gflops:7.1f}" if mflop else ""))
    print(f"{'sum of the parts':<{width}}  {sum(ms for _, ms, _, _ in breakdown):6.3f}  "
          f"{sum(mflop for _, _, mflop, _ in breakdown):6.1f}")
    print(f"{'(each part includes one empty call:':<{width}}  {dispatch_ms:6.3f})")
    step_ms = 1e3 / figures["batch32"]["ours_steps_per_s"]
    print(f"{'the whole step, as train.py runs it':<{width}}  {step_ms:6.3f}  "
          f"{32 * figures['train_flops_per_image'] / 1e6:6.1f}  {figures['achieved_gflops']:7.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
