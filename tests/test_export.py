"""`fmnist export` and `OnnxClassifier`: the ONNX graph answers like the torch model on all 10,000 test images."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
from test_train import small

import fmnist
from fmnist import training
from fmnist.checkpoint import load_model
from fmnist.cli import main
from fmnist.errors import FmnistError, ImageError, ModelFileError
from fmnist.export import ONNX_CONV_CHUNK, ONNX_DENSE_CHUNK, OnnxClassifier, export_onnx, onnx_payload
from fmnist.predict import Classifier


@pytest.fixture(scope="module")
def real_arrays(real_data_source):
    return fmnist.load_data(real_data_source.path)


def trained(folder, preset: str, arrays, **overrides):
    """A briefly trained run (2,000 images, 1 epoch, calibrated on 200 held out): parity needs no good model."""
    config = small(preset, train_subset=2000, validation=200, test_subset=500, batch_size=64, **overrides)
    training.train(config, arrays=arrays, out_dir=folder)
    return folder


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory, real_arrays):
    return trained(tmp_path_factory.mktemp("export-mlp") / "run", "classic-sgd", real_arrays)


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory, real_arrays):
    return trained(tmp_path_factory.mktemp("export-cnn") / "run", "fast", real_arrays)


@pytest.fixture(scope="module")
def mlp_onnx(mlp_run, tmp_path_factory):
    """The MLP exported outside its run folder, so tests that rewrite RUN/model.onnx cannot disturb it."""
    return export_onnx(mlp_run, tmp_path_factory.mktemp("exported") / "model.onnx")


def assert_parity(run, x_test):
    torch_model = Classifier.load(run)
    onnx_model = OnnxClassifier.load(export_onnx(run))
    expected, got = torch_model.predict_proba(x_test), onnx_model.predict_proba(x_test)
    assert got.shape == (10_000, 10) and got.dtype == np.float32
    assert np.abs(got - expected).max() <= 1e-4
    np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))
    return torch_model, onnx_model


def test_mlp_parity_on_the_full_test_set(mlp_run, real_arrays):
    torch_model, onnx_model = assert_parity(mlp_run, real_arrays[1][0])
    assert torch_model.calibrated and torch_model.temperature != 1.0  # the temperature is inside the graph
    assert onnx_model.temperature == torch_model.temperature


def test_channels_last_batchnorm_convnet_parity_on_the_full_test_set(cnn_run, real_arrays):
    meta = json.loads((cnn_run / "model.json").read_text())
    assert meta["architecture"]["name"] == "convnet" and meta["channels_last"] is True
    x_test = real_arrays[1][0]
    torch_model, onnx_model = assert_parity(cnn_run, x_test)
    few = x_test[:200]
    for options in ({"tta": True}, {"calibrated": False}, {"tta": True, "calibrated": False}):
        assert np.abs(onnx_model.predict_proba(few, **options) - torch_model.predict_proba(few, **options)).max() \
            <= 1e-4, options
    assert np.abs(onnx_model.logits(few) - torch_model.logits(few)).max() <= 1e-3


def test_same_interface_as_classifier(mlp_run, mlp_onnx, real_arrays):
    images = real_arrays[1][0][:5]
    torch_model, onnx_model = Classifier.load(mlp_run), OnnxClassifier.load(mlp_onnx.parent)  # a folder works too
    assert onnx_model.classes == torch_model.classes and onnx_model.meta == torch_model.meta
    assert repr(onnx_model).startswith("OnnxClassifier(mlp, preset='classic-sgd', test_accuracy=")
    np.testing.assert_array_equal(onnx_model.predict(images), torch_model.predict(images))
    assert [[name for name, _ in row] for row in onnx_model.top_k(images, k=2)] == \
        [[name for name, _ in row] for row in torch_model.top_k(images, k=2)]
    answers, expected = onnx_model.answer(images, k=2), torch_model.answer(images, k=2)
    assert [a.keys() for a in answers] == [e.keys() for e in expected]
    assert [[t["class"] for t in a["top"]] for a in answers] == [[t["class"] for t in e["top"]] for e in expected]
    assert [(a["unsure"], a["unusual"]) for a in answers] == [(e["unsure"], e["unusual"]) for e in expected]
    np.testing.assert_allclose(onnx_model.predict_proba(images / 255.0), torch_model.predict_proba(images), atol=1e-5)
    np.testing.assert_allclose(onnx_model.predict_proba(images[0]), torch_model.predict_proba(images[:1]), atol=1e-5)
    assert onnx_model.predict_proba(images[:0]).shape == (0, 10)


def test_metadata_and_graph_contract(mlp_onnx, mlp_run):
    model = onnx.load(str(mlp_onnx))
    onnx.checker.check_model(model)
    props = {entry.key: entry.value for entry in model.metadata_props}
    meta = json.loads((mlp_run / "model.json").read_text())
    calibration = meta["calibration"]
    assert json.loads(props["classes"]) == meta["classes"]
    assert props["preset"] == "classic-sgd" and json.loads(props["architecture"])["name"] == "mlp"
    assert float(props["test_accuracy"]) == meta["metrics"]["test_accuracy"]
    assert float(props["temperature"]) == calibration["temperature"]
    assert float(props["unusual_logit_threshold"]) == calibration["unusual_logit_threshold"]
    assert props["fmnist_version"] == fmnist.__version__ and "uint8" in props["preprocessing"]
    (image,) = model.graph.input
    assert image.name == "images" and image.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim] == ["batch", 28, 28]
    assert [output.name for output in model.graph.output] == ["probabilities", "logits"]


@pytest.mark.parametrize("batch", [1, 37])
def test_dynamic_batch_with_plain_onnxruntime(mlp_onnx, mlp_run, real_arrays, batch):
    images = real_arrays[1][0][:batch]
    session = onnxruntime.InferenceSession(str(mlp_onnx), providers=["CPUExecutionProvider"])
    probabilities, logits = session.run(None, {"images": images})
    assert probabilities.shape == logits.shape == (batch, 10)
    np.testing.assert_allclose(probabilities, Classifier.load(mlp_run).predict_proba(images), atol=1e-5)
    assert OnnxClassifier.load(mlp_onnx, threads=1).predict_proba(images, batch_size=16).shape == (batch, 10)


def test_cli_export_writes_the_file_and_says_where(mlp_run, tmp_path, capsys):
    out = tmp_path / "deep" / "exported.onnx"
    assert main(["export", str(mlp_run), "--format", "onnx", "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert OnnxClassifier.load(out).classes[0] == "T-shirt/top"
    assert not list(out.parent.glob(".*.tmp"))


def test_cli_export_defaults_to_the_run_folder(mlp_run, capsys):
    (mlp_run / "model.onnx").unlink(missing_ok=True)
    assert main(["export", str(mlp_run)]) == 0
    assert f"wrote {mlp_run / 'model.onnx'}" in capsys.readouterr().out
    assert (mlp_run / "model.onnx").is_file()


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_not_a_run_folder_is_exit_2(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nothing")]) == 2
    assert "no such run folder" in one_line_error(capsys)


def test_unknown_format_is_a_usage_error(mlp_run, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["export", str(mlp_run), "--format", "tflite"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'tflite'" in err and "Traceback" not in err


def test_bad_images_and_bad_files_are_refused(mlp_onnx, tmp_path):
    classifier = OnnxClassifier.load(mlp_onnx)
    with pytest.raises(ImageError, match="shape"):
        classifier.predict_proba(np.zeros((2, 32, 32), np.uint8))
    with pytest.raises(ImageError, match="0..1"):
        classifier.predict_proba(np.full((1, 28, 28), 3.0))
    with pytest.raises(ModelFileError, match="fmnist export"):
        OnnxClassifier.load(tmp_path)  # a folder without model.onnx
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelFileError, match="not a loadable ONNX model"):
        OnnxClassifier.load(tmp_path / "junk.onnx")
    model = onnx.load(str(mlp_onnx))
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "foreign.onnx"))
    with pytest.raises(ModelFileError, match="not one exported by fmnist"):
        OnnxClassifier.load(tmp_path / "foreign.onnx")


def test_failed_write_leaves_the_old_file_and_no_temporary(mlp_run, monkeypatch):
    target = mlp_run / "model.onnx"
    target.write_bytes(b"previous export")

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", broken_fsync)
    with pytest.raises(OSError, match="No space left"):
        export_onnx(mlp_run)
    assert target.read_bytes() == b"previous export"
    assert not list(mlp_run.glob(".*.tmp"))
    target.unlink()
    with pytest.raises(OSError):
        export_onnx(mlp_run)
    assert not target.exists() and not list(mlp_run.glob(".*.tmp"))


@pytest.mark.parametrize("missing", ["onnx", "onnxscript", "onnxruntime"])
def test_missing_packages_say_how_to_install(missing, mlp_run, mlp_onnx, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, missing, None)  # makes `import missing` raise ImportError
    assert main(["export", str(mlp_run), "--out", str(mlp_run / "other.onnx")]) == 2
    assert "pip install 'fmnist[onnx]'" in one_line_error(capsys)
    assert not (mlp_run / "other.onnx").exists()
    if missing == "onnxruntime":
        with pytest.raises(FmnistError, match=r"fmnist\[onnx\]"):
            OnnxClassifier.load(mlp_onnx)


class CountingSession:
    """An onnxruntime session that records how many images each call got."""

    def __init__(self, session):
        self.session, self.sizes = session, []

    def run(self, outputs, feeds):
        self.sizes.append(len(next(iter(feeds.values()))))
        return self.session.run(outputs, feeds)


@pytest.mark.parametrize(("run_name", "chunk"), [("mlp_run", ONNX_DENSE_CHUNK), ("cnn_run", ONNX_CONV_CHUNK)])
def test_default_chunks_are_chosen_per_network(run_name, chunk, request, real_arrays):
    """Conv nets get small chunks, dense nets larger ones (benchmarks/inference_chunks.py); a caller may override."""
    model, meta = load_model(request.getfixturevalue(run_name))
    classifier = OnnxClassifier.from_bytes(onnx_payload(model, meta))  # in memory: no file written
    counting = classifier.session = CountingSession(classifier.session)
    x_test = real_arrays[1][0][:1100]
    probabilities = classifier.predict_proba(x_test)
    assert counting.sizes == [chunk] * (1100 // chunk) + [1100 % chunk]
    counting.sizes.clear()
    np.testing.assert_allclose(classifier.predict_proba(x_test, batch_size=1000), probabilities, atol=1e-6)
    assert counting.sizes == [1000, 100]
