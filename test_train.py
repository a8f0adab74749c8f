"""Tests of the MNIST scripts: fast ones on small synthetic data, real-data ones when MNIST_DATA_DIR is set."""
import gzip
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import input_pipeline
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


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"))


def run_script(script, *args, env=None, timeout=300):
    """Runs one of the scripts as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(HERE, script), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=HERE,
                          env={**os.environ, **(env or {})})


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
    data = input_pipeline.load_dataset("fashion_mnist")
    builder = tfds.builder("fashion_mnist")
    assert sorted(requested) == sorted(builder.URL + n + ".gz" for n in sum(input_pipeline.FILES.values(), ()))
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
                                               mesh, images, labels, config, 1)
    seen = np.concatenate([b[1].ravel() for b in input_pipeline.train_batches(
        np.arange(300), np.arange(300), 32, 0, 1, 5)])
    expected_loss, expected_accuracy = numpy_metrics(params, images[seen], labels[seen])
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert accuracy == pytest.approx(expected_accuracy, abs=1e-9)


def test_one_train_step_lowers_the_loss(data_dir):
    images, labels = input_pipeline.load_dataset("mnist", data_dir)["train"]
    images, labels = images[None, :32], labels[None, :32]
    state = train.create_train_state(0, 0.01, 0.9)
    loss_before = numpy_metrics(state.params, images[0], labels[0])[0]
    state, sums = train.train_steps(state, jnp.zeros(3), images, labels)
    assert float(sums[0]) / 32 == pytest.approx(loss_before, rel=1e-5)  # metrics of the step's forward pass
    assert numpy_metrics(state.params, images[0], labels[0])[0] < loss_before


def test_short_run_learns_synthetic_digits(data_dir, tmp_path, capsys):
    args = train.parse_args(["--epochs", "3", "--data-dir", data_dir, "--workdir", str(tmp_path)])
    train.train(args)
    lines = epoch_lines(capsys.readouterr().out)
    assert [(s, e) for s, e, _, _ in lines] == [(s, e) for e in (1, 2, 3) for s in ("train", "test")]
    assert lines[-1][3] >= 95.0
    assert lines[-1][2] < lines[1][2]


def test_cli_end_to_end_is_deterministic(data_dir, tmp_path):
    runs = [run_script("train.py", "--epochs", 2, "--data-dir", data_dir, "--workdir", tmp_path / str(i))
            for i in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr
        assert len(epoch_lines(run.stdout)) == 4
        assert re.search(r"^epoch 2 time: \d+\.\d\d s, \d+ images/s$", run.stdout, re.M)
        assert "Traceback" not in run.stderr
    assert epoch_lines(runs[0].stdout) == epoch_lines(runs[1].stdout)
    history = json.loads((tmp_path / "0" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    last = epoch_lines(runs[0].stdout)[-1]
    assert (round(history[-1]["test_loss"], 5), round(history[-1]["test_accuracy"], 2)) == last[2:]
    assert (tmp_path / "0" / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state, epoch, config, saved_history = train.load_checkpoint(
        str(tmp_path / "0" / "checkpoint.msgpack"), train.create_train_state(0, 0.01, 0.9))
    assert epoch == 2 and config["dataset"] == "mnist" and saved_history == history


def test_model_summary_prints_parameter_count():
    run = run_script("model.py")
    assert run.returncode == 0 and "824,458" in run.stdout


@pytest.mark.skipif(not MNIST_DATA_DIR, reason="set MNIST_DATA_DIR to the four MNIST files")
def test_one_epoch_on_real_mnist(tmp_path):
    run = run_script("train.py", "--epochs", 1, "--data-dir", MNIST_DATA_DIR, "--workdir", tmp_path)
    assert run.returncode == 0, run.stderr
    (_, _, _, train_accuracy), (_, _, _, test_accuracy) = epoch_lines(run.stdout)
    assert test_accuracy >= 97.0
