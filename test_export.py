"""export.py: its ONNX and jax.export files, checked by runtimes that are not ours."""
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import export
import infer
import input_pipeline
from conftest import HERE, MNIST_DATA_DIR, assert_clean_error, broken_checkpoint


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


def test_export_says_what_it_wrote(exported):
    *_, stdout = exported
    assert re.search(r"^wrote .*model.onnx: epoch 2 of .*, 3\.\d MB, \d+\.\d s$", stdout,
                     re.M), stdout
    assert re.search(rf"^wrote .*model.jax: epoch 2 of .*, 3\.\d MB, \d+\.\d s, JAX "
                     rf"{re.escape(jax.__version__)}; loads in JAX 0.10.2 and newer$", stdout,
                     re.M), stdout


def test_onnxruntime_predicts_like_infer(data_dir, exported):
    onnx_path, _, state, _ = exported
    images = input_pipeline.load_dataset("mnist", data_dir)["test"][0]
    for batch in (images[:1], images):  # one batch size in the file, any at run time
        assert_same_predictions(onnx_probabilities(onnx_path, batch),
                                np.asarray(infer.predict(state, batch)))


# A fresh process that imports jax and numpy only: the exported function with batch 1 and 1000.
LOAD_JAX_EXPORT = """
import sys
import jax
import numpy as np
with open(sys.argv[1], "rb") as f:
    classify = jax.export.deserialize(bytearray(f.read()))
images = np.load(sys.argv[2])
one, many = np.asarray(classify.call(images[:1])), np.asarray(classify.call(images))
np.save(sys.argv[3], np.concatenate([one, many]))
ours = {"flax", "optax", "train", "model", "infer", "input_pipeline", "outputs", "export"}
print(sorted({name.split(".")[0] for name in sys.modules} & ours))
"""


def test_jax_export_runs_with_jax_alone(data_dir, exported, tmp_path):
    _, jax_path, state, _ = exported
    images = np.random.default_rng(0).integers(0, 256, (1000, 28, 28, 1), np.uint8)
    images[:203] = input_pipeline.load_dataset("mnist", data_dir)["test"][0]
    np.save(tmp_path / "images.npy", images)
    run = subprocess.run([sys.executable, "-c", LOAD_JAX_EXPORT, jax_path, tmp_path / "images.npy",
                          tmp_path / "out.npy"], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"  # imported none of flax, optax and our modules
    out = np.load(tmp_path / "out.npy")
    expected = np.asarray(infer.predict(state, images))
    assert_same_predictions(out[:1], expected[:1])  # batch 1
    assert_same_predictions(out[1:], expected)  # batch 1000


def test_model_jax_is_written_in_the_stablehlo_of_the_oldest_jax(exported):
    """JAX writes the StableHLO of about a month before its release: JAX 0.12's, 1.18, which JAX
    0.10.2 (1.17) cannot read. The file's portable artifact names its version."""
    data = exported[1].read_bytes()
    versions = {tuple(map(int, v.split(b".")))
                for v in re.findall(rb"StableHLO_v(\d+\.\d+\.\d+)", data)}
    assert versions and max(versions) <= (1, 17, 0), versions


@pytest.mark.skipif(not os.environ.get("OTHER_JAX_PYTHON"),
                    reason="set OTHER_JAX_PYTHON to a Python with another JAX release (.ci/run "
                    "does: each of its two venvs names the other)")
def test_model_jax_loads_in_another_jax_release(data_dir, exported, tmp_path):
    """A file written by this JAX, loaded by the README's snippet under the other release."""
    _, jax_path, state, _ = exported
    (tmp_path / "model.jax").write_bytes(jax_path.read_bytes())
    images = input_pipeline.load_dataset("mnist", data_dir)["test"][0][:40]
    np.save(tmp_path / "digits.npy", images)
    other = os.environ["OTHER_JAX_PYTHON"]
    snippet = "import jax; print(jax.__version__)\n" + readme_snippet("model.jax")
    run = subprocess.run([other, "-c", snippet], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert run.returncode == 0 and run.stderr.replace("\n", "") == "", run.stderr
    version, printed = run.stdout.split("\n", 1)
    assert version != jax.__version__, "OTHER_JAX_PYTHON runs this JAX release"
    assert [int(c) for c in re.sub(r"[\[\]\s]+", " ", printed).split()] == \
        np.asarray(infer.predict(state, images)).argmax(-1).tolist()


def readme_snippet(loads):
    """The README's Python block that loads the file named `loads`."""
    blocks = re.findall(r"```python\n(.*?)```", pathlib.Path(HERE, "README.md").read_text(), re.S)
    return next(block for block in blocks if loads in block)


@pytest.mark.parametrize("loads", ["model.onnx", "model.jax"])
def test_readme_snippets_classify_a_batch(data_dir, exported, tmp_path, monkeypatch, capsys, loads):
    onnx_path, jax_path, state, _ = exported
    (tmp_path / loads).write_bytes((onnx_path if loads.endswith("onnx") else jax_path).read_bytes())
    images = input_pipeline.load_dataset("mnist", data_dir)["test"][0][:40]
    np.save(tmp_path / "digits.npy", images)
    monkeypatch.chdir(tmp_path)
    exec(readme_snippet(loads), {})
    printed = [int(c) for c in re.sub(r"[\[\]\s]+", " ", capsys.readouterr().out).split()]
    assert printed == np.asarray(infer.predict(state, images)).argmax(-1).tolist()


@pytest.mark.parametrize("out, ckpt, message", [
    ("model.pb", "good",
     r"model.pb: unknown export format .pb; name the file \*.onnx \(ONNX\) or \*.jax"),
    ("missing/model.onnx", "good",
     r"cannot write into .*missing \(No such file or directory\); pick an existing"),
    ("model.onnx", "missing",
     r"cannot read checkpoint .*nothing.msgpack: No such file or directory"),
    ("model.jax", "truncated", r"is not a checkpoint of train.py, or it is truncated"),
    ("model.jax", "mismatched", r"does not fit this model \(other parameter shapes\)"),
])
def test_export_bad_input(run_main, trained, tmp_path, out, ckpt, message):
    checkpoint = trained[0] / "checkpoint.msgpack" if ckpt == "good" else \
        broken_checkpoint(tmp_path / "nothing.msgpack", trained[0], ckpt)
    before = set(os.listdir(tmp_path))
    assert_clean_error(run_main(export.main, tmp_path / out, "--ckpt", checkpoint), message)
    assert set(os.listdir(tmp_path)) == before  # no partial file


def test_real_mnist_exports_predict_like_infer(real_exported, tmp_path):
    """All 10,000 real test images: onnxruntime and the deserialized jax.export against infer.py."""
    state, onnx_bytes = real_exported
    images = input_pipeline.load_dataset("mnist", MNIST_DATA_DIR, ["test"])["test"][0]
    expected = np.asarray(infer.predict(state, images))
    onnx_path, jax_path = tmp_path / "model.onnx", tmp_path / "model.jax"
    onnx_path.write_bytes(onnx_bytes)
    jax_path.write_bytes(export.to_jax_bytes(state))
    from_onnx = onnx_probabilities(onnx_path, images)
    from_jax = np.asarray(jax.export.deserialize(bytearray(jax_path.read_bytes())).call(images))
    for name, probabilities in (("onnx", from_onnx), ("jax", from_jax)):
        difference = np.abs(probabilities - expected).max()
        print(f"{name}: largest probability difference {difference:.3g}")
        assert_same_predictions(probabilities, expected)
