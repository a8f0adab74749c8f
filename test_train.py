"""train.py, input_pipeline.py, outputs.py and model.py in this process: the quick tier,
`python -m pytest -q test_train.py`, to run after every edit."""
import gzip
import json
import os
import re
import runpy
import subprocess

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import input_pipeline
import outputs
import train
import xla
from model import Config
from conftest import (HERE, assert_clean_error, epoch_lines, load_checkpoint, numpy_metrics, synthetic_split,
                      train_here, write_dataset, write_idx)

CONFIG = Config()


@pytest.fixture(scope="module")
def steps():
    """(run_train_steps, run_eval_step): train.jit_steps(), what train.py's loop calls."""
    return train.jit_steps()


def on_mesh(state, mesh):
    """state replicated over the mesh, as train() holds it."""
    return jax.device_put(state, NamedSharding(mesh, P()))


# --- input pipeline ---

@pytest.mark.parametrize("gz", [False, True])
def test_parse_idx_reads_raw_and_gz(tmp_path, gz):
    images = np.arange(3 * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(3, 28, 28)
    write_idx(tmp_path / "x", images, gz)
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

    def order(seed, epoch):
        return np.concatenate([s["label"].ravel() for s in input_pipeline.train_batches(images, labels, 10, seed,
                                                                                         epoch, 4)])
    stacks = list(input_pipeline.train_batches(images, labels, 10, 0, 1, 4))
    assert [s["image"].shape for s in stacks] == [(4, 10, 1, 1, 1), (4, 10, 1, 1, 1), (2, 10, 1, 1, 1)]
    assert all(s["image"].dtype == np.uint8 and s["label"].dtype == np.int32 for s in stacks)
    seen = order(0, 1)
    assert len(seen) == 100 and len(set(seen)) == 100  # 3 dropped, none twice
    np.testing.assert_array_equal(seen, np.concatenate([s["image"].ravel() for s in stacks]))  # images stay with labels
    np.testing.assert_array_equal(seen, order(0, 1))
    assert not np.array_equal(seen, order(0, 2)) and not np.array_equal(seen, order(1, 1))


def test_eval_batches_cover_every_example_once():
    images = np.arange(25, dtype=np.uint8).reshape(25, 1, 1, 1)
    labels = np.arange(25, dtype=np.int32)
    batches = list(input_pipeline.eval_batches(images, labels, 10))
    assert all(b["image"].shape == (10, 1, 1, 1) for b in batches)
    np.testing.assert_array_equal(np.concatenate([b["label"][b["mask"] == 1] for b in batches]), labels)
    assert batches[-1]["mask"].tolist() == [1] * 5 + [0] * 5


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


# --- the model, the steps, the metrics ---

def test_model_output_shape_and_parameter_count():
    state = train.create_train_state(0, 0.01, 0.9)
    assert sum(p.size for p in jax.tree.leaves(state.params)) == 824_458
    assert state.apply_fn({"params": state.params}, jnp.zeros((3, 28, 28, 1))).shape == (3, 10)


def test_model_summary_prints_parameter_count(capsys):
    runpy.run_path(os.path.join(HERE, "model.py"), run_name="__main__")
    assert "824,458" in capsys.readouterr().out


def test_one_train_step_matches_numpy_and_lowers_the_loss(data_dir):
    """Golden values: the metrics of one step, as the loop runs it, are those of its forward pass, in numpy."""
    images, labels = input_pipeline.load_dataset("mnist", data_dir)["train"]
    batch = {"image": images[:32], "label": labels[:32]}
    state = train.create_train_state(0, 0.01, 0.9)
    loss_before, accuracy_before = numpy_metrics(state.params, batch["image"], batch["label"])
    run_train_steps, _ = train.jit_steps()
    sums = {name: jnp.float32(0) for name in ("loss", "correct", "count")}
    state, sums = run_train_steps(state, sums, jax.tree.map(lambda a: a[None], batch))
    assert float(sums["loss"]) / 32 == pytest.approx(loss_before, rel=1e-5)
    assert 100 * float(sums["correct"]) / 32 == pytest.approx(accuracy_before) and float(sums["count"]) == 32
    assert numpy_metrics(state.params, batch["image"], batch["label"])[0] < loss_before
    assert int(state.step) == 1


def test_the_jitted_steps_lower_trace_and_eval_shape():
    """jit_steps gives jax.jit objects of train_steps (a scan of train_step) and eval_step, compiled
    with our XLA options."""
    state = train.create_train_state(0, 0.01, 0.9)
    batch = {"image": jnp.zeros((32, 28, 28, 1), jnp.uint8), "label": jnp.zeros(32, jnp.int32)}
    stack = jax.tree.map(lambda a: jnp.stack([a] * 5), batch)
    sums = {name: jnp.float32(0) for name in ("loss", "correct", "count")}
    run_train_steps, run_eval_step = train.jit_steps()
    for jitted, args in ((run_train_steps, (state, sums, stack)), (run_eval_step, (state, {**batch, "mask": jnp.ones(32)}))):
        assert jitted.trace(*args).jaxpr is not None
        metrics = jitted.eval_shape(*args)
        metrics = metrics[1] if isinstance(metrics, tuple) else metrics  # train_steps: (state, sums)
        assert jax.tree.map(lambda a: a.shape, metrics) == {"loss": (), "correct": (), "count": ()}
        if jax.default_backend() == "cpu":  # YNNPACK's fusions: our XLA options apply
            assert "ynn" in jitted.lower(*args).compile().as_text().lower()


def test_a_call_of_one_step_has_no_loop(data_dir):
    """An epoch's last call may hold one step (--batch-size 90: 133 calls of 5, one of 1). As a
    one-step lax.scan it was a while loop, in which XLA:CPU ran the step 20x slower."""
    state = train.create_train_state(0, 0.01, 0.9)
    sums = {name: jnp.float32(0) for name in ("loss", "correct", "count")}
    one = {"image": jnp.zeros((1, 32, 28, 28, 1), jnp.uint8), "label": jnp.zeros((1, 32), jnp.int32)}
    five = jax.tree.map(lambda a: jnp.concatenate([a] * 5), one)
    run_train_steps, _ = train.jit_steps()
    assert "while" not in run_train_steps.lower(state, sums, one).as_text()
    assert "while" not in run_train_steps.lower(state, sums, five).as_text()  # unrolled
    assert "while" in run_train_steps.lower(state, sums, five, unroll=False).as_text()


def test_evaluate_matches_numpy_with_uneven_last_batch(data_dir, steps):
    images, labels = input_pipeline.load_dataset("mnist", data_dir)["test"]
    images, labels = np.concatenate([images] * 5), np.concatenate([labels] * 5)  # 1015: last batch 15
    state = train.create_train_state(0, 0.01, 0.9)
    tested = train.evaluate(steps[1], state, train.make_mesh(), images, labels)
    expected_loss, expected_accuracy = numpy_metrics(state.params, images, labels)
    assert tested["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert tested["accuracy"] == pytest.approx(expected_accuracy, abs=1e-9)


def test_train_epoch_metrics_match_numpy(data_dir, steps):
    """With learning rate 0 the parameters stay put, so the epoch's sums have a numpy reference."""
    images, labels = input_pipeline.load_dataset("mnist", data_dir)["train"]
    images, labels = images[:300], labels[:300]  # 9 batches of 32: two calls, one of 4 steps
    mesh = train.make_mesh()
    state = train.create_train_state(0, 0.0, 0.0)
    params = jax.device_get(state.params)  # a copy: train_epoch donates the state's buffers
    _, trained = train.train_epoch(steps[0], on_mesh(state, mesh), mesh, images, labels, CONFIG, 1,
                                   train.STEPS_PER_CALL["cpu"])
    seen = np.concatenate([b["label"].ravel() for b in input_pipeline.train_batches(
        np.arange(300), np.arange(300), 32, 0, 1, 5)])
    expected_loss, expected_accuracy = numpy_metrics(params, images[seen], labels[seen])
    assert trained["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert trained["accuracy"] == pytest.approx(expected_accuracy, abs=1e-9)


def test_long_rolled_calls_train_like_short_unrolled_ones(data_dir, steps):
    """The accelerators' way (a rolled scan over many steps per call) forced on the CPU: the
    same metrics and evaluation as XLA:CPU's 5 unrolled steps per call, and the same parameters
    but for sums taken in another order."""
    images, labels = input_pipeline.load_dataset("mnist", data_dir)["train"]
    mesh = train.make_mesh()
    results = []
    for calls in (train.STEPS_PER_CALL["cpu"], (10, False)):  # 20 steps: 4 calls of 5, or 2 of 10
        state, trained = train.train_epoch(steps[0], on_mesh(train.create_train_state(0, 0.01, 0.9), mesh), mesh,
                                           images, labels, CONFIG, 1, calls)
        results.append((state, [trained["loss"], trained["accuracy"]]))
    (state, metrics), (rolled_state, rolled_metrics) = results
    assert rolled_metrics == pytest.approx(metrics, rel=1e-5)
    test_images, test_labels = input_pipeline.load_dataset("mnist", data_dir)["test"]
    # Sums in another order move the parameters apart step by step: after these 20 steps, at most
    # 4e-7 of a leaf's largest value on JAX 0.10.2 but 7e-3 on JAX 0.11.2.
    assert train.evaluate(steps[1], rolled_state, mesh, test_images, test_labels) == pytest.approx(
        train.evaluate(steps[1], state, mesh, test_images, test_labels), rel=1e-3)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(rolled_state.params)):
        assert np.abs(a - b).max() <= 1e-2 * np.abs(a).max()


class MLP(nn.Module):
    """Another Linen module with the CNN's input and 10 outputs."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(64)(x.reshape((x.shape[0], -1))))
        return nn.Dense(10)(x)


def test_another_linen_model_trains_without_an_edit_to_train_py(data_dir, steps):
    images, labels = input_pipeline.load_dataset("mnist", data_dir)["train"]
    mesh = train.make_mesh()
    state = on_mesh(train.create_train_state(0, 0.01, 0.9, model=MLP()), mesh)
    assert sum(p.size for p in jax.tree.leaves(state.params)) == 784 * 64 + 64 + 64 * 10 + 10
    before = train.evaluate(steps[1], state, mesh, *input_pipeline.load_dataset("mnist", data_dir)["test"])
    for epoch in (1, 2, 3):
        state, trained = train.train_epoch(steps[0], state, mesh, images, labels, CONFIG, epoch, train.steps_per_call())
    after = train.evaluate(steps[1], state, mesh, *input_pipeline.load_dataset("mnist", data_dir)["test"])
    assert after["loss"] < before["loss"] / 2 and after["accuracy"] >= 90


def test_short_run_learns_synthetic_digits(trained):
    lines = epoch_lines(trained[1])
    assert [(s, e) for s, e, _, _ in lines] == [(s, e) for e in (1, 2) for s in ("train", "test")]
    assert lines[-1][3] >= 95.0 and lines[-1][2] < lines[1][2]


def test_an_xla_option_unknown_to_xla_is_left_out_once(data_dir, trained, tmp_path, monkeypatch, capsys):
    """A release that drops one of our options trains as before, with its default and one line."""
    monkeypatch.setattr(xla, "XLA_OPTIONS", {**xla.XLA_OPTIONS, "xla_made_up_option": True})
    xla.compiler_options.cache_clear()
    try:
        stdout = train_here("--epochs", 1, "--data-dir", data_dir, "--workdir", tmp_path)
        train_here("--epochs", 2, "--resume", "--data-dir", data_dir, "--workdir", tmp_path)
    finally:
        xla.compiler_options.cache_clear()
    assert epoch_lines(stdout) == epoch_lines(trained[1])[:2]  # the other options still apply
    notes = capsys.readouterr().err.strip().splitlines()
    assert len(notes) == 1 and notes[0].startswith("note: the XLA of JAX ") and notes[0].endswith(
        "refuses xla_made_up_option (INVALID_ARGUMENT: No such compile option: 'xla_made_up_option'); "
        "going on with its default"), notes


# --- checkpoints, resume, the log's files ---

def test_resume_gives_the_numbers_of_an_uninterrupted_run(data_dir, trained, tmp_path):
    workdir, two_epochs = trained
    (tmp_path / "resumed").mkdir()
    (tmp_path / "resumed" / "checkpoint.msgpack").write_bytes((workdir / "checkpoint.msgpack").read_bytes())
    resumed = train_here("--resume", "--epochs", 3, "--data-dir", data_dir, "--workdir", tmp_path / "resumed")
    straight = train_here("--epochs", 3, "--data-dir", data_dir, "--workdir", tmp_path / "straight")
    assert [line[1] for line in epoch_lines(resumed)] == [3, 3]
    assert epoch_lines(two_epochs + resumed) == epoch_lines(straight)
    a = load_checkpoint(tmp_path / "resumed" / "checkpoint.msgpack")
    b = load_checkpoint(tmp_path / "straight" / "checkpoint.msgpack")
    assert a[1:3] == b[1:3] and [h["test_loss"] for h in a[3]] == [h["test_loss"] for h in b[3]]
    for x, y in zip(jax.tree.leaves(a[0]), jax.tree.leaves(b[0])):
        np.testing.assert_array_equal(x, y)


def test_the_workdir_holds_checkpoint_history_and_plot(trained):
    workdir, stdout = trained
    assert sorted(os.listdir(workdir)) == ["checkpoint.msgpack", "history.json", "metrics.png"]
    history = json.loads((workdir / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert (round(history[-1]["test_loss"], 5), round(history[-1]["test_accuracy"], 2)) == epoch_lines(stdout)[-1][2:]
    assert (workdir / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _, epoch, config, saved_history = load_checkpoint(workdir / "checkpoint.msgpack")
    assert epoch == 2 and config.dataset == "mnist" and saved_history == history


def test_checkpoint_round_trip(tmp_path):
    state = train.create_train_state(3, 0.05, 0.5)
    state = state.replace(opt_state=jax.tree.map(lambda a: a + 1, state.opt_state), step=7)
    config = Config(batch_size=16, learning_rate=0.05, momentum=0.5, seed=3, data_dir="/data")
    history = [{"epoch": e, "train_loss": 0.5, "train_accuracy": 90.5, "test_loss": 0.25, "test_accuracy": 91.25,
                "epoch_time": 1.5} for e in (1, 2, 3, 4)]
    outputs.save_checkpoint(str(tmp_path / "c"), state, 4, config, history)
    loaded, epoch, loaded_config, loaded_history = load_checkpoint(tmp_path / "c")
    assert (epoch, loaded_config, loaded_history, int(loaded.step)) == (4, config, history, 7)
    for a, b in zip(jax.tree.leaves((state.params, state.opt_state)),
                    jax.tree.leaves((loaded.params, loaded.opt_state))):
        np.testing.assert_array_equal(a, b)


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "c")
    history = [{"epoch": 1, "train_loss": 0.5, "train_accuracy": 90.5, "test_loss": 0.25, "test_accuracy": 91.25}]
    outputs.save_checkpoint(path, train.create_train_state(0, 0.01, 0.9), 1, Config(), history)

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)  # fails after the bytes went to the temp file
    with pytest.raises(OSError) as raised:
        outputs.save_checkpoint(path, train.create_train_state(1, 0.01, 0.9), 2, Config(), history * 2)
    assert (raised.value.errno, raised.value.strerror, raised.value.filename) == (28, "No space left on device", path)
    assert load_checkpoint(path)[1] == 1
    assert os.listdir(tmp_path) == ["c"]


def test_plot_ticks_whole_epochs():
    history = [{"epoch": e, "train_loss": 1 / e, "test_loss": 1 / e, "train_accuracy": 90 + e,
                "test_accuracy": 90 + e} for e in (1, 2, 3)]
    for ax in outputs.plot_history(history).axes:
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert len(ticks) >= 2 and all(t == int(t) for t in ticks), ticks


# --- errors a user can cause: one line, non-zero exit, no traceback, nothing lost ---

@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], r"--epochs: must be greater than 0, got 0"),
    (["--epochs", "-1"], r"--epochs: must be greater than 0, got -1"),
    (["--epochs", "abc"], r"--epochs: expected a positive number, got 'abc'"),
    (["--batch-size", "0"], r"--batch-size: must be greater than 0"),
    (["--learning-rate", "-0.1"], r"--learning-rate: must be greater than 0"),
    (["--dataset", "cifar10"], r"--dataset: invalid choice: 'cifar10'"),
    (["--seed", "-1"], r"--seed: must be 0 to 9223372036854775807, got -1"),
    (["--batch-size", "641"], r"--batch-size 641 is larger than the 640 training images"),
    (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"], r"--process-id must be 0 to 1, got 2"),
    (["--coordinator", "127.0.0.1:1"], r"--coordinator, --num-processes and --process-id go together"),
])
def test_bad_flags(run_main, data_dir, tmp_path, flags, message):
    assert_clean_error(run_main(train.main, "--data-dir", data_dir, "--workdir", tmp_path, *flags), message)


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
    elif damage == "claims 2^31 images":
        data = bytearray(gzip.decompress(open(images_gz, "rb").read()))
        data[4:8] = (2 ** 31).to_bytes(4, "big")
        open(images_gz, "wb").write(gzip.compress(bytes(data)))
    elif damage == "zero columns":
        write_idx(images_gz[:-3], np.zeros((640, 28, 0), np.uint8))
    elif damage == "label 10":
        labels = synthetic_split(640, 1)[1]
        labels[5] = 10
        write_idx(os.path.join(folder, "train-labels-idx1-ubyte"), labels)
    return folder


@pytest.mark.parametrize("damage, message", [
    ("no folder", r"--data-dir .* is not a folder"),
    ("missing file", r"has no t10k-labels-idx1-ubyte \(or t10k-labels-idx1-ubyte.gz\); it needs the four"),
    ("truncated gz", r"cannot read .*train-images-idx3-ubyte.gz"),
    ("wrong magic", r"train-images-idx3-ubyte.gz is not an IDX file of this kind"),
    ("count mismatch", r"has 639 images but .* has 640 labels"),
    ("not 28x28", r"holds 32x32 images, not 28x28"),
    ("claims 2^31 images", r"train-images-idx3-ubyte.gz is damaged or cut short: its header gives the shape "
                           r"\(2147483648, 28, 28\), and the data that follows is shorter"),
    ("zero columns", r"train-images-idx3-ubyte.gz has a damaged header: it gives the shape \(640, 28, 0\)"),
    ("label 10", r"train-labels-idx1-ubyte.gz is damaged: label 10 at index 5, where labels are 0 to 9"),
])
def test_bad_data(run_main, tmp_path, damage, message):
    folder = tmp_path / "missing" if damage == "no folder" else broken_data(str(tmp_path / "data"), damage)
    assert_clean_error(run_main(train.main, "--data-dir", folder, "--workdir", tmp_path / "w"), message)


@pytest.mark.parametrize("learning_rate, loss", [("1e20", r"(nan|inf)"), ("1e4", r"\d\.\d+e\+\d+")])
def test_diverged_loss_stops_and_keeps_the_last_good_checkpoint(run_main, data_dir, trained, tmp_path,
                                                                learning_rate, loss):
    """nan, inf, or finite but far above an untrained model's 2.30."""
    good = (trained[0] / "checkpoint.msgpack").read_bytes()
    (tmp_path / "checkpoint.msgpack").write_bytes(good)
    run = run_main(train.main, "--learning-rate", learning_rate, "--data-dir", data_dir, "--workdir", tmp_path)
    assert_clean_error(run, rf"the loss became {loss} in epoch 1; lower --learning-rate")
    assert (tmp_path / "checkpoint.msgpack").read_bytes() == good


def test_unwritable_workdir_fails_before_training(run_main, data_dir, tmp_path):
    (tmp_path / "file").write_text("")
    run = run_main(train.main, "--data-dir", data_dir, "--workdir", tmp_path / "file" / "w")
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


def test_full_disk_stops_with_one_line_and_keeps_the_last_checkpoint(run_main, data_dir, small_disk):
    run = run_main(train.main, "--epochs", 3, "--data-dir", data_dir, "--workdir", small_disk)
    checkpoint = re.escape(str(small_disk / "checkpoint.msgpack"))
    assert_clean_error(run, rf"^error: cannot write {checkpoint}: No space left on device; last checkpoint: "
                            rf"{checkpoint} \(epoch 1\); free space, then continue with --resume$")
    assert epoch_lines(run.stdout)[-1][:2] == ("test", 2)  # epoch 2 trained, its checkpoint did not fit
    assert load_checkpoint(small_disk / "checkpoint.msgpack")[1] == 1
    assert sorted(os.listdir(small_disk)) == ["checkpoint.msgpack", "history.json", "metrics.png"]


def test_resume_with_other_settings_is_refused(run_main, data_dir, trained):
    run = run_main(train.main, "--resume", "--learning-rate", "0.1", "--data-dir", data_dir, "--workdir", trained[0])
    assert_clean_error(run, r"cannot resume .*--learning-rate 0.1 \(checkpoint: 0.01\)")


def test_a_bug_shows_its_traceback(run_main, data_dir, tmp_path, monkeypatch):
    """main() turns only what a user can cause into one line."""
    def bug(*args):
        raise ValueError("a bug")

    monkeypatch.setattr(train, "evaluate", bug)
    with pytest.raises(ValueError, match="a bug"):
        run_main(train.main, "--epochs", 1, "--data-dir", data_dir, "--workdir", tmp_path)


def test_unreachable_coordinator_is_one_line_within_peer_timeout(data_dir, tmp_path):
    """What `train.py --coordinator ... --process-id 1` prints when process 0 is not there; JAX's
    own client would abort the process with a stack trace."""
    import time

    import distributed
    from conftest import closed_port

    _, args = train.parse_args(["--coordinator", f"127.0.0.1:{closed_port()}", "--num-processes", "2",
                             "--process-id", "1", "--peer-timeout", "1"])
    start = time.perf_counter()
    with pytest.raises(distributed.StartError, match=r"^cannot reach the coordinator at 127.0.0.1:\d+ within 1 s "
                                                      r"\(.*\); start process 0 there, or fix --coordinator$"):
        distributed.start(args)
    assert time.perf_counter() - start < 5


@pytest.fixture
def no_compilation_cache(monkeypatch):
    """JAX's compilation cache settings unset, as in a user's process; restored afterwards."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    previous = {name: getattr(jax.config, name) for name in names}
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    jax.config.update("jax_compilation_cache_dir", None)
    yield
    for name, value in previous.items():
        jax.config.update(name, value)


def test_the_compilation_cache_is_the_users_alone(no_compilation_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    xla.use_compilation_cache()
    folder = tmp_path / "mnist-jax-flax"
    assert jax.config.jax_compilation_cache_dir == str(folder) and folder.stat().st_mode & 0o777 == 0o700
    jax.config.update("jax_compilation_cache_dir", None)
    folder.chmod(0o775)  # others could put code there
    xla.use_compilation_cache()
    assert jax.config.jax_compilation_cache_dir is None
    assert capsys.readouterr().err == f"note: not using the compilation cache {folder}: others can write to it\n"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "")  # README: the way to turn it off
    folder.chmod(0o700)
    xla.use_compilation_cache()
    assert jax.config.jax_compilation_cache_dir is None
