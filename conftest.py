"""What the tests share: synthetic data, a model trained once per test run, and ways to run the
scripts in this process or, where only a process shows the behaviour, as processes."""
import contextlib
import gzip
import io
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

import input_pipeline
import outputs
import train
from model import CNN

HERE = os.path.dirname(os.path.abspath(__file__))
MNIST_DATA_DIR = os.environ.get("MNIST_DATA_DIR")
EPOCH_LINE = re.compile(r"^(train|test) epoch: (\d+), loss: (\d+\.\d{5}), accuracy: (\d+\.\d\d)$",
                        re.M)


def write_idx(path, array, gz=True):
    """Writes a uint8 array as an IDX file (the standard magic number for its rank)."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    data = header + np.ascontiguousarray(array, np.uint8).tobytes()
    with open(str(path) + (".gz" if gz else ""), "wb") as f:
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


def load_checkpoint(path):
    """(state, epoch, config, history) of a checkpoint of train.py's model."""
    return outputs.load_checkpoint(str(path))


def epoch_lines(stdout):
    """[(split, epoch, loss, accuracy)] of the quick start's log lines."""
    return [(s, int(e), float(l), float(a)) for s, e, l, a in EPOCH_LINE.findall(stdout)]


def numpy_metrics(params, images, labels):
    """Reference (loss, accuracy %) in numpy from the model's logits."""
    logits = np.asarray(CNN().apply({"params": params}, images), np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    loss = -log_probs[np.arange(len(labels)), labels].mean()
    return loss, 100 * (logits.argmax(-1) == labels).mean()


def assert_clean_error(run, message):
    """The script failed with `message` in its last stderr line and no traceback."""
    assert run.returncode != 0
    assert "Traceback" not in run.stderr, run.stderr
    assert re.search(message, run.stderr.strip().splitlines()[-1]), run.stderr


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


def closed_port():
    """A port on 127.0.0.1 that nothing listens on: connections to it are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proxy_settings(port):
    """Environment that sends every HTTP and HTTPS request through a proxy on 127.0.0.1:port."""
    return {name: f"http://127.0.0.1:{port}"
            for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy")}


def fill_tfds_cache(tfds_data_dir, data_dir):
    """TFDS's download cache in tfds_data_dir, holding the synthetic files under MNIST's URLs."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.download import resource

    builder = tfds.builder("mnist")
    downloads = pathlib.Path(tfds_data_dir) / "downloads"
    downloads.mkdir(parents=True)
    for name in input_pipeline.ALL_FILES:
        url = builder.URL + name + ".gz"
        path = downloads / resource.get_dl_fname(url, builder.url_infos[url].checksum)
        path.write_bytes((pathlib.Path(data_dir) / (name + ".gz")).read_bytes())
        resource.get_info_path(path).write_text("{}")


def train_here(*argv):
    """train.train() in this process with train.py's flags; returns its stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        config, args = train.parse_args([str(a) for a in argv])
        train.train(config, args.workdir, args.resume, threading.Event())
    return out.getvalue()


@pytest.fixture
def run_main(capsys):
    """run_main(module.main, *argv): a script's main() in this process, as its command line would
    run it; returns a CompletedProcess with its exit status, stdout and stderr."""
    def run(main, *argv):
        handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            main([str(a) for a in argv])
            code = 0
        except SystemExit as e:
            code = e.code
        finally:
            for signum, handler in handlers.items():  # train.main installs its own
                signal.signal(signum, handler)
        out, err = capsys.readouterr()
        if isinstance(code, str):  # sys.exit(message): Python prints it and exits with 1
            err, code = err + code + "\n", 1
        return subprocess.CompletedProcess(argv, code or 0, out, err)
    return run


# --- processes: what only a process shows (signals, kills, full runs, several processes) ---

def start_script(script, *args, env=None, stderr=subprocess.PIPE):
    """Starts one of the scripts as a user would, with its output piped."""
    return subprocess.Popen([sys.executable, os.path.join(HERE, script), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=HERE,
                            env={**os.environ, **(env or {})})


def finish(processes, timeout=300):
    """The CompletedProcess of each started process; all are killed if one outlives timeout."""
    try:
        results = [p.communicate(timeout=timeout) for p in processes]
        return [subprocess.CompletedProcess(p.args, p.returncode, out, err)
                for p, (out, err) in zip(processes, results)]
    finally:
        for p in processes:
            p.kill()
            p.wait()


def run_script(script, *args, env=None):
    """Runs one of the scripts as a user would; returns the CompletedProcess."""
    return finish([start_script(script, *args, env=env)])[0]


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """This process and the scripts it starts share a JAX compilation cache in the run's temporary
    folder; scripts keep GPU memory they do not use free for the others."""
    settings = {"jax_compilation_cache_dir": str(tmp_path_factory.mktemp("jax_cache")),
                "jax_persistent_cache_min_compile_time_secs": 0,
                "jax_persistent_cache_min_entry_size_bytes": 0}
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
    """The synthetic data set's four files: 640 training and 203 test images."""
    return write_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def trained(data_dir, tmp_path_factory):
    """A workdir after 2 epochs on the synthetic data, trained in this process, and its log.

    The data comes from TFDS's download cache with every connection refused: cached files need
    no network (the process tests get the same log with --data-dir)."""
    workdir, tfds_dir = tmp_path_factory.mktemp("trained"), tmp_path_factory.mktemp("tfds")
    fill_tfds_cache(tfds_dir, data_dir)
    with pytest.MonkeyPatch.context() as patch:
        settings = {**proxy_settings(closed_port()), "TFDS_DATA_DIR": str(tfds_dir)}
        for name, value in settings.items():
            patch.setenv(name, value)
        stdout = train_here("--epochs", 2, "--workdir", workdir)
    return workdir, stdout


@pytest.fixture(scope="session")
def trained_state(trained):
    """The state of the `trained` checkpoint."""
    return load_checkpoint(trained[0] / "checkpoint.msgpack")[0]


@pytest.fixture(scope="session")
def real_trained(tmp_path_factory):
    """A workdir after 1 epoch on the real MNIST of MNIST_DATA_DIR, trained in this process."""
    if not MNIST_DATA_DIR:
        pytest.skip("set MNIST_DATA_DIR to the four MNIST files")
    workdir = tmp_path_factory.mktemp("real")
    return workdir, train_here("--epochs", 1, "--data-dir", MNIST_DATA_DIR, "--workdir", workdir)


@pytest.fixture(scope="session")
def exported(trained, trained_state, tmp_path_factory):
    """The `trained` checkpoint exported by export.py, in this process, as model.onnx and
    model.jax; (their paths, the checkpoint's state, export.py's stdout)."""
    import export

    folder, out = tmp_path_factory.mktemp("exported"), io.StringIO()
    with contextlib.redirect_stdout(out):
        export.main([str(folder / "model.onnx"), str(folder / "model.jax"), "--ckpt",
                     str(trained[0] / "checkpoint.msgpack")])
    return folder / "model.onnx", folder / "model.jax", trained_state, out.getvalue()


@pytest.fixture(scope="session")
def real_exported(real_trained):
    """The real MNIST checkpoint's state and its ONNX export's bytes (converting takes a while)."""
    import export

    state = load_checkpoint(real_trained[0] / "checkpoint.msgpack")[0]
    return state, export.to_onnx_bytes(state)
