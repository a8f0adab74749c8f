"""train.py, input_pipeline.py, outputs.py and model.py in this process: the quick tier,
`python -m pytest -q test_train.py`, to run after every edit."""
import dataclasses
import gzip
import json
import os
import re
import runpy
import shutil
import subprocess

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import input_pipeline
import outputs
import train
import xla
from model import CNN, MNIST_IMAGE, Config, RunConfig, create_train_state
from conftest import (HERE, assert_clean_error, epoch_lines, load_checkpoint, numpy_metrics,
                      synthetic_split, train_here, write_dataset, write_idx)


def fresh_state(config=Config(), model=CNN()):
    """A new train state of the model for MNIST's images."""
    return create_train_state(model, config, MNIST_IMAGE)


def machinery_steps(unroll=True):
    """(run_train_step, run_eval_step) as train.py's machinery runs them on this process's
    devices, with the state it takes: replicated over the mesh."""
    mesh = jax.make_mesh((jax.device_count(),), ("batch",), axis_types=(AxisType.Auto,))
    return (*train.data_parallel(mesh, *train.jit_steps(), unroll),
            lambda state: jax.device_put(state, NamedSharding(mesh, P())))


# --- input pipeline ---

@pytest.mark.parametrize("gz", [False, True])
def test_parse_idx_reads_raw_and_gz(tmp_path, gz):
    images = np.arange(3 * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(3, 28, 28)
    write_idx(tmp_path / "x", images, gz)
    path = str(tmp_path / ("x.gz" if gz else "x"))
    parsed = input_pipeline.parse_idx(path, input_pipeline.IMAGES_MAGIC)
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
        batches = train.train_batches(images, labels, 10, seed, epoch)
        return np.concatenate([b["label"] for b in batches])
    batches = list(train.train_batches(images, labels, 10, 0, 1))
    assert [b["image"].shape for b in batches] == [(10, 1, 1, 1)] * 10
    assert all(b["image"].dtype == np.uint8 and b["label"].dtype == np.int32 for b in batches)
    seen = order(0, 1)
    assert len(seen) == 100 and len(set(seen)) == 100  # 3 dropped, none twice
    np.testing.assert_array_equal(seen, np.concatenate([b["image"].ravel() for b in batches]))
    np.testing.assert_array_equal(seen, order(0, 1))
    assert not np.array_equal(seen, order(0, 2)) and not np.array_equal(seen, order(1, 1))


def test_stacks_group_batches_for_one_call_each():
    """The machinery's feed: [k, B, ...] stacks in the order of the batches, through a tqdm bar
    (whose iter() starts over each time it is called)."""
    from tqdm import tqdm

    batches = [{"label": np.full(4, i)} for i in range(12)]
    stacks = list(train.stacks(tqdm(batches, disable=True), 5))
    assert [s["label"].shape for s in stacks] == [(5, 4), (5, 4), (2, 4)]
    np.testing.assert_array_equal(np.concatenate([s["label"][:, 0] for s in stacks]), np.arange(12))


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
    state = fresh_state()
    assert sum(p.size for p in jax.tree.leaves(state.params)) == 824_458
    images = jax.ShapeDtypeStruct((3, 28, 28, 1), jnp.uint8)
    assert jax.eval_shape(state.apply_fn, {"params": state.params}, images).shape == (3, 10)


def test_states_of_equal_settings_share_their_optimizer():
    """jit keys the steps on the state's tx: a new one for equal settings would compile anew."""
    assert fresh_state(Config()).tx is fresh_state(Config(epochs=3, batch_size=64)).tx


def test_any_seed_the_flags_take_makes_a_state():
    """--seed takes 0 to 2^63 - 1; jit takes a traced integer argument only up to 2^31 - 1."""
    for seed in (2 ** 31, 2 ** 63 - 1):
        state = create_train_state(nn.Dense(2), Config(seed=seed), np.zeros((1, 3), np.float32))
        assert state.params["kernel"].shape == (3, 2)


def test_the_cnn_scales_uint8_images_and_takes_float_ones_as_they_are():
    """Scaled once, in the model: a float image already in [0, 1] is not divided again."""
    state = fresh_state()
    images = synthetic_split(4, 0)[0][..., None]
    logits = [state.apply_fn({"params": state.params}, x) for x in (images, images / 255)]
    np.testing.assert_allclose(logits[0], logits[1], rtol=1e-5, atol=1e-5)


def test_model_summary_prints_parameter_count(capsys):
    runpy.run_path(os.path.join(HERE, "model.py"), run_name="__main__")
    assert "824,458" in capsys.readouterr().out


def test_one_train_step_matches_numpy_and_lowers_the_loss(data_dir):
    """Golden values: the metric sums of one step are those of its forward pass, in numpy."""
    images, labels = input_pipeline.load_dataset("mnist", data_dir)["train"]
    batch = {"image": images[:32], "label": labels[:32]}
    loss_before, accuracy_before = numpy_metrics(fresh_state().params, images[:32], labels[:32])
    state, sums = jax.jit(train.train_step)(fresh_state(), batch)
    assert float(sums["loss"]) / 32 == pytest.approx(loss_before, rel=1e-5)
    assert 100 * float(sums["correct"]) / 32 == pytest.approx(accuracy_before)
    assert int(sums["count"]) == 32 and int(state.step) == 1
    assert numpy_metrics(state.params, images[:32], labels[:32])[0] < loss_before


def test_the_jitted_steps_lower_trace_and_eval_shape():
    """jit_steps gives jax.jit objects of train_steps (a scan of train_step) and eval_step,
    compiled with our XLA options."""
    batch = {"image": jnp.zeros((32, 28, 28, 1), jnp.uint8), "label": jnp.zeros(32, jnp.int32)}
    stack = jax.tree.map(lambda a: jnp.stack([a] * 5), batch)
    jitted_train, jitted_eval = train.jit_steps()
    for jitted, args in ((jitted_train, (fresh_state(), stack, True)),
                         (jitted_eval, (fresh_state(), batch))):
        assert jitted.trace(*args).jaxpr is not None
        sums = jitted.eval_shape(*args)
        sums = sums[1] if isinstance(sums, tuple) else sums  # train_steps: (state, sums)
        assert jax.tree.map(lambda a: a.shape, sums) == {"loss": (), "correct": (), "count": ()}
        if jax.default_backend() == "cpu":  # YNNPACK's fusions: our XLA options apply
            assert "ynn" in jitted.lower(*args).compile().as_text().lower()


def test_a_call_of_one_step_has_no_loop():
    """An epoch's last call may hold one step (--batch-size 90: 133 calls of 5, one of 1). As a
    one-step lax.scan it was a while loop, in which XLA:CPU ran the step 20x slower."""
    one = {"image": jnp.zeros((1, 32, 28, 28, 1), jnp.uint8),
           "label": jnp.zeros((1, 32), jnp.int32)}
    five = jax.tree.map(lambda a: jnp.concatenate([a] * 5), one)
    jitted_train, _ = train.jit_steps()
    assert "while" not in jitted_train.lower(fresh_state(), one, True).as_text()
    assert "while" not in jitted_train.lower(fresh_state(), five, True).as_text()  # unrolled
    assert "while" in jitted_train.lower(fresh_state(), five, False).as_text()


def test_evaluate_matches_numpy_with_uneven_last_batch(data_dir):
    """The recipe's evaluate and the machinery's agree with numpy on 1015 images (last batch 15)."""
    images, labels = input_pipeline.load_dataset("mnist", data_dir)["test"]
    images, labels = np.concatenate([images] * 5), np.concatenate([labels] * 5)
    expected_loss, expected_accuracy = numpy_metrics(fresh_state().params, images, labels)
    _, run_eval_step, on_mesh = machinery_steps()
    for step, state in ((jax.jit(train.eval_step), fresh_state()),
                        (run_eval_step, on_mesh(fresh_state()))):
        tested = train.evaluate(step, state, images, labels)
        assert tested["loss"] == pytest.approx(expected_loss, rel=1e-5)
        assert tested["accuracy"] == pytest.approx(expected_accuracy, abs=1e-9)


def test_train_epoch_metrics_match_numpy(data_dir):
    """With learning rate 0 the parameters stay put, so the epoch's sums have a numpy reference:
    the machinery's way, 9 batches of 32 in two calls, one of 4 steps."""
    images, labels = input_pipeline.load_dataset("mnist", data_dir)["train"]
    images, labels = images[:300], labels[:300]
    params = fresh_state().params
    run_train_step, _, on_mesh = machinery_steps()
    batches = train.train_batches(images, labels, 32, 0, 1)
    _, trained = train.train_epoch(run_train_step, on_mesh(fresh_state(Config(learning_rate=0.0))),
                                   train.stacks(batches, 5))
    order = train.train_batches(np.arange(300), np.arange(300), 32, 0, 1)
    seen = np.concatenate([b["label"] for b in order])
    expected_loss, expected_accuracy = numpy_metrics(params, images[seen], labels[seen])
    assert trained["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert trained["accuracy"] == pytest.approx(expected_accuracy, abs=1e-9)


def test_the_recipe_and_a_rolled_scan_train_like_train_py(data_dir, trained, capsys):
    """Epoch 1 of train.py (5 steps a call, unrolled: the `trained` run) against the recipe's
    plain jax.jit, one step a call, and the accelerators' rolled scan, 10 steps a call, forced on
    the CPU. Float32 sums in another order move the parameters apart step by step: after these
    20 steps the train loss agrees to 1e-5 and the test loss to 1e-3 (one step a call against 5:
    0.45190 and 0.45191 on JAX 0.10.2); the parameters, to 1e-2 of a leaf's largest value (the
    rolled scan against one step a call, JAX 0.11.2)."""
    expected = json.loads((trained[0] / "history.json").read_text())[0]
    data = input_pipeline.load_dataset("mnist", data_dir)
    run_train_step, run_eval_step, on_mesh = machinery_steps(unroll=False)
    rolled = (run_train_step, run_eval_step, lambda batches: train.stacks(batches, 10))
    states = []
    for state, steps in ((fresh_state(), None), (on_mesh(fresh_state()), rolled)):
        state, (record,) = train.train_and_evaluate(state, data["train"], data["test"],
                                                    Config(epochs=1), steps=steps)
        states.append(state)
        assert len(epoch_lines(capsys.readouterr().out)) == 2
        assert record["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-5)
        assert record["test_loss"] == pytest.approx(expected["test_loss"], rel=1e-3)
        for key in ("train_accuracy", "test_accuracy"):  # one image in 640 is 0.16
            assert record[key] == pytest.approx(expected[key], abs=0.2)
    for a, b in zip(*(jax.tree.leaves(state.params) for state in states)):
        assert np.abs(a - b).max() <= 1e-2 * np.abs(a).max()


class MLP(nn.Module):
    """Another Linen module: a newcomer's own model."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(64)(x.reshape((x.shape[0], -1))))
        return nn.Dense(10)(x)


def test_a_newcomers_model_and_arrays_train_with_the_recipe_alone(data_dir, capsys):
    """What README's "Copy the recipe" promises: their model, their float arrays, one device,
    train_and_evaluate with its defaults."""
    data = input_pipeline.load_dataset("mnist", data_dir)
    (x_train, y_train), (x_test, y_test) = [(x.astype(np.float32) / 255, y)
                                            for x, y in data.values()]
    config = Config(epochs=3)
    state = create_train_state(MLP(), config, x_train[:1])
    assert sum(p.size for p in jax.tree.leaves(state.params)) == 784 * 64 + 64 + 64 * 10 + 10
    state, history = train.train_and_evaluate(state, (x_train, y_train), (x_test, y_test), config)
    assert [record["epoch"] for record in history] == [1, 2, 3]
    assert len(epoch_lines(capsys.readouterr().out)) == 6
    assert history[-1]["test_loss"] < history[0]["test_loss"] / 2
    assert history[-1]["test_accuracy"] >= 90


def test_short_run_learns_synthetic_digits(trained):
    lines = epoch_lines(trained[1])
    assert [(s, e) for s, e, _, _ in lines] == [(s, e) for e in (1, 2) for s in ("train", "test")]
    assert lines[-1][3] >= 95.0 and lines[-1][2] < lines[1][2]


def test_an_xla_option_unknown_to_xla_is_left_out_once(data_dir, trained, tmp_path, monkeypatch,
                                                       capsys):
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
        "refuses xla_made_up_option (INVALID_ARGUMENT: No such compile option: "
        "'xla_made_up_option'); "
        "going on with its default"), notes


# --- checkpoints, resume, the log's files ---

def test_resume_gives_the_numbers_of_an_uninterrupted_run(data_dir, trained, tmp_path):
    workdir, two_epochs = trained
    (tmp_path / "resumed").mkdir()
    checkpoint = (workdir / "checkpoint.msgpack").read_bytes()
    (tmp_path / "resumed" / "checkpoint.msgpack").write_bytes(checkpoint)
    resumed = train_here("--resume", "--epochs", 3, "--data-dir", data_dir, "--workdir",
                         tmp_path / "resumed")
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
    assert sorted(os.listdir(workdir)) == [".lock", "checkpoint.msgpack", "history.json",
                                           "metrics.png"]
    history = json.loads((workdir / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    last = (round(history[-1]["test_loss"], 5), round(history[-1]["test_accuracy"], 2))
    assert last == epoch_lines(stdout)[-1][2:]
    assert (workdir / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _, epoch, config, saved_history = load_checkpoint(workdir / "checkpoint.msgpack")
    assert epoch == 2 and config.dataset == "mnist" and saved_history == history


def test_checkpoint_round_trip(tmp_path):
    config = RunConfig(batch_size=16, learning_rate=0.05, momentum=0.5, seed=3, data_dir="/data")
    state = fresh_state()  # of other settings: the checkpoint records what it is given
    state = state.replace(opt_state=jax.tree.map(lambda a: a + 1, state.opt_state), step=7)
    history = [{"epoch": e, "train_loss": 0.5, "train_accuracy": 90.5, "test_loss": 0.25,
                "test_accuracy": 91.25, "epoch_time": 1.5} for e in (1, 2, 3, 4)]
    outputs.save(tmp_path, state, 4, config, history)
    loaded, epoch, loaded_config, loaded_history = load_checkpoint(tmp_path / "checkpoint.msgpack")
    assert (epoch, loaded_config, loaded_history, int(loaded.step)) == (4, config, history, 7)
    for a, b in zip(jax.tree.leaves((state.params, state.opt_state)),
                    jax.tree.leaves((loaded.params, loaded.opt_state))):
        np.testing.assert_array_equal(a, b)


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.msgpack")
    history = [{"epoch": 1, "train_loss": 0.5, "train_accuracy": 90.5, "test_loss": 0.25,
                "test_accuracy": 91.25}]
    outputs.save(tmp_path, fresh_state(), 1, RunConfig(), history)
    files = sorted(os.listdir(tmp_path))

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)  # fails after the bytes went to the temp file
    with pytest.raises(OSError) as raised:
        outputs.save(tmp_path, fresh_state(), 2, RunConfig(), history * 2)
    assert (raised.value.errno, raised.value.strerror, raised.value.filename) == (
        28, "No space left on device", path)
    assert load_checkpoint(path)[1] == 1
    assert sorted(os.listdir(tmp_path)) == files == ["checkpoint.msgpack", "history.json",
                                                     "metrics.png"]


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
    (["--epochs", "abc"], r"--epochs: invalid int value: 'abc'"),
    (["--learning-rate", "nan"], r"--learning-rate: must be greater than 0, got nan"),
    (["--peer-timeout", "0"], r"--peer-timeout: must be greater than 0, got 0"),
    (["--batch-size", "0"], r"--batch-size: must be greater than 0"),
    (["--learning-rate", "-0.1"], r"--learning-rate: must be greater than 0"),
    (["--dataset", "cifar10"], r"--dataset: invalid choice: 'cifar10'"),
    (["--seed", "-1"], r"--seed: must be 0 to 9223372036854775807, got -1"),
    (["--batch-size", "641"], r"--batch-size 641 is larger than the 640 training images"),
    (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"],
     r"--process-id must be 0 to 1, got 2"),
    (["--coordinator", "127.0.0.1:1"],
     r"--coordinator, --num-processes and --process-id go together"),
])
def test_bad_flags(run_main, data_dir, tmp_path, flags, message):
    run = run_main(train.main, "--data-dir", data_dir, "--workdir", tmp_path, *flags)
    assert_clean_error(run, message)


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
    ("missing file",
     r"has no t10k-labels-idx1-ubyte \(or t10k-labels-idx1-ubyte.gz\); it needs the four"),
    ("truncated gz", r"cannot read .*train-images-idx3-ubyte.gz"),
    ("wrong magic", r"train-images-idx3-ubyte.gz is not an IDX file of this kind"),
    ("count mismatch", r"has 639 images but .* has 640 labels"),
    ("not 28x28", r"holds 32x32 images, not 28x28"),
    ("claims 2^31 images",
     r"train-images-idx3-ubyte.gz is damaged or cut short: its header gives the shape "
     r"\(2147483648, 28, 28\), and the data that follows is shorter"),
    ("zero columns",
     r"train-images-idx3-ubyte.gz has a damaged header: it gives the shape \(640, 28, 0\)"),
    ("label 10",
     r"train-labels-idx1-ubyte.gz is damaged: label 10 at index 5, where labels are 0 to 9"),
])
def test_bad_data(run_main, tmp_path, damage, message):
    if damage == "no folder":
        folder = tmp_path / "missing"
    else:
        folder = broken_data(str(tmp_path / "data"), damage)
    run = run_main(train.main, "--data-dir", folder, "--workdir", tmp_path / "w")
    assert_clean_error(run, message)


@pytest.mark.parametrize("learning_rate, loss", [("1e38", r"(nan|inf)"),
                                                 ("1e4", r"\d\.\d+e\+\d+")])
def test_diverged_loss_stops_and_keeps_the_last_good_checkpoint(run_main, data_dir, trained,
                                                                tmp_path, learning_rate, loss):
    """nan, inf, or finite but far above an untrained model's 2.30: the epoch is not saved."""
    state, epoch, config, history = load_checkpoint(trained[0] / "checkpoint.msgpack")
    config = dataclasses.replace(config, learning_rate=float(learning_rate))
    outputs.save(tmp_path, state, epoch, config, history)
    good = (tmp_path / "checkpoint.msgpack").read_bytes()
    run = run_main(train.main, "--resume", "--epochs", 3, "--learning-rate", learning_rate,
                   "--data-dir", data_dir, "--workdir", tmp_path)
    assert_clean_error(run, rf"the loss became {loss} in epoch 3; lower --learning-rate")
    assert (tmp_path / "checkpoint.msgpack").read_bytes() == good


def test_a_workdir_in_use_or_holding_a_run_is_refused_before_training(run_main, data_dir, trained,
                                                                      tmp_path):
    """One line each, the workdir's files untouched (test_processes.py runs them as processes)."""
    shutil.copytree(trained[0], tmp_path / "run")
    before = {name: (tmp_path / "run" / name).read_bytes() for name in os.listdir(tmp_path / "run")}
    run = run_main(train.main, "--epochs", 1, "--data-dir", data_dir, "--workdir", tmp_path / "run")
    assert_clean_error(run, r"--workdir .*run holds a run already, in checkpoint.msgpack; "
                            r"continue it with --resume, or pick another --workdir$")
    with outputs.claim_workdir(tmp_path / "run", resume=True):  # as another run would hold it
        run = run_main(train.main, "--resume", "--data-dir", data_dir, "--workdir",
                       tmp_path / "run")
    assert_clean_error(run, rf"--workdir .*run is in use by another run \(process {os.getpid()}\); "
                            rf"let it end, or pick another --workdir$")
    assert {name: (tmp_path / "run" / name).read_bytes() for name in before if name != ".lock"} == {
        name: data for name, data in before.items() if name != ".lock"}


def test_unwritable_workdir_fails_before_training(run_main, data_dir, tmp_path):
    (tmp_path / "file").write_text("")
    run = run_main(train.main, "--data-dir", data_dir, "--workdir", tmp_path / "file" / "w")
    assert_clean_error(run, r"--workdir .* is not writable")


@pytest.fixture
def small_disk(tmp_path):
    """A 10 MB file system (tmpfs, mounted as root): one checkpoint with its optimizer state fits
    (6.6 MB), a second beside it does not."""
    mount = tmp_path / "disk"
    mount.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", "size=10m", "tmpfs", mount]
    if os.geteuid() != 0 or subprocess.run(command, capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root (test_file_size_limit fills files "
                    "without it)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", mount])


def test_full_disk_stops_with_one_line_and_keeps_the_last_checkpoint(run_main, data_dir,
                                                                     small_disk):
    run = run_main(train.main, "--epochs", 3, "--data-dir", data_dir, "--workdir", small_disk)
    checkpoint = re.escape(str(small_disk / "checkpoint.msgpack"))
    assert_clean_error(run, rf"^error: cannot write {checkpoint}: No space left on device; last "
                            rf"checkpoint: {checkpoint} \(epoch 1\); free space, then continue "
                            rf"with --resume$")
    assert epoch_lines(run.stdout)[-1][:2] == ("test", 2)  # epoch 2 trained, its checkpoint not
    assert load_checkpoint(small_disk / "checkpoint.msgpack")[1] == 1
    assert sorted(os.listdir(small_disk)) == [".lock", "checkpoint.msgpack", "history.json",
                                              "metrics.png"]


def test_resume_with_other_settings_is_refused(run_main, data_dir, trained):
    run = run_main(train.main, "--resume", "--learning-rate", "0.1", "--data-dir", data_dir,
                   "--workdir", trained[0])
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

    _, args = train.parse_args(["--coordinator", f"127.0.0.1:{closed_port()}", "--num-processes",
                                "2", "--process-id", "1", "--peer-timeout", "1"])
    start = time.perf_counter()
    line = (r"^cannot reach the coordinator at 127.0.0.1:\d+ within 1 s \(.*\); start process 0 "
            r"there, or fix --coordinator$")
    with pytest.raises(distributed.StartError, match=line):
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


def test_the_compilation_cache_is_the_users_alone(no_compilation_cache, tmp_path, monkeypatch,
                                                  capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    xla.use_compilation_cache()
    folder = tmp_path / "mnist-jax-flax"
    assert jax.config.jax_compilation_cache_dir == str(folder)
    assert folder.stat().st_mode & 0o777 == 0o700
    jax.config.update("jax_compilation_cache_dir", None)
    folder.chmod(0o775)  # others could put code there
    xla.use_compilation_cache()
    assert jax.config.jax_compilation_cache_dir is None
    assert capsys.readouterr().err == (f"note: not using the compilation cache {folder}: others "
                                       f"can write to it\n")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "")  # README: the way to turn it off
    folder.chmod(0o700)
    xla.use_compilation_cache()
    assert jax.config.jax_compilation_cache_dir is None
