"""Tests of the MNIST scripts: fast ones on small synthetic data, real-data ones when MNIST_DATA_DIR is set."""
import gzip
import io
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import input_pipeline
import memory
import outputs
import train
from model import CNN

HERE = os.path.dirname(os.path.abspath(__file__))
MNIST_DATA_DIR = os.environ.get("MNIST_DATA_DIR")
EPOCH_LINE = re.compile(r"^(train|test) epoch: (\d+), loss: (\d+\.\d{5}), accuracy: (\d+\.\d\d)$", re.M)


def write_idx(path, array, gz=True):
    """Writes a uint8 array as an IDX file (the standard magic number for its rank)."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    data = header + np.ascontiguousarray(array, np.uint8).tobytes()
    with open(path + (".gz" if gz else ""), "wb") as f:
        f.write(gzip.compress(data) if gz else data)


def synthetic_split(num, seed):
    """Learnable digits: class c is a bright 6x6 square at a place of its own, over noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, num).astype(np.uint8)
    images = rng.integers(0, 60, (num, 28, 28)).astype(np.uint8)
    for i, c in enumerate(labels):
        row, col = 3 + (c // 5) * 12, 1 + (c % 5) * 5
        images[i, row:row + 6, col:col + 6] = 255
    return images, labels


def write_dataset(folder, num_train=640, num_test=203, gz=True):
    """The four standard files of a synthetic data set in folder; returns the folder."""
    os.makedirs(folder, exist_ok=True)
    for split, num, seed in (("train", num_train, 1), ("test", num_test, 2)):
        images, labels = synthetic_split(num, seed)
        images_name, labels_name = input_pipeline.FILES[split]
        write_idx(os.path.join(folder, images_name), images, gz)
        write_idx(os.path.join(folder, labels_name), labels, gz)
    return str(folder)


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """This process and the scripts it runs share a JAX compilation cache, so that most skip
    compiling, and share a GPU if there is one."""
    settings = {"jax_compilation_cache_dir": str(tmp_path_factory.mktemp("jax_cache")),
                "jax_persistent_cache_min_compile_time_secs": 0, "jax_persistent_cache_min_entry_size_bytes": 0}
    previous = {name: getattr(jax.config, name) for name in settings}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in settings.items():
            jax.config.update(name, value)
            patch.setenv(name.upper(), str(value))
        # On a GPU the test process and each script would otherwise take 75% of its memory.
        patch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        yield
    for name, value in previous.items():
        jax.config.update(name, value)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"))


def start_script(script, *args, env=None, stderr=subprocess.PIPE):
    """Starts one of the scripts as a user would, with its output piped."""
    return subprocess.Popen([sys.executable, os.path.join(HERE, script), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=stderr, text=True, cwd=HERE, env={**os.environ, **(env or {})})


def finish(processes, timeout=300):
    """The CompletedProcess of each started process; all are killed if one outlives timeout."""
    try:
        results = [p.communicate(timeout=timeout) for p in processes]
        return [subprocess.CompletedProcess(p.args, p.returncode, out, err) for p, (out, err) in zip(processes, results)]
    finally:
        for p in processes:
            p.kill()
            p.wait()


def run_script(script, *args, env=None):
    """Runs one of the scripts as a user would; returns the CompletedProcess."""
    return finish([start_script(script, *args, env=env)])[0]


def read_until(process, text):
    """Reads the process's stdout up to the first line that holds text; fails if it ends first."""
    for line in process.stdout:
        if text in line:
            return
    pytest.fail(f"the process ended without printing {text!r}: {process.wait()}")


def epoch_lines(stdout):
    """[(split, epoch, loss, accuracy)] of the quick start's log lines."""
    return [(s, int(e), float(l), float(a)) for s, e, l, a in EPOCH_LINE.findall(stdout)]


def numpy_metrics(params, images, labels):
    """Reference [loss, accuracy %] in numpy from the model's logits."""
    logits = np.asarray(CNN().apply({"params": params}, images.astype(np.float32) / 255), np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    loss = -log_probs[np.arange(len(labels)), labels].mean()
    return loss, 100 * (logits.argmax(-1) == labels).mean()


# --- input pipeline ---

@pytest.mark.parametrize("gz", [False, True])
def test_parse_idx_reads_raw_and_gz(tmp_path, gz):
    images = np.arange(3 * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(3, 28, 28)
    write_idx(str(tmp_path / "x"), images, gz)
    parsed = input_pipeline.parse_idx(str(tmp_path / ("x.gz" if gz else "x")), input_pipeline.IMAGES_MAGIC)
    np.testing.assert_array_equal(parsed, images)


def test_load_dataset_gives_uint8_images_and_int32_labels(data_dir):
    data = input_pipeline.load_dataset("mnist", data_dir)
    images, labels = data["train"]
    assert images.shape == (640, 28, 28, 1) and images.dtype == np.uint8
    assert labels.shape == (640,) and labels.dtype == np.int32
    assert data["test"][0].shape == (203, 28, 28, 1)
    np.testing.assert_array_equal(labels, synthetic_split(640, 1)[1])


def test_train_batches_shapes_order_and_dropped_remainder():
    images = np.arange(103, dtype=np.uint8).reshape(103, 1, 1, 1)
    labels = np.arange(103, dtype=np.int32)
    stacks = list(input_pipeline.train_batches(images, labels, 10, 0, 1, 4))
    assert [s[0].shape for s in stacks] == [(4, 10, 1, 1, 1), (4, 10, 1, 1, 1), (2, 10, 1, 1, 1)]
    assert all(s[0].dtype == np.uint8 and s[1].dtype == np.int32 for s in stacks)
    seen = np.concatenate([s[1].ravel() for s in stacks])
    assert len(seen) == 100 and len(set(seen)) == 100  # 3 dropped, none twice
    np.testing.assert_array_equal(seen, images[seen].ravel())  # images stay with their labels
    again = np.concatenate([s[1].ravel() for s in input_pipeline.train_batches(images, labels, 10, 0, 1, 4)])
    np.testing.assert_array_equal(seen, again)
    next_epoch = np.concatenate([s[1].ravel() for s in input_pipeline.train_batches(images, labels, 10, 0, 2, 4)])
    other_seed = np.concatenate([s[1].ravel() for s in input_pipeline.train_batches(images, labels, 10, 1, 1, 4)])
    assert not np.array_equal(seen, next_epoch) and not np.array_equal(seen, other_seed)


def test_eval_batches_cover_every_example_once():
    images = np.arange(25, dtype=np.uint8).reshape(25, 1, 1, 1)
    labels = np.arange(25, dtype=np.int32)
    batches = list(input_pipeline.eval_batches(images, labels, 10))
    assert all(b[0].shape == (10, 1, 1, 1) for b in batches)
    kept = np.concatenate([b[1][b[2] == 1] for b in batches])
    np.testing.assert_array_equal(kept, labels)
    assert batches[-1][2].tolist() == [1] * 5 + [0] * 5


def test_download_path_turns_tfds_files_into_arrays(data_dir, monkeypatch):
    import tensorflow_datasets as tfds

    requested = []

    def fake_download(manager, urls):  # the network call, replaced by the local files
        requested.extend(urls.values())
        return {name: os.path.join(data_dir, name + ".gz") for name in urls}

    monkeypatch.setattr(tfds.download.DownloadManager, "download", fake_download)
    monkeypatch.setattr(input_pipeline, "unreachable", lambda url: None)  # as if online
    data = input_pipeline.load_dataset("fashion_mnist")
    builder = tfds.builder("fashion_mnist")
    assert sorted(requested) == sorted(builder.URL + n + ".gz" for n in input_pipeline.ALL_FILES)
    assert all(url in builder.url_infos for url in requested)  # TFDS has checksums for them
    np.testing.assert_array_equal(data["test"][1], synthetic_split(203, 2)[1])


# --- model, metrics, steps ---

def test_model_output_shape_and_parameter_count():
    state = train.create_train_state(0, 0.01, 0.9)
    assert sum(p.size for p in jax.tree.leaves(state.params)) == 824_458
    assert state.apply_fn({"params": state.params}, jnp.zeros((3, 28, 28, 1))).shape == (3, 10)


def test_evaluate_matches_numpy_with_uneven_last_batch(data_dir):
    images, labels = input_pipeline.load_dataset("mnist", data_dir)["test"]
    images, labels = np.concatenate([images] * 5), np.concatenate([labels] * 5)  # 1015: last batch 15
    params = train.create_train_state(0, 0.01, 0.9).params
    loss, accuracy = train.evaluate(params, train.make_mesh(), images, labels)
    expected_loss, expected_accuracy = numpy_metrics(params, images, labels)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert accuracy == pytest.approx(expected_accuracy, abs=1e-9)


def test_train_epoch_metrics_match_numpy(data_dir):
    """With learning rate 0 the parameters stay put, so the epoch's sums have a numpy reference."""
    images, labels = input_pipeline.load_dataset("mnist", data_dir)["train"]
    images, labels = images[:300], labels[:300]  # 9 batches of 32: two calls, one of 4 steps
    mesh = train.make_mesh()
    state = train.create_train_state(0, 0.0, 0.0)
    params = jax.device_get(state.params)  # a copy: train_epoch donates the state's buffers
    config = {"batch_size": 32, "seed": 0}
    _, (loss, accuracy, _) = train.train_epoch(jax.device_put(state, NamedSharding(mesh, P())),
                                               mesh, images, labels, config, 1, train.CALLS["cpu"])
    seen = np.concatenate([b[1].ravel() for b in input_pipeline.train_batches(
        np.arange(300), np.arange(300), 32, 0, 1, 5)])
    expected_loss, expected_accuracy = numpy_metrics(params, images[seen], labels[seen])
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert accuracy == pytest.approx(expected_accuracy, abs=1e-9)


def test_long_rolled_calls_train_like_short_unrolled_ones(data_dir):
    """The accelerators' way (a rolled scan over many steps per call) forced on the CPU: the
    same metrics and evaluation as XLA:CPU's 5 unrolled steps per call, and the same parameters
    but for sums taken in another order."""
    images, labels = input_pipeline.load_dataset("mnist", data_dir)["train"]
    mesh = train.make_mesh()
    config = {"batch_size": 32, "seed": 0}
    results = []
    for calls in (train.CALLS["cpu"], (10, False)):  # 20 steps: 4 calls of 5, or 2 of 10
        state = jax.device_put(train.create_train_state(0, 0.01, 0.9), NamedSharding(mesh, P()))
        state, metrics = train.train_epoch(state, mesh, images, labels, config, 1, calls)
        results.append((jax.device_get(state.params), metrics[:2]))
    (params, metrics), (rolled_params, rolled_metrics) = results
    assert rolled_metrics == pytest.approx(metrics, rel=1e-5)
    test_images, test_labels = input_pipeline.load_dataset("mnist", data_dir)["test"]
    # Sums in another order move the parameters apart step by step: after these 20 steps, at most
    # 4e-7 of a leaf's largest value on JAX 0.10.2 but 7e-3 on JAX 0.11.2, where the test loss
    # then differs by 1.2e-4 (relative).
    assert train.evaluate(rolled_params, mesh, test_images, test_labels) == pytest.approx(
        train.evaluate(params, mesh, test_images, test_labels), rel=1e-3)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(rolled_params)):  # sums in another order
        assert np.abs(a - b).max() <= 1e-2 * np.abs(a).max()


def test_one_train_step_lowers_the_loss(data_dir):
    images, labels = input_pipeline.load_dataset("mnist", data_dir)["train"]
    images, labels = images[None, :32], labels[None, :32]
    state = train.create_train_state(0, 0.01, 0.9)
    loss_before = numpy_metrics(state.params, images[0], labels[0])[0]
    state, sums = train.train_steps(state, jnp.zeros(3), images, labels)
    assert float(sums[0]) / 32 == pytest.approx(loss_before, rel=1e-5)  # metrics of the step's forward pass
    assert numpy_metrics(state.params, images[0], labels[0])[0] < loss_before


def test_a_call_of_one_step_runs_as_fast_as_longer_calls(data_dir):
    """An epoch's last call may hold one step (--batch-size 90: 666 steps, 133 calls of 5 and one
    of 1), which XLA:CPU once ran 20x slower per step than a call of 5 steps."""
    images, labels = input_pipeline.load_dataset("mnist", data_dir)["train"]
    state, seconds = train.create_train_state(0, 0.01, 0.9), {}
    for steps in (1, 5):
        stack = images[:32 * steps].reshape(steps, 32, 28, 28, 1), labels[:32 * steps].reshape(steps, 32)
        times = []
        for _ in range(4):  # the first call compiles
            start = time.perf_counter()
            state, sums = train.train_steps(state, jnp.zeros(3), *stack)
            sums.block_until_ready()
            times.append((time.perf_counter() - start) / steps)
        seconds[steps] = min(times[1:])
    assert seconds[1] < 3 * seconds[5], seconds


def test_short_run_learns_synthetic_digits(data_dir, tmp_path, capsys):
    args = train.parse_args(["--epochs", "3", "--data-dir", data_dir, "--workdir", str(tmp_path)])
    train.train(args, threading.Event())
    lines = epoch_lines(capsys.readouterr().out)
    assert [(s, e) for s, e, _, _ in lines] == [(s, e) for e in (1, 2, 3) for s in ("train", "test")]
    assert lines[-1][3] >= 95.0
    assert lines[-1][2] < lines[1][2]


UNKNOWN_XLA_OPTION = """
import sys
import train, xla
xla.XLA_OPTIONS = {**xla.XLA_OPTIONS, "xla_made_up_option": True}
train.main(sys.argv[1:])
"""


def test_an_xla_option_unknown_to_xla_is_left_out_once(data_dir, trained, tmp_path):
    """A release that drops one of our options trains as before, with its default and one line."""
    run = finish([subprocess.Popen([sys.executable, "-c", UNKNOWN_XLA_OPTION, "--epochs", "1", "--data-dir",
                                    data_dir, "--workdir", tmp_path], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, cwd=HERE)])[0]
    assert run.returncode == 0, run.stderr
    assert epoch_lines(run.stdout) == epoch_lines(trained[1])[:2]  # the other options still apply
    notes = [line for line in run.stderr.splitlines() if "xla_made_up_option" in line]
    assert len(notes) == 1 and re.match(r"note: the XLA of JAX \S+ refuses xla_made_up_option "
                                        r"\(INVALID_ARGUMENT: No such compile option.*\); going on with its default$",
                                        notes[0]), run.stderr


def test_cli_end_to_end_is_deterministic(data_dir, trained, tmp_path):
    """The `trained` fixture's training, from --data-dir instead of TFDS's cache, prints the same
    numbers and writes every output."""
    run = run_script("train.py", "--epochs", 2, "--data-dir", data_dir, "--workdir", tmp_path)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    assert len(epoch_lines(run.stdout)) == 4
    assert re.search(r"^epoch 2 time: \d+\.\d\d s, \d+ images/s$", run.stdout, re.M)
    assert epoch_lines(run.stdout) == epoch_lines(trained[1])
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    last = epoch_lines(run.stdout)[-1]
    assert (round(history[-1]["test_loss"], 5), round(history[-1]["test_accuracy"], 2)) == last[2:]
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state, epoch, config, saved_history = train.load_checkpoint(str(tmp_path / "checkpoint.msgpack"))
    assert epoch == 2 and config["dataset"] == "mnist" and saved_history == history


def test_plot_ticks_whole_epochs():
    history = [{"epoch": e, "train_loss": 1 / e, "test_loss": 1 / e, "train_accuracy": 90 + e,
                "test_accuracy": 90 + e} for e in (1, 2, 3)]
    fig = outputs.plot_history(history)
    for ax in fig.axes:
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert len(ticks) >= 2 and all(t == int(t) for t in ticks), ticks


def test_model_summary_prints_parameter_count():
    run = run_script("model.py")
    assert run.returncode == 0 and "824,458" in run.stdout


# --- checkpoints, resume, infer.py ---

def closed_port():
    """A port on 127.0.0.1 that nothing listens on: connections to it are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proxy_settings(port):
    """Environment that sends every HTTP and HTTPS request through a proxy on 127.0.0.1:port."""
    return {name: f"http://127.0.0.1:{port}" for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy")}


def fill_tfds_cache(tfds_data_dir, data_dir):
    """TFDS's download cache in tfds_data_dir, holding the synthetic files under MNIST's URLs."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.download import resource

    builder = tfds.builder("mnist")
    downloads = tfds_data_dir / "downloads"
    downloads.mkdir(parents=True)
    for name in input_pipeline.ALL_FILES:
        url = builder.URL + name + ".gz"
        path = downloads / resource.get_dl_fname(url, builder.url_infos[url].checksum)
        path.write_bytes((pathlib.Path(data_dir) / (name + ".gz")).read_bytes())
        resource.get_info_path(path).write_text("{}")


@pytest.fixture(scope="session")
def trained(data_dir, tmp_path_factory):
    """A workdir after `train.py --epochs 2` on the synthetic data, and that run's stdout.

    The data comes from TFDS's download cache with every connection refused: cached files need
    no network (test_cli_end_to_end_is_deterministic gets the same log with --data-dir)."""
    workdir, tfds_dir = tmp_path_factory.mktemp("trained"), tmp_path_factory.mktemp("tfds")
    fill_tfds_cache(tfds_dir, data_dir)
    run = run_script("train.py", "--epochs", 2, "--workdir", workdir,
                     env={**proxy_settings(closed_port()), "TFDS_DATA_DIR": str(tfds_dir)})
    assert run.returncode == 0, run.stderr
    return workdir, run.stdout


def test_checkpoint_round_trip(tmp_path):
    state = train.create_train_state(3, 0.05, 0.5)
    state = state.replace(opt_state=jax.tree.map(lambda a: a + 1, state.opt_state), step=7)
    config = {"dataset": "mnist", "batch_size": 16, "learning_rate": 0.05, "momentum": 0.5, "seed": 3}
    history = [{"epoch": 4, "train_loss": 0.5, "test_accuracy": 91.25}]
    outputs.save_checkpoint(str(tmp_path / "c"), state, 4, config, history)
    loaded, epoch, loaded_config, loaded_history = train.load_checkpoint(str(tmp_path / "c"))
    assert (epoch, loaded_config, loaded_history, int(loaded.step)) == (4, config, history, 7)
    for a, b in zip(jax.tree.leaves((state.params, state.opt_state)),
                    jax.tree.leaves((loaded.params, loaded.opt_state))):
        np.testing.assert_array_equal(a, b)


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "c")
    config = {"dataset": "mnist", "batch_size": 32, "learning_rate": 0.01, "momentum": 0.9, "seed": 0}
    outputs.save_checkpoint(path, train.create_train_state(0, 0.01, 0.9), 1, config, [])

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)  # fails after the bytes went to the temp file
    with pytest.raises(outputs.WriteError, match=r"^cannot write .*c: No space left on device$"):
        outputs.save_checkpoint(path, train.create_train_state(1, 0.01, 0.9), 2, config, [])
    assert train.load_checkpoint(path)[1] == 1
    assert os.listdir(tmp_path) == ["c"]


def test_resume_gives_the_numbers_of_an_uninterrupted_run(data_dir, trained, tmp_path):
    workdir, two_epochs = trained
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    (resumed_dir / "checkpoint.msgpack").write_bytes((workdir / "checkpoint.msgpack").read_bytes())
    resumed, straight = finish([  # side by side: two cores
        start_script("train.py", "--resume", "--epochs", 3, "--data-dir", data_dir, "--workdir", resumed_dir),
        start_script("train.py", "--epochs", 3, "--data-dir", data_dir, "--workdir", tmp_path / "straight")])
    assert resumed.returncode == 0 and straight.returncode == 0, resumed.stderr + straight.stderr
    assert [line[1] for line in epoch_lines(resumed.stdout)] == [3, 3]
    assert epoch_lines(two_epochs + resumed.stdout) == epoch_lines(straight.stdout)
    a = train.load_checkpoint(str(resumed_dir / "checkpoint.msgpack"))
    b = train.load_checkpoint(str(tmp_path / "straight" / "checkpoint.msgpack"))
    assert a[1:3] == b[1:3] and [h["test_loss"] for h in a[3]] == [h["test_loss"] for h in b[3]]
    for x, y in zip(jax.tree.leaves(a[0]), jax.tree.leaves(b[0])):
        np.testing.assert_array_equal(x, y)


def test_infer_evaluates_like_train_and_draws_the_grid(data_dir, trained, tmp_path):
    workdir, stdout = trained
    run = run_script("infer.py", "--ckpt", workdir / "checkpoint.msgpack", "--data-dir", data_dir,
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
    draw.line([(3 * s, 4 * s), (15 * s, 4 * s), (8 * s, 22 * s)], fill=fill, width=max(1, round(2 * s)))
    return image


def test_mnist_like_normalizes_any_picture(tmp_path):
    import infer

    draw_seven(28, False, False).save(tmp_path / "small.png")
    draw_seven(280, True, True).save(tmp_path / "large.png")
    draw_seven(280, True, True).save(tmp_path / "large.jpg", quality=90)
    small, large, jpeg = (infer.mnist_like(str(tmp_path / n)) for n in ("small.png", "large.png", "large.jpg"))
    for image in (small, large, jpeg):
        assert image.shape == (28, 28, 1) and image.dtype == np.uint8 and image.max() > 200
        rows, cols = np.nonzero(image[..., 0] > 0)
        assert max(rows.max() - rows.min(), cols.max() - cols.min()) + 1 in (20, 21, 22)  # 20 + resampling halo
        centre = (np.indices((28, 28)) * image[..., 0]).reshape(2, -1).sum(1) / image.sum()
        assert np.abs(centre - 14).max() <= 1.0
    assert np.corrcoef(large.ravel(), small.ravel())[0, 1] > 0.8
    assert np.corrcoef(large.ravel(), jpeg.ravel())[0, 1] > 0.95


# EXIF orientation: the transpose that stores a picture so that a viewer, undoing it, shows it upright.
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
        other = Image.fromarray(np.random.default_rng(0).integers(0, 256, paper.size[::-1], np.uint8))
        path = f"{stem}.{kind}"
        paper.save(path, save_all=True, append_images=[other])
    return path, plain


@pytest.mark.parametrize("kind", PICTURE_KINDS)
def test_pictures_as_they_arrive_read_like_their_plain_version(tmp_path, kind):
    import infer

    from PIL import ImageFilter

    paper = draw_seven(280, True, False).filter(ImageFilter.GaussianBlur(3))  # every shade of gray
    path, plain = save_picture(paper, str(tmp_path / kind), kind)
    read, expected = infer.mnist_like(path).astype(int), infer.mnist_like(plain).astype(int)
    assert expected.max() > 200 and np.abs(read - expected).mean() < 1.0 and np.abs(read - expected).max() <= 32


PICTURE_MEMORY = """
import re, sys
import infer
def peak_mb():  # this process's own peak: ru_maxrss would count the parent's from before exec
    return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
before = peak_mb()
infer.mnist_like(sys.argv[1])
print(peak_mb() - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads its peak memory from /proc")
def test_a_large_photo_is_read_at_reduced_size_like_a_small_one(tmp_path):
    from PIL import Image

    import infer

    photo = Image.new("RGB", (4000, 3000), "white")  # 12 megapixels, as phones take them
    photo.paste(draw_seven(2800, True, True), (600, 100))
    photo.save(tmp_path / "photo.jpg", quality=90)
    draw_seven(280, True, False).save(tmp_path / "small.png")
    read = infer.mnist_like(str(tmp_path / "photo.jpg")).astype(int)
    expected = infer.mnist_like(str(tmp_path / "small.png")).astype(int)
    assert np.abs(read - expected).mean() < 3.0 and np.corrcoef(read.ravel(), expected.ravel())[0, 1] > 0.97
    # Peak memory it adds in a process of its own: decoded whole, an RGB photo of this size took 187 MB.
    run = subprocess.run([sys.executable, "-c", PICTURE_MEMORY, tmp_path / "photo.jpg"], capture_output=True,
                         text=True, cwd=HERE, timeout=120)
    assert run.returncode == 0 and float(run.stdout) < 40, run.stdout + run.stderr


def test_infer_classifies_images(trained, tmp_path):
    workdir, _ = trained
    draw_seven(280, True, True).save(tmp_path / "a.png")
    draw_seven(28, False, False).save(tmp_path / "b.jpg")
    run = run_script("infer.py", "--ckpt", workdir / "checkpoint.msgpack", "--image", tmp_path / "a.png",
                     tmp_path / "b.jpg")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    pattern = r"^.+: (\d) \((\d+\.\d)%\), then (\d) \((\d+\.\d)%\), (\d) \((\d+\.\d)%\)$"
    assert len(lines) == 2 and all(re.match(pattern, line) for line in lines)
    first, p1, second, p2, third, p3 = re.match(pattern, lines[0]).groups()
    assert len({first, second, third}) == 3 and float(p1) >= float(p2) >= float(p3)


@pytest.fixture(scope="session")
def real_trained(tmp_path_factory):
    """A workdir after `train.py --epochs 1` on the real MNIST of MNIST_DATA_DIR."""
    if not MNIST_DATA_DIR:
        pytest.skip("set MNIST_DATA_DIR to the four MNIST files")
    workdir = tmp_path_factory.mktemp("real")
    run = run_script("train.py", "--epochs", 1, "--data-dir", MNIST_DATA_DIR, "--workdir", workdir)
    assert run.returncode == 0, run.stderr
    return workdir, run.stdout


def test_real_mnist_one_epoch_then_infer_on_pictures(real_trained, tmp_path):
    from PIL import Image

    workdir, stdout = real_trained
    assert epoch_lines(stdout)[-1][3] >= 97.0
    images, labels = input_pipeline.load_dataset("mnist", MNIST_DATA_DIR)["test"]
    plain, drawn = [], []
    for i in range(10):
        Image.fromarray(images[i, ..., 0]).save(plain_path := tmp_path / f"plain{i}.png")
        big = Image.fromarray(255 - images[i, ..., 0]).resize((280, 280), Image.BICUBIC).convert("RGB")
        big.save(drawn_path := tmp_path / f"drawn{i}.png")
        plain.append(plain_path)
        drawn.append(drawn_path)
    for infer_run in finish([start_script("infer.py", "--ckpt", workdir / "checkpoint.msgpack", "--image", *files)
                             for files in (plain, drawn)]):
        assert infer_run.returncode == 0, infer_run.stderr
        guesses = [int(line.split(": ")[1][0]) for line in infer_run.stdout.strip().splitlines()]
        assert sum(g == l for g, l in zip(guesses, labels[:10])) >= 9, guesses


def test_real_digits_saved_as_users_save_pictures_are_classified_as_plain_ones(real_trained, tmp_path):
    from PIL import Image

    import infer

    state = train.load_checkpoint(str(real_trained[0] / "checkpoint.msgpack"))[0]
    images = input_pipeline.load_dataset("mnist", MNIST_DATA_DIR, ["test"])["test"][0][:10]
    papers = [Image.fromarray(255 - image[..., 0]).resize((280, 280), Image.BICUBIC) for image in images]
    for kind in PICTURE_KINDS:
        paths = [save_picture(paper, str(tmp_path / f"{kind}{i}"), kind) for i, paper in enumerate(papers)]
        read, plain = (np.asarray(infer.predict(state.params, np.stack([infer.mnist_like(p[j]) for p in paths])))
                       for j in (0, 1))
        assert (read.argmax(-1) == plain.argmax(-1)).all(), kind
        assert np.abs(read - plain).max() < 0.05, kind


# --- export.py: ONNX and jax.export, checked by runtimes that are not ours ---

@pytest.fixture(scope="session")
def exported(trained):
    """The `trained` checkpoint exported by export.py as model.onnx and model.jax, and its params."""
    workdir, _ = trained
    checkpoint = workdir / "checkpoint.msgpack"
    run = run_script("export.py", workdir / "model.onnx", workdir / "model.jax", "--ckpt", checkpoint)
    assert run.returncode == 0, run.stderr
    assert re.search(r"^wrote .*model.onnx: epoch 2 of .*, 3\.\d MB, \d+\.\d s$", run.stdout, re.M), run.stdout
    return workdir / "model.onnx", workdir / "model.jax", train.load_checkpoint(str(checkpoint))[0].params


def assert_same_predictions(probabilities, expected):
    """The same class for every image, and probabilities within 1e-5."""
    assert probabilities.shape == expected.shape and probabilities.dtype == np.float32
    np.testing.assert_array_equal(probabilities.argmax(-1), expected.argmax(-1))
    assert np.abs(probabilities - expected).max() <= 1e-5


def onnx_probabilities(path, images):
    """Class probabilities of uint8 images from onnxruntime."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"images": images})[0]


def test_onnxruntime_predicts_like_infer(data_dir, exported):
    import infer

    onnx_path, _, params = exported
    images = input_pipeline.load_dataset("mnist", data_dir)["test"][0]
    for batch in (images[:1], images):  # one batch size in the file, any at run time
        assert_same_predictions(onnx_probabilities(onnx_path, batch), np.asarray(infer.predict(params, batch)))


# A fresh process that imports jax and numpy only: the exported function with batch 1 and 1000.
LOAD_JAX_EXPORT = """
import sys
import jax
import numpy as np
with open(sys.argv[1], "rb") as f:
    classify = jax.export.deserialize(bytearray(f.read()))
images = np.load(sys.argv[2])
np.save(sys.argv[3], np.stack([np.asarray(classify.call(images[:1]))[0], *np.asarray(classify.call(images))]))
print(sorted({name.split(".")[0] for name in sys.modules} & {"flax", "optax", "train", "model", "infer",
                                                             "input_pipeline", "outputs", "export"}))
"""


def test_jax_export_runs_with_jax_alone(data_dir, exported, tmp_path):
    import infer

    _, jax_path, params = exported
    images = np.random.default_rng(0).integers(0, 256, (1000, 28, 28, 1), np.uint8)
    images[:203] = input_pipeline.load_dataset("mnist", data_dir)["test"][0]
    np.save(tmp_path / "images.npy", images)
    run = subprocess.run([sys.executable, "-c", LOAD_JAX_EXPORT, jax_path, tmp_path / "images.npy",
                          tmp_path / "out.npy"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"  # imported none of flax, optax and our modules
    out = np.load(tmp_path / "out.npy")
    expected = np.asarray(infer.predict(params, images))
    assert_same_predictions(out[:1], expected[:1])  # batch 1
    assert_same_predictions(out[1:], expected)  # batch 1000


def readme_snippet(loads):
    """The README's Python block that loads the file named `loads`."""
    blocks = re.findall(r"```python\n(.*?)```", pathlib.Path(HERE, "README.md").read_text(), re.S)
    return next(block for block in blocks if loads in block)


@pytest.mark.parametrize("loads", ["model.onnx", "model.jax"])
def test_readme_snippets_classify_a_batch(data_dir, exported, tmp_path, loads):
    import infer

    onnx_path, jax_path, params = exported
    (tmp_path / loads).write_bytes((onnx_path if loads.endswith("onnx") else jax_path).read_bytes())
    images = input_pipeline.load_dataset("mnist", data_dir)["test"][0][:40]
    np.save(tmp_path / "digits.npy", images)
    run = subprocess.run([sys.executable, "-c", readme_snippet(loads)], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    printed = [int(c) for c in re.sub(r"[\[\]\s]+", " ", run.stdout).split()]
    assert printed == np.asarray(infer.predict(params, images)).argmax(-1).tolist()


@pytest.mark.parametrize("out, ckpt, message", [
    ("model.pb", "good", r"model.pb: unknown export format .pb; name the file \*.onnx \(ONNX\) or \*.jax"),
    ("missing/model.onnx", "good", r"cannot write into .*missing \(No such file or directory\); pick an existing"),
    ("model.onnx", "missing", r"cannot read checkpoint .*nothing.msgpack: No such file or directory"),
    ("model.jax", "truncated", r"is not a checkpoint of train.py, or it is truncated"),
    ("model.jax", "mismatched", r"does not fit this model \(other parameter shapes\)"),
])
def test_export_bad_input(trained, tmp_path, out, ckpt, message):
    checkpoint = trained[0] / "checkpoint.msgpack" if ckpt == "good" else \
        broken_checkpoint(tmp_path / "nothing.msgpack", trained[0], ckpt)
    before = set(os.listdir(tmp_path))
    assert_clean_error(run_script("export.py", tmp_path / out, "--ckpt", checkpoint), message)
    assert set(os.listdir(tmp_path)) == before  # no partial file


def test_real_mnist_exports_predict_like_infer(real_trained):
    """On all 10,000 real test images: onnxruntime and the deserialized jax.export against infer.py."""
    import export
    import infer

    workdir, _ = real_trained
    params = jax.device_get(train.load_checkpoint(str(workdir / "checkpoint.msgpack"))[0].params)
    images = input_pipeline.load_dataset("mnist", MNIST_DATA_DIR, ["test"])["test"][0]
    expected = np.asarray(infer.predict(params, images))
    onnx_path, jax_path = workdir / "model.onnx", workdir / "model.jax"
    onnx_path.write_bytes(export.to_onnx_bytes(params))
    jax_path.write_bytes(export.to_jax_bytes(params))
    from_onnx = onnx_probabilities(onnx_path, images)
    from_jax = np.asarray(jax.export.deserialize(bytearray(jax_path.read_bytes())).call(images))
    for name, probabilities in (("onnx", from_onnx), ("jax", from_jax)):
        print(f"{name}: largest probability difference {np.abs(probabilities - expected).max():.3g}")
        assert_same_predictions(probabilities, expected)


# --- demo.html in a real browser: headless Chromium, onnxruntime-web, the page's own preprocessing ---

ORT_WEB = pathlib.Path(HERE, ".web", "node_modules", "onnxruntime-web")
ORT_WEB_FILES = ("ort.wasm.min.js", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
# Digits as strokes, points in units of the pad's side.
STROKES = {
    "7": [[(0.25, 0.2), (0.75, 0.2), (0.5, 0.5), (0.4, 0.85)]],
    "1": [[(0.4, 0.25), (0.52, 0.15), (0.52, 0.85)]],
    "0": [[(0.5 + 0.22 * np.sin(t), 0.5 - 0.33 * np.cos(t)) for t in np.linspace(0, 2 * np.pi, 24)]],
    "4": [[(0.6, 0.85), (0.6, 0.15), (0.22, 0.62), (0.8, 0.62)]],
}


def demo_version():
    """The onnxruntime-web version demo.html pins."""
    return re.search(r'const ORT_VERSION = "([^"]+)"', pathlib.Path(HERE, "demo.html").read_text()).group(1)


@pytest.fixture(scope="module")
def ort_web():
    """The onnxruntime-web files the page loads, from npm's package in .web; skips without them."""
    if not all((ORT_WEB / "dist" / name).exists() for name in ORT_WEB_FILES):
        pytest.skip(f"no onnxruntime-web in .web (npm install --prefix .web onnxruntime-web@{demo_version()})")
    return ORT_WEB


@pytest.fixture(scope="module")
def browser(ort_web, tmp_path_factory):
    """Debian's headless Chromium under selenium; skips with what to install where a piece is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("no chromium and chromedriver on PATH (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=640,600", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(shutil.which("chromedriver")), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def serve(tmp_path):
    """serve(model_bytes or None): demo.html and onnxruntime-web (and model.onnx) in a folder on
    127.0.0.1, as `python -m http.server` serves them; returns the page's URL."""
    import functools
    import http.server

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # quiet, as the rest of the suite
            pass

    servers = []

    def start(model):
        folder = tmp_path / f"site{len(servers)}"
        folder.mkdir()
        for path in [pathlib.Path(HERE, "demo.html")] + [ORT_WEB / "dist" / name for name in ORT_WEB_FILES]:
            (folder / path.name).symlink_to(path)
        if model is not None:
            (folder / "model.onnx").write_bytes(model)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/demo.html"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def open_demo(browser, url):
    """Loads the page and waits until it says something; returns the seconds until then."""
    from selenium.webdriver.support.ui import WebDriverWait

    start = time.perf_counter()
    browser.get(url)
    WebDriverWait(browser, 60).until(lambda b: b.execute_script(
        "return 'ready' in document.body.dataset || document.getElementById('status').classList.contains('problem')"))
    return time.perf_counter() - start


def draw(browser, strokes, pointer):
    """Draws strokes on the pad with a mouse, a finger or a pen, as pointer events."""
    from selenium.webdriver.common.actions import interaction
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.pointer_input import PointerInput

    pad = browser.find_element("id", "pad")
    side = pad.size["width"] - 4  # its 2-pixel border
    builder = ActionBuilder(browser, mouse=PointerInput(pointer, pointer))
    for stroke in strokes:
        offsets = [(round((x - 0.5) * side), round((y - 0.5) * side)) for x, y in stroke]
        builder.pointer_action.move_to(pad, *offsets[0]).pointer_down()
        for offset in offsets[1:]:
            builder.pointer_action.move_to(pad, *offset)
        builder.pointer_action.pointer_up()
    builder.perform()


def page_reading(browser):
    """(the pad as PNG bytes, the page's 28 x 28 uint8 picture, its 10 probabilities, the 3 classes
    it lists), once the page has read the latest drawing."""
    import base64

    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 30).until(lambda b: b.execute_script(
        "return document.getElementById('top3').dataset.version === document.getElementById('pad').dataset.version"))
    png, seen, probabilities, listed = browser.execute_script("""
        const seen = document.getElementById('seen').getContext('2d').getImageData(0, 0, 28, 28).data;
        const top3 = document.getElementById('top3');
        return [document.getElementById('pad').toDataURL('image/png'), Array.from(seen),
                top3.dataset.probabilities || null, Array.from(top3.children, (item) => item.dataset.digit)];""")
    picture = np.array(seen, np.uint8).reshape(28, 28, 4)[..., :1]
    return (base64.b64decode(png.split(",", 1)[1]), picture,
            None if probabilities is None else np.array(json.loads(probabilities), np.float32), [int(c) for c in listed])


@pytest.fixture(scope="module")
def demo_model(request):
    """(model.onnx bytes, params), exported fresh by export.py: real MNIST's 1-epoch model where
    MNIST_DATA_DIR is set, so that the screenshot reads real digits; else the `exported` one."""
    import export

    if not MNIST_DATA_DIR:
        onnx_path, _, params = request.getfixturevalue("exported")
        return onnx_path.read_bytes(), params
    workdir = request.getfixturevalue("real_trained")[0]
    params = jax.device_get(train.load_checkpoint(str(workdir / "checkpoint.msgpack"))[0].params)
    return export.to_onnx_bytes(params), params


def test_demo_page_reads_drawn_digits_as_infer_does(browser, serve, demo_model, tmp_path):
    from selenium.webdriver.common.actions import interaction

    import infer

    model, params = demo_model
    seconds = open_demo(browser, serve(model))
    print(f"demo.html: ready {seconds:.2f} s after it was opened")
    assert browser.find_element("id", "status").text == "Draw a digit in the box."
    pointers = [interaction.POINTER_MOUSE, interaction.POINTER_TOUCH, interaction.POINTER_PEN]
    for i, (digit, strokes) in enumerate(STROKES.items()):
        browser.find_element("id", "clear").click()
        draw(browser, strokes, pointers[i % len(pointers)])
        png, picture, probabilities, listed = page_reading(browser)
        (tmp_path / f"pad{digit}.png").write_bytes(png)
        expected_picture = infer.mnist_like(str(tmp_path / f"pad{digit}.png"))
        assert np.abs(picture.astype(int) - expected_picture).max() <= 1, digit
        expected = np.asarray(infer.predict(params, picture[None]))[0]
        assert listed == list(np.argsort(-expected)[:3]), digit
        assert np.abs(probabilities - expected).max() < 1e-5, digit
        status = browser.find_element("id", "status").text
        print(f"drew a {digit} ({pointers[i % len(pointers)]}): the page reads a {listed[0]}, {status!r}; "
              f"its picture {np.abs(picture.astype(int) - expected_picture).max()} from mnist_like's at most, "
              f"probabilities {np.abs(probabilities - expected).max():.2g} from infer.py's")
    browser.execute_script("window.scrollTo(0, 0)")
    browser.save_screenshot(str(tmp_path / "demo.png"))
    if os.environ.get("DEMO_SCREENSHOT"):  # DEMO_SCREENSHOT=docs/demo.png makes the README's picture
        shutil.copy(tmp_path / "demo.png", os.environ["DEMO_SCREENSHOT"])
    browser.find_element("id", "clear").click()
    assert page_reading(browser)[2:] == (None, [])
    assert browser.find_element("id", "status").text == "Draw a digit in the box."


@pytest.mark.parametrize("model, message", [
    (None, r"^No model.onnx beside this page: run `python export.py model.onnx` in this folder, then reload.$"),
    (b"not a model", r"^model.onnx does not load \(.+\): export it again with `python export.py model.onnx`.$"),
])
def test_demo_page_says_what_is_wrong_with_the_model(browser, serve, model, message):
    open_demo(browser, serve(model))
    status = browser.find_element("id", "status")
    assert "problem" in status.get_attribute("class") and re.match(message, status.text), status.text


def test_demo_page_opened_as_a_file_says_to_serve_it(browser):
    open_demo(browser, pathlib.Path(HERE, "demo.html").as_uri())
    assert browser.find_element("id", "status").text.startswith("Open this page through a web server")


def test_demo_page_pins_the_onnxruntime_web_it_is_tested_with(ort_web):
    """The CDN fallback is the version the tests load from .web, and its integrity hash that file's."""
    import base64
    import hashlib

    page = pathlib.Path(HERE, "demo.html").read_text()
    assert json.loads((ort_web / "package.json").read_text())["version"] == demo_version()
    digest = base64.b64encode(hashlib.sha384((ort_web / "dist" / "ort.wasm.min.js").read_bytes()).digest()).decode()
    assert f'const ORT_INTEGRITY = "sha384-{digest}";' in page


# --- errors a user can cause: one line, non-zero exit, no traceback, nothing lost ---

def assert_clean_error(run, message):
    """The script failed with `message` in its last stderr line and no traceback."""
    assert run.returncode != 0
    assert "Traceback" not in run.stderr, run.stderr
    assert re.search(message, run.stderr.strip().splitlines()[-1]), run.stderr


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], r"--epochs: must be greater than 0, got 0"),
    (["--epochs", "-1"], r"--epochs: must be greater than 0, got -1"),
    (["--epochs", "abc"], r"--epochs: expected a positive number, got 'abc'"),
    (["--batch-size", "0"], r"--batch-size: must be greater than 0"),
    (["--learning-rate", "-0.1"], r"--learning-rate: must be greater than 0"),
    (["--dataset", "cifar10"], r"--dataset: invalid choice: 'cifar10'"),
    (["--batch-size", "641"], r"--batch-size 641 is larger than the 640 training images"),
    (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"], r"--process-id must be 0 to 1, got 2"),
    (["--coordinator", "127.0.0.1:1"], r"--coordinator, --num-processes and --process-id go together"),
])
def test_bad_flags(data_dir, tmp_path, flags, message):
    assert_clean_error(run_script("train.py", "--data-dir", data_dir, "--workdir", tmp_path, *flags), message)


def broken_data(folder, damage):
    """A copy of the synthetic data set with one kind of damage."""
    write_dataset(folder)
    images_gz = os.path.join(folder, "train-images-idx3-ubyte.gz")
    if damage == "missing file":
        os.remove(os.path.join(folder, "t10k-labels-idx1-ubyte.gz"))
    elif damage == "truncated gz":
        data = open(images_gz, "rb").read()
        open(images_gz, "wb").write(data[:len(data) // 2])
    elif damage == "wrong magic":
        write_idx(images_gz[:-3], synthetic_split(640, 1)[1])  # a labels file under an images name
    elif damage == "count mismatch":
        write_idx(images_gz[:-3], synthetic_split(639, 1)[0])
    elif damage == "not 28x28":
        write_idx(images_gz[:-3], np.zeros((640, 32, 32), np.uint8))
    return folder


@pytest.mark.parametrize("damage, message", [
    ("no folder", r"--data-dir .* is not a folder"),
    ("missing file", r"has no t10k-labels-idx1-ubyte \(or t10k-labels-idx1-ubyte.gz\); it needs the four"),
    ("truncated gz", r"cannot read .*train-images-idx3-ubyte.gz"),
    ("wrong magic", r"train-images-idx3-ubyte.gz is not an IDX file of this kind"),
    ("count mismatch", r"has 639 images but .* has 640 labels"),
    ("not 28x28", r"holds 32x32 images, not 28x28"),
])
def test_bad_data(tmp_path, damage, message):
    folder = tmp_path / "missing" if damage == "no folder" else broken_data(str(tmp_path / "data"), damage)
    assert_clean_error(run_script("train.py", "--data-dir", folder, "--workdir", tmp_path / "w"), message)


@pytest.fixture
def proxy(request):
    """Proxy settings standing for the network: its port 'refuses' connections, or it answers
    every request with the HTTP status request.param."""
    import http.server

    if request.param == "refuses":
        yield proxy_settings(closed_port())
        return

    class Server(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_error(request.param)

        do_GET = do_HEAD

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield proxy_settings(server.server_address[1])
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("proxy, message", [
    ("refuses", r"cannot download fashion_mnist: .*refused"),
    (503, r"cannot download fashion_mnist: 503 Service Unavailable"),  # TFDS would retry a 503
    (404, r"download of fashion_mnist failed \(\w+\)"),  # the server answers: TFDS tries, and fails
], indirect=["proxy"])
def test_failed_download_says_how_to_work_offline_at_once(tmp_path, proxy, message):
    """Without network TFDS retries for minutes with a warning per try; train.py asks first."""
    start = time.perf_counter()
    run = run_script("train.py", "--dataset", "fashion_mnist", "--workdir", tmp_path / "w",
                     env={**proxy, "TFDS_DATA_DIR": str(tmp_path)})  # fashion_mnist's URLs are plain http
    assert time.perf_counter() - start < 20
    assert_clean_error(run, message + r"; without network, pass --data-dir DIR with the four files")
    assert "WARNING" not in run.stderr and "Retrying" not in run.stderr, run.stderr


@pytest.mark.parametrize("learning_rate, loss", [("1e20", r"(nan|inf)"), ("1e4", r"\d\.\d+e\+\d+")])
def test_diverged_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, trained, tmp_path, learning_rate, loss):
    """nan, inf, or finite but far above an untrained model's 2.30."""
    workdir, _ = trained
    good = (workdir / "checkpoint.msgpack").read_bytes()
    (tmp_path / "checkpoint.msgpack").write_bytes(good)
    run = run_script("train.py", "--learning-rate", learning_rate, "--data-dir", data_dir, "--workdir", tmp_path)
    assert_clean_error(run, rf"the loss became {loss} in epoch 1; lower --learning-rate")
    assert (tmp_path / "checkpoint.msgpack").read_bytes() == good


def test_unwritable_workdir_fails_before_training(data_dir, tmp_path):
    (tmp_path / "file").write_text("")
    run = run_script("train.py", "--data-dir", data_dir, "--workdir", tmp_path / "file" / "w")
    assert_clean_error(run, r"--workdir .* is not writable")


@pytest.fixture
def small_disk(tmp_path):
    """A 10 MB file system (tmpfs, mounted as root): one checkpoint with its optimizer state fits (6.6 MB),
    a second beside it does not."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=10m", "tmpfs", mount],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root (test_file_size_limit fills files without it)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", mount])


def test_full_disk_stops_with_one_line_and_keeps_the_last_checkpoint(data_dir, small_disk):
    run = run_script("train.py", "--epochs", 3, "--data-dir", data_dir, "--workdir", small_disk)
    checkpoint = re.escape(str(small_disk / "checkpoint.msgpack"))
    assert_clean_error(run, rf"^error: cannot write {checkpoint}: No space left on device; last checkpoint: "
                            rf"{checkpoint} \(epoch 1\); free space, then continue with --resume$")
    assert epoch_lines(run.stdout)[-1][:2] == ("test", 2)  # epoch 2 trained, its checkpoint did not fit
    assert train.load_checkpoint(str(small_disk / "checkpoint.msgpack"))[1] == 1
    assert sorted(os.listdir(small_disk)) == ["checkpoint.msgpack", "history.json", "metrics.png"]


FILE_SIZE_LIMIT = """
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails (EFBIG) instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]),) * 2)
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


@pytest.mark.parametrize("args, message", [
    (["train.py", "--epochs", 1, "--data-dir", "{data}", "--workdir", "{tmp}"],
     r"cannot write {tmp}/checkpoint.msgpack: File too large; no checkpoint was saved yet; free space, then run again$"),
    (["export.py", "{tmp}/model.onnx", "--ckpt", "{ckpt}"],
     r"cannot write {tmp}/model.onnx: File too large; free space or pick another folder$"),
    (["infer.py", "--ckpt", "{ckpt}", "--data-dir", "{data}", "--out", "{tmp}/grid.png"],
     r"cannot write {tmp}/grid.png: File too large; free space or pick another folder$"),
])
def test_file_size_limit(data_dir, trained, tmp_path, args, message):
    """Each script ends with one line when a file it writes cannot grow (RLIMIT_FSIZE, no root
    needed: a write fails as on a full disk or quota), and leaves no partial file behind."""
    fill = {"tmp": tmp_path, "data": data_dir, "ckpt": trained[0] / "checkpoint.msgpack"}
    command = [sys.executable, "-c", FILE_SIZE_LIMIT, "30000", *(str(a).format(**fill) for a in args)]
    run = finish([subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE)])[0]
    assert_clean_error(run, "^error: " + message.format(tmp=re.escape(str(tmp_path))))
    assert os.listdir(tmp_path) == []


def test_resume_with_other_settings_is_refused(data_dir, trained, tmp_path):
    workdir, _ = trained
    run = run_script("train.py", "--resume", "--learning-rate", "0.1", "--data-dir", data_dir, "--workdir", workdir)
    assert_clean_error(run, r"cannot resume .*--learning-rate 0.1 \(checkpoint: 0.01\)")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_names_the_last_checkpoint(data_dir, tmp_path, sig):
    process = start_script("train.py", "--epochs", 1000, "--data-dir", data_dir, "--workdir", tmp_path)
    try:
        read_until(process, "epoch 2 time")
        process.send_signal(sig)
    finally:
        run = finish([process], timeout=60)[0]
    epoch = train.load_checkpoint(str(tmp_path / "checkpoint.msgpack"))[1]
    assert_clean_error(run, rf"interrupted; last checkpoint: .*checkpoint.msgpack \(epoch {epoch}\)")


def kill_repeatedly(data_dir, workdir, kills, seed):
    """Runs train.py --resume in workdir `kills` times, each SIGKILLed at a random moment after
    its first epoch line; returns the epoch of the checkpoint left after each kill."""
    rng = np.random.default_rng(seed)
    path = str(workdir / "checkpoint.msgpack")
    epochs = []
    for _ in range(kills):
        process = start_script("train.py", "--resume", "--epochs", 100000, "--data-dir", data_dir,
                               "--workdir", workdir, stderr=subprocess.DEVNULL)
        try:
            read_until(process, "epoch")  # from here on, a checkpoint write is never far
            time.sleep(rng.uniform(0, 0.3))
        finally:
            process.kill()
            process.wait()
        epochs.append(train.load_checkpoint(path)[1])
    return epochs


def test_sigkill_at_random_moments_leaves_a_loadable_checkpoint(data_dir, trained, tmp_path):
    """20 kills: two workdirs side by side (two cores), 10 kills in a row in each."""
    import concurrent.futures

    workdirs = [tmp_path / "a", tmp_path / "b"]
    for workdir in workdirs:
        workdir.mkdir()
        (workdir / "checkpoint.msgpack").write_bytes((trained[0] / "checkpoint.msgpack").read_bytes())
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        chains = list(pool.map(lambda seed: kill_repeatedly(data_dir, workdirs[seed], 10, seed), (0, 1)))
    for epochs in chains:
        assert len(epochs) == 10 and epochs == sorted(epochs) and epochs[-1] > 2


# --- malloc on huge pages ---

# Restarts, then faults in a fresh 64 MiB block; prints GLIBC_TUNABLES and the page faults it took.
HUGE_PAGES_CHECK = """
import ctypes, os, resource, memory
memory.restart_with_huge_pages(__file__)
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
block = libc.malloc(64 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
ctypes.memset(block, 1, 64 << 20)
print(os.environ.get("GLIBC_TUNABLES"), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not memory.huge_pages_need_a_restart(),
                    reason="needs glibc 2.35+ and the kernel's transparent huge pages in madvise mode")
def test_restart_puts_large_blocks_on_huge_pages(tmp_path):
    script = tmp_path / "check.py"
    script.write_text(HUGE_PAGES_CHECK)

    def run(tunables, *command):
        env = {key: value for key, value in os.environ.items() if key != "GLIBC_TUNABLES"}
        env.update(PYTHONPATH=HERE, **({"GLIBC_TUNABLES": tunables} if tunables else {}))
        printed_tunables, faults = subprocess.run([sys.executable, *(command or [script])], env=env, check=True,
                                                  capture_output=True, text=True, timeout=60).stdout.split()
        return printed_tunables, int(faults)

    restarted, huge_page_faults = run(None)
    kept, _ = run("glibc.malloc.arena_max=2")
    opted_out, small_page_faults = run("glibc.malloc.hugetlb=0")
    # Run by another program (as IPython's %run does), a restart would rerun that program instead.
    run_by_another, _ = run(None, "-c", f"import runpy; runpy.run_path({str(script)!r}, run_name='__main__')")
    assert (restarted, kept, opted_out, run_by_another) == (
        "glibc.malloc.hugetlb=1", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "glibc.malloc.hugetlb=0", "None")
    assert small_page_faults > 15000 and huge_page_faults < small_page_faults / 4  # 4 KiB pages: 16,384


# --- data parallel over several devices ---

def cpu_devices(count):
    """Environment for `count` simulated CPU devices, also where a GPU is the default backend."""
    return {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={count}"}


def test_several_devices_give_the_metrics_of_one(data_dir, trained, tmp_path):
    one_device = json.loads((trained[0] / "history.json").read_text())[0]  # epoch 1 of the same run
    runs = finish([start_script("train.py", "--epochs", 1, "--data-dir", data_dir, "--workdir",
                                tmp_path / str(devices), env=cpu_devices(devices)) for devices in (2, 4)])
    for devices, run in zip((2, 4), runs):
        assert run.returncode == 0, run.stderr
        history = json.loads((tmp_path / str(devices) / "history.json").read_text())[0]
        for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
            assert history[key] == pytest.approx(one_device[key], rel=1e-4), (devices, key)


def test_batch_size_not_divisible_by_devices(data_dir, tmp_path):
    run = run_script("train.py", "--batch-size", 30, "--data-dir", data_dir, "--workdir", tmp_path,
                     env=cpu_devices(4))
    assert_clean_error(run, r"--batch-size 30 is not divisible by the 4 devices; pick a multiple of 4")


def broken_checkpoint(path, trained_dir, damage):
    """A checkpoint file with one kind of damage, or none at all."""
    good = (trained_dir / "checkpoint.msgpack").read_bytes()
    if damage == "foreign":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    elif damage == "truncated":
        path.write_bytes(good[:len(good) // 2])
    elif damage == "mismatched":
        from flax import serialization
        checkpoint = serialization.msgpack_restore(good)
        checkpoint["state"]["params"]["Dense_1"]["kernel"] = np.zeros((256, 12), np.float32)
        path.write_bytes(serialization.msgpack_serialize(checkpoint))
    return path


@pytest.mark.parametrize("damage, message", [
    ("missing", r"cannot read checkpoint .*nothing.msgpack: No such file or directory"),
    ("foreign", r"is not a checkpoint of train.py, or it is truncated"),
    ("truncated", r"is not a checkpoint of train.py, or it is truncated"),
    ("mismatched", r"does not fit this model \(other parameter shapes\)"),
])
def test_infer_bad_checkpoint(trained, tmp_path, damage, message):
    path = broken_checkpoint(tmp_path / "nothing.msgpack", trained[0], damage)
    assert_clean_error(run_script("infer.py", "--ckpt", path, "--image", tmp_path / "x.png"), message)


def png(width, height, rows):
    """A grayscale PNG file's bytes that says it is width x height and holds the given raw rows."""
    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def cut_short(picture_format):
    """The first half of a noisy 280 x 280 picture file."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (280, 280), np.uint8)).save(buffer, picture_format)
    return buffer.getvalue()[:len(buffer.getvalue()) // 2]


@pytest.mark.parametrize("content, message", [
    (None, r"x.png does not exist"),
    (b"not a picture", r"x.png is not a picture Pillow can read"),
    (png(30000, 30000, bytes(30001)), r"x.png is too large to read safely \(Image size \(900000000 pixels\) "
                                      r"exceeds limit.*\); scale it down first"),
    (cut_short("PNG"), r"x.png cannot be decoded \(image file is truncated\); is it damaged or cut short\?"),
    (cut_short("JPEG"), r"x.png cannot be decoded \(image file is truncated.*\); is it damaged or cut short\?"),
    ("folder", r"cannot read .*x.png: Is a directory"),
])
def test_infer_bad_image(trained, tmp_path, content, message):
    if content == "folder":
        (tmp_path / "x.png").mkdir()
    elif content is not None:
        (tmp_path / "x.png").write_bytes(content)
    run = run_script("infer.py", "--ckpt", trained[0] / "checkpoint.msgpack", "--image", tmp_path / "x.png")
    assert_clean_error(run, message)


# --- several processes (jax.distributed over Gloo on 127.0.0.1) ---

def start_processes(workdirs, *args, env=None):
    """One train.py process per workdir, together one jax.distributed run on 127.0.0.1 (on CPU,
    also where there is a GPU: one GPU cannot be shared, and Gloo is JAX's CPU transport)."""
    coordinator = f"127.0.0.1:{closed_port()}"
    return [start_script("train.py", "--coordinator", coordinator, "--num-processes", len(workdirs),
                         "--process-id", i, "--peer-timeout", 20, "--workdir", workdir, *args,
                         env={"JAX_PLATFORMS": "cpu", **(env or {})})
            for i, workdir in enumerate(workdirs)]


def run_processes(workdirs, *args, env=None):
    """A jax.distributed run to its end, each process successful; the CompletedProcess of each."""
    runs = finish(start_processes(workdirs, *args, env=env), timeout=120)
    for run in runs:
        assert run.returncode == 0, run.stderr
    return runs


def assert_same_log(lines, expected):
    """Two epoch logs agree: the same lines, numbers within 1e-4 relative."""
    assert [line[:2] for line in lines] == [line[:2] for line in expected]
    for (_, _, loss, accuracy), (_, _, expected_loss, expected_accuracy) in zip(lines, expected):
        assert loss == pytest.approx(expected_loss, rel=1e-4, abs=1e-5)
        assert accuracy == pytest.approx(expected_accuracy, rel=1e-4)


@pytest.fixture(scope="session")
def two_processes(data_dir, tmp_path_factory):
    """The workdirs and CompletedProcesses of a 3-epoch run of two processes, one CPU device each."""
    workdirs = [tmp_path_factory.mktemp("two_processes") / f"process{i}" for i in range(2)]
    return workdirs, run_processes(workdirs, "--epochs", 3, "--data-dir", data_dir)


def test_two_processes_print_the_log_of_one(trained, two_processes):
    workdirs, (process0, process1) = two_processes
    assert_same_log(epoch_lines(process0.stdout)[:4], epoch_lines(trained[1]))
    assert [line[:2] for line in epoch_lines(process0.stdout)][4:] == [("train", 3), ("test", 3)]
    assert "epoch" not in process1.stdout
    assert sorted(os.listdir(workdirs[0])) == ["checkpoint.msgpack", "history.json", "metrics.png"]
    assert not workdirs[1].exists()


def test_two_processes_with_two_devices_each(data_dir, trained, tmp_path):
    workdirs = [tmp_path / "0", tmp_path / "1"]
    process0, _ = run_processes(workdirs, "--epochs", 1, "--data-dir", data_dir, env=cpu_devices(2))
    assert_same_log(epoch_lines(process0.stdout), epoch_lines(trained[1])[:2])


def test_resume_across_two_processes(data_dir, trained, two_processes, tmp_path):
    """From epoch 2 (process 0 reads the checkpoint and sends it to process 1) to epoch 3."""
    workdirs = [tmp_path / "0", tmp_path / "1"]
    workdirs[0].mkdir()
    (workdirs[0] / "checkpoint.msgpack").write_bytes((trained[0] / "checkpoint.msgpack").read_bytes())
    process0, process1 = run_processes(workdirs, "--resume", "--epochs", 3, "--data-dir", data_dir)
    assert_same_log(epoch_lines(process0.stdout), epoch_lines(two_processes[1][0].stdout)[4:])
    assert "epoch" not in process1.stdout and not workdirs[1].exists()


def test_killed_process_stops_the_other(data_dir, tmp_path):
    workdirs = [tmp_path / "0", tmp_path / "1"]
    processes = start_processes(workdirs, "--epochs", 1000, "--data-dir", data_dir)
    try:
        read_until(processes[0], "epoch 2 time")
        processes[1].kill()
        killed = time.perf_counter()
        processes[0].wait(timeout=30)
        seconds = time.perf_counter() - killed
    finally:
        survivor, _ = finish(processes)
    assert seconds < 10
    assert_clean_error(survivor, r"^error: process 0 lost another process \(.*\); once all are up again, continue with --resume$")
    assert train.load_checkpoint(str(workdirs[0] / "checkpoint.msgpack"))[1] >= 2


def test_unreachable_coordinator(data_dir, tmp_path):
    start = time.perf_counter()
    run = run_script("train.py", "--coordinator", f"127.0.0.1:{closed_port()}", "--num-processes", 2,
                     "--process-id", 1, "--peer-timeout", 2, "--data-dir", data_dir, "--workdir", tmp_path)
    assert time.perf_counter() - start < 15
    assert_clean_error(run, r"cannot reach the coordinator at 127.0.0.1:\d+ within 2 s .*start process 0 there")


def test_two_processes_refuse_a_batch_size_not_divisible_by_both(data_dir, tmp_path):
    runs = finish(start_processes([tmp_path / "0", tmp_path / "1"], "--batch-size", 33, "--data-dir", data_dir),
                  timeout=120)
    for run in runs:
        assert_clean_error(run, r"--batch-size 33 is not divisible by the 2 devices; pick a multiple of 2")


def running_processes(marker):
    """Pids of the processes whose command line holds `marker`."""
    pids = []
    for cmdline in pathlib.Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker.encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:  # ended while we looked
            pass
    return pids


@pytest.mark.skipif(not shutil.which("mpirun"), reason="Open MPI's mpirun is not on PATH (apt-get install openmpi-bin)")
def test_open_mpi_launch_prints_the_log_of_two_devices(data_dir, tmp_path):
    """The README's `mpirun ... python train.py --distributed` with 2 ranks on this machine:
    jax.distributed finds the ranks itself; rank 0 alone prints and writes (each rank its own
    --workdir, as on two hosts); the log equals one process's with two simulated devices."""
    mpirun = ["mpirun", "--bind-to", "none", "-x", "JAX_PLATFORMS=cpu"]
    if os.geteuid() == 0:
        mpirun.append("--allow-run-as-root")
    ranks = [[sys.executable, os.path.join(HERE, "train.py"), "--distributed", "--epochs", "1", "--data-dir",
              data_dir, "--workdir", str(tmp_path / f"rank{rank}")] for rank in range(2)]
    command = mpirun + ["-np", "1", *ranks[0], ":", "-np", "1", *ranks[1]]
    launch = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE,
                              start_new_session=True, env={**os.environ, "OMPI_MCA_rmaps_base_oversubscribe": "1"})
    two_devices = start_script("train.py", "--epochs", 1, "--data-dir", data_dir, "--workdir", tmp_path / "one",
                               env=cpu_devices(2))
    try:
        out, err = launch.communicate(timeout=180)
        one = finish([two_devices])[0]
    finally:
        if launch.poll() is None:  # mpirun and its ranks
            os.killpg(launch.pid, signal.SIGKILL)
            launch.wait()
        two_devices.kill()
        two_devices.wait()
    assert launch.returncode == 0, err
    assert one.returncode == 0, one.stderr
    assert epoch_lines(out) == epoch_lines(one.stdout) and len(epoch_lines(out)) == 2
    assert len(re.findall(r"^epoch \d time", out, re.M)) == 1  # rank 0's lines only
    assert sorted(os.listdir(tmp_path / "rank0")) == ["checkpoint.msgpack", "history.json", "metrics.png"]
    assert not (tmp_path / "rank1").exists()
    assert running_processes(str(tmp_path)) == []  # every rank ended with mpirun
