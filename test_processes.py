"""What only a process shows: the command line end to end, signals, kill -9, a file that cannot
grow, no network, simulated devices, several processes and Open MPI."""
import concurrent.futures
import gzip
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import (HERE, assert_clean_error, closed_port, epoch_lines, finish, load_checkpoint,
                      proxy_settings, run_script, start_script, write_dataset)


def read_until(process, text):
    """Reads the process's stdout up to the first line that holds text; fails if it ends first."""
    for line in process.stdout:
        if text in line:
            return
    pytest.fail(f"the process ended without printing {text!r}: {process.wait()}")


def test_cli_end_to_end_prints_the_log_of_the_in_process_run(data_dir, trained, tmp_path):
    """`python train.py` from --data-dir prints what train() printed in the test process from
    TFDS's cache, and writes every output."""
    run = run_script("train.py", "--epochs", 2, "--data-dir", data_dir, "--workdir", tmp_path)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    assert epoch_lines(run.stdout) == epoch_lines(trained[1]) and len(epoch_lines(run.stdout)) == 4
    assert re.search(r"^epoch 2 time: \d+\.\d\d s, \d+ images/s$", run.stdout, re.M)
    assert sorted(os.listdir(tmp_path)) == [".lock", "checkpoint.msgpack", "history.json",
                                            "metrics.png"]


def cpu_devices(count):
    """Environment for `count` simulated CPU devices, also where a GPU is the default backend."""
    return {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={count}"}


@pytest.fixture(scope="session")
def two_devices(data_dir, tmp_path_factory):
    """The workdir and CompletedProcess of `train.py --epochs 1` on two simulated CPU devices."""
    workdir = tmp_path_factory.mktemp("two_devices")
    run = run_script("train.py", "--epochs", 1, "--data-dir", data_dir, "--workdir", workdir,
                     env=cpu_devices(2))
    assert run.returncode == 0, run.stderr
    return workdir, run


def test_several_devices_give_the_metrics_of_one(trained, two_devices):
    """Batches split over two devices (four, over two processes: test_two_processes_print_...)."""
    one_device = json.loads((trained[0] / "history.json").read_text())[0]  # epoch 1 of the same run
    history = json.loads((two_devices[0] / "history.json").read_text())[0]
    # Float32 sums split over two devices round otherwise: the epoch's train loss agrees to 3e-7,
    # but 20 steps later the test loss, of steep descent, moves by up to 1.2e-4 (JAX 0.12.1 on one
    # device against two; 4e-5 on 0.10.2). A gradient that was not averaged moves it by far more.
    for key, rel in (("train_loss", 1e-5), ("train_accuracy", 1e-5), ("test_loss", 1e-3),
                     ("test_accuracy", 1e-3)):
        assert history[key] == pytest.approx(one_device[key], rel=rel), key


def test_batch_size_not_divisible_by_devices(data_dir, tmp_path):
    run = run_script("train.py", "--batch-size", 30, "--data-dir", data_dir, "--workdir", tmp_path,
                     env=cpu_devices(4))
    assert_clean_error(run, r"--batch-size 30 is not divisible by the 4 devices; pick a multiple "
                            r"of 4")


# --- no network, signals, kill -9, a file that cannot grow ---

@pytest.fixture
def answering_proxy():
    """answering_proxy(status): proxy settings for a server on 127.0.0.1 that answers every
    request with that HTTP status, standing for a network whose server fails."""
    import http.server

    servers = []

    def start(status):
        class Server(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self):
                self.send_error(status)

            do_GET = do_HEAD

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return proxy_settings(server.server_address[1])

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_failed_download_says_how_to_work_offline_at_once(tmp_path, answering_proxy):
    """Without network TFDS retries for minutes with a warning per try; train.py asks first.
    Three networks side by side: refused connections, a 503 (TFDS would retry it), and a 404
    (the server answers: TFDS tries, and fails)."""
    cases = {"refuses": (proxy_settings(closed_port()),
                         r"cannot download fashion_mnist: .*refused"),
             "503": (answering_proxy(503),
                     r"cannot download fashion_mnist: 503 Service Unavailable"),
             "404": (answering_proxy(404), r"download of fashion_mnist failed \(\w+\)")}
    start = time.perf_counter()
    runs = finish([start_script("train.py", "--dataset", "fashion_mnist", "--workdir",
                                tmp_path / name / "w",  # TFDS's own folder: plain http URLs
                                env={**proxy, "TFDS_DATA_DIR": str(tmp_path / name)})
                   for name, (proxy, _) in cases.items()], timeout=60)
    assert time.perf_counter() - start < 30
    for run, (_, message) in zip(runs, cases.values()):
        assert_clean_error(run, message + r"; without network, pass --data-dir DIR with the four "
                                          r"files")
        assert "WARNING" not in run.stderr and "Retrying" not in run.stderr, run.stderr


FILE_SIZE_LIMIT = """
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), no kill
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]),) * 2)
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


def test_file_size_limit(data_dir, trained, tmp_path):
    """Each script ends with one line when a file it writes cannot grow (RLIMIT_FSIZE, no root
    needed: a write fails as on a full disk or quota), and leaves no partial file behind."""
    cases = {
        "train": (["train.py", "--epochs", 1, "--data-dir", "{data}", "--workdir", "{tmp}"],
                  r"cannot write {tmp}/checkpoint.msgpack: File too large; no checkpoint was saved "
                  r"yet; free space, then run again$"),
        "export": (["export.py", "{tmp}/model.jax", "--ckpt", "{ckpt}"],
                   r"cannot write {tmp}/model.jax: File too large; free space or pick another "
                   r"folder$"),
        "infer": (["infer.py", "--ckpt", "{ckpt}", "--data-dir", "{data}", "--out",
                   "{tmp}/grid.png"],
                  r"cannot write {tmp}/grid.png: File too large; free space or pick another "
                  r"folder$")}
    processes = []
    for name, (args, _) in cases.items():
        (tmp_path / name).mkdir()
        fill = {"tmp": tmp_path / name, "data": data_dir, "ckpt": trained[0] / "checkpoint.msgpack"}
        command = [sys.executable, "-c", FILE_SIZE_LIMIT, "30000",
                   *(str(a).format(**fill) for a in args)]
        processes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True, cwd=HERE))
    for run, (name, (_, message)) in zip(finish(processes), cases.items()):
        assert_clean_error(run, "^error: " + message.format(tmp=re.escape(str(tmp_path / name))))
        assert os.listdir(tmp_path / name) == ([".lock"] if name == "train" else []), name


@pytest.fixture
def unwritable_after_epoch_1(tmp_path):
    """{case: (workdir, how it turns unwritable once epoch 1 is saved, or None: from the start)}:
    a file system remounted read-only, a folder without write permission, and a folder in the
    place of metrics.png (its write fails after the checkpoint's)."""
    mount, cases = tmp_path / "read-only", {}
    mount.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", "size=50m", "tmpfs", mount]
    if os.geteuid() != 0 or subprocess.run(command, capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    cases["read-only"] = (mount, lambda: subprocess.run(["mount", "-o", "remount,ro", mount],
                                                        check=True))
    cases["no permission"] = (tmp_path / "no permission",
                              lambda: cases["no permission"][0].chmod(0o555))
    cases["folder in place"] = (tmp_path / "folder in place", None)
    (tmp_path / "folder in place" / "metrics.png").mkdir(parents=True)
    try:
        yield cases
    finally:
        subprocess.run(["umount", "-l", mount])


def test_a_write_that_fails_for_another_cause_than_space_says_what_to_do(unwritable_after_epoch_1,
                                                                         tmp_path):
    """Read-only, no permission, a folder in the file's place: one line that names the cause,
    what to do about it, and the last checkpoint; not the full disk's advice."""
    data_dir = write_dataset(tmp_path / "data", num_train=3200)  # epoch 2 outlasts our wait
    # As root no permission is missing: in a user namespace of its own root is the owner alone.
    as_owner = ["unshare", "--user"] if os.geteuid() == 0 else []
    processes = {case: subprocess.Popen([*(as_owner if case == "no permission" else []),
                                         sys.executable, "train.py", "--epochs", "2", "--data-dir",
                                         data_dir, "--workdir", str(workdir)],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        cwd=HERE)
                 for case, (workdir, _) in unwritable_after_epoch_1.items()}
    try:
        for case, (workdir, make_unwritable) in unwritable_after_epoch_1.items():
            deadline = time.monotonic() + 120
            # Epoch 1 saved: its last file.
            while make_unwritable and not (workdir / "metrics.png").exists():
                if processes[case].poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"{case}: train.py ended or stalled before it saved epoch 1")
                time.sleep(0.005)
            if make_unwritable:
                make_unwritable()
    finally:
        runs = dict(zip(processes, finish(list(processes.values()), timeout=120)))
    remedies = {"read-only": ("checkpoint.msgpack", "Read-only file system",
                              "make {workdir} writable"),
                "no permission": ("checkpoint.msgpack", "Permission denied",
                                  "make {workdir} writable"),
                "folder in place": ("metrics.png", "Is a directory",
                                    "move what is at {workdir}/metrics.png out of the way")}
    for case, (workdir, _) in unwritable_after_epoch_1.items():
        file, cause, remedy = remedies[case]
        folder = re.escape(str(workdir))
        assert_clean_error(runs[case], rf"^error: cannot write {folder}/{file}: {cause}; last "
                                       rf"checkpoint: {folder}/checkpoint.msgpack \(epoch 1\); "
                                       rf"{remedy.format(workdir=folder)}, "
                                       rf"then continue with --resume$")
        assert "free space" not in runs[case].stderr
        assert load_checkpoint(workdir / "checkpoint.msgpack")[1] == 1


def test_damaged_files_end_in_one_line_within_seconds(data_dir, trained, tmp_path):
    """An image file whose header claims 2^31 images, a label file with a label past 9 and a PNG
    whose header chunk is cut short: one line that names the file, status 1, within 10 s."""
    for case in ("claims more", "label 10"):
        shutil.copytree(data_dir, tmp_path / case)
    images_file = tmp_path / "claims more" / "train-images-idx3-ubyte.gz"
    images = bytearray(gzip.decompress(images_file.read_bytes()))
    images[4:8] = (2 ** 31).to_bytes(4, "big")
    images_file.write_bytes(gzip.compress(bytes(images)))
    labels = bytearray(gzip.decompress(
        (tmp_path / "label 10" / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    labels[8 + 7] = 10
    (tmp_path / "label 10" / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(labels)))
    picture = tmp_path / "a.png"
    # 6 bytes of the IHDR chunk's 13 in PNG.
    picture.write_bytes(b"\x89PNG\r\n\x1a\n" + (6).to_bytes(4, "big") + b"IHDR" + bytes(6 + 4))
    cases = {"claims more": (["train.py", "--data-dir", tmp_path / "claims more", "--workdir",
                              tmp_path / "w1"],
                             r"train-images-idx3-ubyte.gz is damaged or cut short: its header "
                             r"gives the shape "
                             r"\(2147483648, 28, 28\), and the data that follows is shorter$"),
             "label 10": (["train.py", "--data-dir", tmp_path / "label 10", "--workdir",
                           tmp_path / "w2"],
                          r"t10k-labels-idx1-ubyte.gz is damaged: label 10 at index 7, where "
                          r"labels are 0 to 9$"),
             "cut IHDR": (["infer.py", "--ckpt", trained[0] / "checkpoint.msgpack", "--image",
                           picture],
                          r"a.png cannot be decoded \(Truncated IHDR chunk\); is it damaged or "
                          r"cut short\?$")}
    start = time.perf_counter()
    runs = finish([start_script(*args) for args, _ in cases.values()], timeout=60)
    assert time.perf_counter() - start < 10
    for run, (args, message) in zip(runs, cases.values()):
        assert run.returncode == 1
        assert_clean_error(run, r"^error: .*" + message)
        assert len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_interrupt_names_the_last_checkpoint(data_dir, tmp_path):
    """Ctrl-C (SIGINT) and SIGTERM, side by side."""
    signals = (signal.SIGINT, signal.SIGTERM)
    processes = [start_script("train.py", "--epochs", 1000, "--data-dir", data_dir, "--workdir",
                              tmp_path / sig.name)
                 for sig in signals]
    try:
        for process, sig in zip(processes, signals):
            read_until(process, "epoch 2 time")
            process.send_signal(sig)
    finally:
        runs = finish(processes, timeout=60)
    for run, sig in zip(runs, signals):
        epoch = load_checkpoint(tmp_path / sig.name / "checkpoint.msgpack")[1]
        assert_clean_error(run, rf"interrupted; last checkpoint: .*checkpoint.msgpack "
                                rf"\(epoch {epoch}\)")


def kill_repeatedly(data_dir, workdir, kills, seed):
    """Runs train.py --resume in workdir `kills` times, each SIGKILLed at a random moment after
    its first epoch line; returns the epoch of the checkpoint left after each kill. Each run goes
    on from the checkpoint the last kill left, as it was: the lock died with the killed process."""
    rng = np.random.default_rng(seed)
    path = workdir / "checkpoint.msgpack"
    epochs = []
    for _ in range(kills):
        before, done = path.read_bytes(), load_checkpoint(path)[1]
        process = start_script("train.py", "--resume", "--epochs", 100000, "--data-dir", data_dir,
                               "--workdir", workdir, stderr=subprocess.DEVNULL)
        try:
            first_line = process.stdout.readline()  # a run that could not take the workdir has none
            time.sleep(rng.uniform(0, 0.3))  # from the first line on, a checkpoint write is near
        finally:
            process.kill()
            process.wait()
        assert first_line.startswith(f"train epoch: {done + 1},"), first_line
        epochs.append(load_checkpoint(path)[1])
        assert epochs[-1] > done or path.read_bytes() == before  # a later epoch's, or as it was
    return epochs


def test_sigkill_at_random_moments_leaves_a_loadable_checkpoint(data_dir, trained, tmp_path):
    """4 kills: two workdirs side by side (two cores), 2 kills in a row in each, each followed by
    --resume."""
    workdirs = [tmp_path / "a", tmp_path / "b"]
    for workdir in workdirs:
        workdir.mkdir()
        shutil.copy(trained[0] / "checkpoint.msgpack", workdir)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        chains = list(pool.map(lambda seed: kill_repeatedly(data_dir, workdirs[seed], 2, seed),
                               (0, 1)))
    for epochs in chains:
        assert len(epochs) == 2 and epochs == sorted(epochs) and epochs[-1] > 2


# --- one workdir, one run ---

def holder(workdir, process, seconds=60):
    """Waits until `process` holds workdir (its pid in the lock file); fails if it ends first."""
    deadline = time.monotonic() + seconds
    lock = workdir / ".lock"
    while not (lock.exists() and lock.read_text().strip() == str(process.pid)):
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"train.py did not take {workdir}: {process.poll()}")
        time.sleep(0.01)


def test_one_workdir_one_run(data_dir, trained, tmp_path):
    """Side by side: a run that holds its workdir, and three runs that must leave others' runs as
    they are. On the busy workdir, a run with other settings ends within seconds, naming the
    holder, which goes on to its end with its own. On copies of a finished run of 2 epochs,
    without --resume: other settings, and the very same command. One line each."""
    data, busy = write_dataset(tmp_path / "data", num_train=3200), tmp_path / "busy"
    first = start_script("train.py", "--epochs", 5, "--data-dir", data, "--workdir", busy)
    cases = {"other settings": ["--epochs", 1, "--learning-rate", 0.05],
             "same command": ["--epochs", 2]}
    for case in cases:
        shutil.copytree(trained[0], tmp_path / case)
    before = {case: (tmp_path / case / "checkpoint.msgpack").read_bytes() for case in cases}
    others = []
    try:
        holder(busy, first)
        start = time.perf_counter()
        others = [start_script("train.py", *args, "--data-dir", data_dir, "--workdir",
                               tmp_path / case) for case, args in cases.items()]
        second = run_script("train.py", "--epochs", 5, "--learning-rate", 0.05, "--data-dir", data,
                            "--workdir", busy)
        seconds = time.perf_counter() - start
        assert first.poll() is None, "the first run ended before the second asked for the workdir"
    finally:
        first_run, *refused = finish([first, *others], timeout=120)
    assert seconds < 10
    assert_clean_error(second, rf"^error: --workdir {re.escape(str(busy))} is in use by another "
                               rf"run \(process {first.pid}\); let it end, or pick another "
                               rf"--workdir$")
    assert first_run.returncode == 0, first_run.stderr
    _, epoch, config, history = load_checkpoint(busy / "checkpoint.msgpack")
    assert (epoch, config.learning_rate, len(history)) == (5, 0.01, 5)
    for run, case in zip(refused, cases):
        assert_clean_error(run, rf"^error: --workdir {re.escape(str(tmp_path / case))} holds a run "
                                rf"already, in checkpoint.msgpack; continue it with --resume, or "
                                rf"pick another --workdir$")
        assert len(run.stderr.strip().splitlines()) == 1 and run.stdout == ""
        assert (tmp_path / case / "checkpoint.msgpack").read_bytes() == before[case]


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
    """The workdirs and CompletedProcesses of a 3-epoch run of two processes with two simulated
    CPU devices each: batches split over the devices of every process."""
    folder = tmp_path_factory.mktemp("two_processes")
    workdirs, cache = [folder / "process0", folder / "process1"], folder / "cache"
    runs = run_processes(workdirs, "--epochs", 3, "--data-dir", data_dir,
                         env={**cpu_devices(2), "JAX_COMPILATION_CACHE_DIR": str(cache)})
    return workdirs, runs, cache


def test_two_processes_print_the_log_of_one(trained, two_processes):
    """Also: no compilation cache in a run of several processes, even one the user names (JAX
    0.12.1 hangs where one process loads a program from it and another compiles it anew)."""
    workdirs, (process0, process1), cache = two_processes
    assert not cache.exists() or os.listdir(cache) == []
    assert_same_log(epoch_lines(process0.stdout)[:4], epoch_lines(trained[1]))
    assert [line[:2] for line in epoch_lines(process0.stdout)][4:] == [("train", 3), ("test", 3)]
    assert "epoch" not in process1.stdout
    assert sorted(os.listdir(workdirs[0])) == [".lock", "checkpoint.msgpack", "history.json",
                                               "metrics.png"]
    assert not workdirs[1].exists()


def test_resume_across_two_processes(data_dir, trained, two_processes, tmp_path):
    """From epoch 2 (process 0 reads the checkpoint and sends it to process 1) to epoch 3."""
    workdirs = [tmp_path / "0", tmp_path / "1"]
    workdirs[0].mkdir()
    shutil.copy(trained[0] / "checkpoint.msgpack", workdirs[0])
    process0, process1 = run_processes(workdirs, "--resume", "--epochs", 3, "--data-dir", data_dir,
                                       env=cpu_devices(2))
    assert_same_log(epoch_lines(process0.stdout), epoch_lines(two_processes[1][0].stdout)[4:])
    assert "epoch" not in process1.stdout and not workdirs[1].exists()


def test_killed_process_stops_the_other(data_dir, tmp_path):
    workdirs = [tmp_path / "0", tmp_path / "1"]
    processes = start_processes(workdirs, "--epochs", 1000, "--data-dir", data_dir)
    try:
        read_until(processes[0], "epoch 1 time")
        processes[1].kill()
        killed = time.perf_counter()
        processes[0].wait(timeout=30)
        seconds = time.perf_counter() - killed
    finally:
        survivor, _ = finish(processes)
    assert seconds < 10
    assert_clean_error(survivor, r"^error: process 0 lost another process \(.*\); once all are up "
                                 r"again, continue with --resume$")
    assert load_checkpoint(workdirs[0] / "checkpoint.msgpack")[1] >= 1


BUG_IN_A_DISTRIBUTED_RUN = """
import sys
import train
def evaluate(*args):
    raise ValueError("a bug in evaluate")
train.evaluate = evaluate
train.main(sys.argv[1:])
"""


def test_a_bug_in_a_distributed_run_shows_its_traceback(data_dir, tmp_path):
    """Not `lost another process`: the bug's traceback, and every process stops."""
    coordinator = f"127.0.0.1:{closed_port()}"
    flags = [["--coordinator", coordinator, "--num-processes", 2, "--process-id", i,
              "--peer-timeout", 20, "--epochs", 1, "--data-dir", data_dir, "--workdir",
              tmp_path / str(i)] for i in range(2)]
    processes = [subprocess.Popen([sys.executable, "-c", BUG_IN_A_DISTRIBUTED_RUN, *map(str, args)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  cwd=HERE, env={**os.environ, "JAX_PLATFORMS": "cpu"})
                 for args in flags]
    for run in finish(processes, timeout=120):
        assert run.returncode != 0
        assert "Traceback" in run.stderr, run.stderr
        assert "ValueError: a bug in evaluate" in run.stderr, run.stderr
        assert "lost another process" not in run.stderr


def test_two_processes_refuse_a_batch_size_not_divisible_by_both(data_dir, tmp_path):
    processes = start_processes([tmp_path / "0", tmp_path / "1"], "--batch-size", 33, "--data-dir",
                                data_dir)
    for run in finish(processes, timeout=120):
        assert_clean_error(run, r"--batch-size 33 is not divisible by the 2 devices; pick a "
                                r"multiple of 2")


def session_processes(session):
    """Pids of the live processes in a session (as `start_new_session` made it)."""
    pids = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command's name
        except OSError:  # ended while we looked
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


@pytest.mark.skipif(not shutil.which("mpirun"),
                    reason="Open MPI's mpirun is not on PATH (apt-get install openmpi-bin)")
def test_open_mpi_launch_prints_the_log_of_two_devices(data_dir, two_devices, tmp_path):
    """The README's `mpirun ... python train.py --distributed` with 2 ranks on this machine:
    jax.distributed finds the ranks itself; rank 0 alone prints and writes (each rank its own
    --workdir, as on two hosts); the log equals one process's with two simulated devices."""
    mpirun = ["mpirun", "--bind-to", "none", "-x", "JAX_PLATFORMS=cpu"]
    if os.geteuid() == 0:
        mpirun.append("--allow-run-as-root")
    ranks = [[sys.executable, os.path.join(HERE, "train.py"), "--distributed", "--epochs", "1",
              "--data-dir", data_dir, "--workdir", str(tmp_path / f"rank{rank}")]
             for rank in range(2)]
    command = mpirun + ["-np", "1", *ranks[0], ":", "-np", "1", *ranks[1]]
    launch = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=HERE, start_new_session=True,
                              env={**os.environ, "OMPI_MCA_rmaps_base_oversubscribe": "1"})
    try:
        out, err = launch.communicate(timeout=180)
    finally:
        if launch.poll() is None:
            launch.kill()
            launch.wait()
        ranks_left = session_processes(launch.pid)  # each rank is a process group of its own
        for pid in ranks_left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert launch.returncode == 0, err
    assert epoch_lines(out) == epoch_lines(two_devices[1].stdout) and len(epoch_lines(out)) == 2
    assert len(re.findall(r"^epoch \d time", out, re.M)) == 1  # rank 0's lines only
    assert sorted(os.listdir(tmp_path / "rank0")) == [".lock", "checkpoint.msgpack", "history.json",
                                                      "metrics.png"]
    assert not (tmp_path / "rank1").exists()
    assert ranks_left == []  # every rank ended with mpirun
