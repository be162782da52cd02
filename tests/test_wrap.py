"""A user's ONNX model as the body (export.wrap): small random torch CNN and ViT exported here, hermetic."""

from __future__ import annotations

import csv
import json
import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from helpers import generated_images

from headstart.export.errors import IncompatibleError, ModelError, UsageError
from headstart.export.graph import read_metadata
from headstart.export.wrap import count_gflop, parse_outputs, wrap_onnx
from headstart.pipeline.cli import main

torch = pytest.importorskip("torch")
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


class CNN(torch.nn.Module):
    """Two convolutions to a (N, 16, S/2, S/2) map, its average, logits; `nhwc` takes NHWC input."""

    def __init__(self, nhwc: bool = False) -> None:
        super().__init__()
        self.nhwc = nhwc
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                            torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU())
        self.fc = torch.nn.Linear(16, 5)

    def forward(self, x):
        if self.nhwc:
            x = x.permute(0, 3, 1, 2)
        return self.fc(self.features(x).mean(dim=(2, 3)))


class ViT(torch.nn.Module):
    """Patch embedding, a class token, one encoder block, LayerNorm, a linear head on the class token."""

    def __init__(self, size: int = 32, patch: int = 8, dim: int = 32) -> None:
        super().__init__()
        self.embed = torch.nn.Conv2d(3, dim, patch, patch)
        self.cls_token = torch.nn.Parameter(torch.randn(1, 1, dim))
        self.pos = torch.nn.Parameter(torch.randn(1, (size // patch) ** 2 + 1, dim))
        self.block = torch.nn.TransformerEncoderLayer(dim, 4, 64, dropout=0.0, batch_first=True)
        self.norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, 10)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], 1) + self.pos
        return self.head(self.norm(self.block(t))[:, 0])


def export(model: torch.nn.Module, path, nhwc: bool = False, dynamic: bool = True, size: int = 32):
    x = torch.randn(2, size, size, 3) if nhwc else torch.randn(2, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice: onnxscript is not installed
        torch.onnx.export(model.eval(), (x,), str(path), dynamo=False, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None)
    return path


def tensor_of(path, op: str, index: int = -1) -> str:
    """The name of the `index`-th output of an `op` node: the exporter's own names."""
    return [n.output[0] for n in onnx.load(str(path)).graph.node if n.op_type == op][index]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("onnx")
    cnn, vit = CNN(), ViT()
    return {"root": root, "cnn": cnn, "vit": vit, "cnn_path": export(cnn, root / "cnn.onnx"),
            "vit_path": export(vit, root / "vit.onnx")}


def pixels(n: int = 5, size: int = 32, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def run(body: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(body.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {"images": x}), strict=True))


def close(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_a_cnns_map_its_average_and_outputs_equal_torch_on_the_same_pixels(models):
    conv = tensor_of(models["cnn_path"], "Relu")
    body = wrap_onnx(models["cnn_path"], preset="imagenet", image_size=32,
                     outputs=parse_outputs(f"map={conv},gap={conv}:gap,logits"))
    x = pixels()
    got = run(body, x)
    t = torch.from_numpy(((x / 255.0 - MEAN) / STD).astype(np.float32)).permute(0, 3, 1, 2)
    with torch.no_grad():
        fmap = models["cnn"].features(t)
        logits = models["cnn"](t)
    assert got["map"].shape == (5, 16, 16, 16) and got["gap"].shape == (5, 16)
    assert close(got["map"], fmap.numpy()) < 1e-4 and close(got["gap"], fmap.mean(dim=(2, 3)).numpy()) < 1e-4
    assert close(got["logits"], logits.numpy()) < 1e-4
    meta = {p.key.removeprefix("headstart."): p.value for p in body.metadata_props}
    assert json.loads(meta["shapes"]) == {"map": [16, 16, 16], "gap": [16], "logits": [5]}
    assert meta["layers"] == "map,gap,logits" and json.loads(meta["preprocessing"])["mean"] == [0.485, 0.456, 0.406]
    # the count of the model's own FLOPs: two convolutions and the linear layer, by hand
    want = 2 * (32 * 32 * 8 * 3 * 9 + 16 * 16 * 16 * 8 * 9 + 16 * 5) / 1e9
    assert meta["gflop"] and float(meta["gflop"]) == pytest.approx(want, rel=1e-4)


def test_a_vits_tokens_class_token_and_token_mean_equal_torch(models):
    tokens = tensor_of(models["vit_path"], "LayerNormalization")
    body = wrap_onnx(models["vit_path"], preset="clip",
                     outputs=parse_outputs(f"tokens={tokens},cls={tokens}:cls,avg={tokens}:mean"))
    x = pixels(3)
    got = run(body, x)
    clip_mean, clip_std = (np.array(v, np.float32) for v in ((0.48145466, 0.4578275, 0.40821073),
                                                              (0.26862954, 0.26130258, 0.27577711)))
    t = torch.from_numpy(((x / 255.0 - clip_mean) / clip_std).astype(np.float32)).permute(0, 3, 1, 2)
    seen = {}
    hook = models["vit"].norm.register_forward_hook(lambda m, i, o: seen.setdefault("tokens", o))
    with torch.no_grad():
        models["vit"](t)
    hook.remove()
    ref = seen["tokens"].numpy()
    assert got["tokens"].shape == (3, 17, 32)
    assert close(got["tokens"], ref) < 1e-4 and close(got["cls"], ref[:, 0]) < 1e-4
    assert close(got["avg"], ref.mean(1)) < 1e-4


@pytest.mark.parametrize(("channels", "scale"), [("bgr", 255), ("rgb", 1)])
def test_an_nhwc_model_gets_its_channel_order_and_pixel_range(models, channels, scale):
    torch.manual_seed(1)
    cnn = CNN(nhwc=True)
    path = export(cnn, models["root"] / f"nhwc-{channels}.onnx", nhwc=True)
    mean, std = (103.9, 116.8, 123.7), (57.4, 57.1, 58.4)
    mean, std = (mean, std) if scale == 255 else (tuple(m / 255 for m in mean), tuple(s / 255 for s in std))
    body = wrap_onnx(path, mean=mean, std=std, layout="nhwc", channels=channels, scale=scale, image_size=32)
    x = pixels(4)
    v = x[..., ::-1] if channels == "bgr" else x
    ref = (v * (scale / 255.0) - np.array(mean)) / np.array(std)
    with torch.no_grad():
        want = cnn(torch.from_numpy(ref.astype(np.float32))).numpy()
    assert close(run(body, x)["logits"], want) < 1e-4


def test_a_wrong_tensor_name_lists_candidates_and_a_bad_pool_says_why(models):
    with pytest.raises(UsageError, match=r"no tensor '/features/Relu'.*closest names .*/features/.*Relu.*headstart "
                                         r"info"):
        wrap_onnx(models["cnn_path"], outputs=parse_outputs("x=/features/Relu:gap"))
    with pytest.raises(UsageError, match=r"pool cls needs a token sequence"):
        wrap_onnx(models["cnn_path"], outputs=parse_outputs(f"x={tensor_of(models['cnn_path'], 'Relu')}:cls"))
    with pytest.raises(UsageError, match=r"name it NAME="):
        wrap_onnx(models["cnn_path"], outputs=parse_outputs(tensor_of(models["cnn_path"], "Relu")))
    with pytest.raises(UsageError, match="takes 32 px"):
        _fixed_size(models)
    out = CliRunner().invoke(main, ["export", "--onnx", str(models["cnn_path"]), "--layers", "x=nope",
                                    "-o", str(models["root"] / "bad.onnx")])
    assert out.exit_code == 1 and "no tensor 'nope'" in out.output and "Traceback" not in out.output
    assert not (models["root"] / "bad.onnx").exists()
    vgg_only = CliRunner().invoke(main, ["export", "--onnx", str(models["cnn_path"]), "--random-weights", "0",
                                         "-o", str(models["root"] / "bad.onnx")])
    assert vgg_only.exit_code == 2 and "--random-weights do not apply to --onnx" in vgg_only.output
    no_model = CliRunner().invoke(main, ["export", "--preset", "clip", "-o", str(models["root"] / "bad.onnx")])
    assert no_model.exit_code == 2 and "describe an --onnx model" in no_model.output


def _fixed_size(models):
    """A model whose input is fixed at 32 px, asked for 64."""
    path = models["root"] / "fixed.onnx"
    model = onnx.load(str(models["cnn_path"]))
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 32
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 32
    onnx.save(model, str(path))
    return wrap_onnx(path, image_size=64)


def test_a_model_with_its_batch_baked_in_is_refused(models, tmp_path):
    class Flat(torch.nn.Module):
        def forward(self, x):
            return x.reshape(2, -1)  # the batch as a constant: what an export without dynamic axes keeps

    path = export(Flat(), tmp_path / "flat.onnx", dynamic=False)
    with pytest.raises(ModelError, match="dynamic batch dimension"):
        wrap_onnx(path)


def test_info_lists_the_tensors_of_a_plain_onnx_model(models):
    out = CliRunner().invoke(main, ["info", str(models["vit_path"]), "--json", "-"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    tokens = tensor_of(models["vit_path"], "LayerNormalization")
    assert data["inputs"] == ["input (batch, 3, 32, 32) float"] and data["outputs"] == ["logits (batch, 10)"]
    assert any(t.startswith(f"{tokens} (") and t.endswith("17, 32) LayerNormalization") for t in data["tensors"])
    assert CliRunner().invoke(main, ["info", str(models["cnn_path"])]).output.count("Relu") >= 2


def test_external_data_is_embedded_and_over_2_gib_is_refused(models, tmp_path):
    model = onnx.load(str(models["cnn_path"]))
    onnx.save_model(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="ext.data",
                    size_threshold=0)
    assert (tmp_path / "ext.data").stat().st_size > 0
    x = pixels(2)
    embedded = wrap_onnx(tmp_path / "ext.onnx", preset="imagenet")
    plain = wrap_onnx(models["cnn_path"], preset="imagenet")
    assert np.array_equal(run(embedded, x)["logits"], run(plain, x)["logits"])
    sha = {p.key: p.value for p in embedded.metadata_props}["headstart.weights_sha256"]
    assert sha != {p.key: p.value for p in plain.metadata_props}["headstart.weights_sha256"]
    os.truncate(tmp_path / "ext.data", 2**31 + 1)  # sparse: nothing written, the size is what is checked
    with pytest.raises(ModelError, match=r"2\.0 GiB with its external data, over the 2 GiB"):
        wrap_onnx(tmp_path / "ext.onnx")


def test_the_flop_count_matches_vgg16s_own(tmp_path):
    from headstart.export import build_body
    from headstart.export.vgg import body_gflop
    from headstart.export.weights import random_weights

    assert count_gflop(build_body(random_weights(0), 64, ("gap",))) == pytest.approx(body_gflop(64), rel=1e-9)


def _cli(*args) -> str:
    out = CliRunner().invoke(main, [str(a) for a in args])
    assert out.exit_code == 0, out.output
    return out.output


def test_export_extract_train_bundle_predict_on_a_users_model(models, tmp_path):
    conv = tensor_of(models["cnn_path"], "Relu")
    generated_images(tmp_path / "d", 8, "train")
    generated_images(tmp_path / "d", 4, "valid", seed=1)
    body, cache = tmp_path / "body.onnx", tmp_path / "c.zarr"
    assert "cnn.onnx wrapped, 32px, layers gap,map" in _cli(
        "export", "--onnx", models["cnn_path"], "--image-size", 32, "--preset", "imagenet", "--layers",
        f"gap={conv}:gap,map={conv}", "-o", body)
    assert read_metadata(body)["kind"] == "body"
    _cli("extract", tmp_path / "d", "--body", body, "--cache", cache)
    _cli("train", "--cache", cache, "--layer", "gap", "--head", "logistic", "-o", tmp_path / "h.head")
    _cli("bundle", "--body", body, "--head-file", tmp_path / "h.head", "-o", tmp_path / "clf.onnx")
    _cli("predict", tmp_path / "d" / "valid", "--classifier", tmp_path / "clf.onnx", "-o", tmp_path / "p.csv")
    with open(tmp_path / "p.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    truth = ["a" if "/a/" in r["path"] or "/a." in r["path"] else "b" for r in rows]
    assert sum(r["label"] == t for r, t in zip(rows, truth, strict=True)) >= 7  # two colours, told apart
    # the cache's map is the flattened (C, H, W) tensor, as extract stores a VGG16 stage
    from headstart.pipeline.cache import FeatureCache

    assert FeatureCache(cache).xy("map")[0].shape == (16, 16 * 16 * 16)


def test_features_and_heads_of_two_bodies_never_mix(models, tmp_path):
    conv1, conv2 = tensor_of(models["cnn_path"], "Relu", 0), tensor_of(models["cnn_path"], "Relu", 1)
    a, b, c = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "c.onnx"
    _cli("export", "--onnx", models["cnn_path"], "--layers", f"gap={conv2}:gap", "-o", a)
    _cli("export", "--onnx", models["cnn_path"], "--layers", f"gap={conv1}:gap", "-o", b)  # same name, other tensor
    _cli("export", "--onnx", models["cnn_path"], "--layers", f"gap={conv2}:gap", "--preset", "inception", "-o", c)
    generated_images(tmp_path / "d", 4, "train")
    _cli("extract", tmp_path / "d", "--body", a, "--cache", tmp_path / "a.zarr")
    _cli("train", "--cache", tmp_path / "a.zarr", "--layer", "gap", "--head", "logistic", "-o", tmp_path / "a.head")
    for other in (b, c):
        out = CliRunner().invoke(main, ["extract", str(tmp_path / "d"), "--body", str(other), "--cache",
                                        str(tmp_path / "a.zarr")])
        assert out.exit_code == 1 and "another" in out.output, out.output
        from headstart.heads.bundle import bundle_files

        with pytest.raises(IncompatibleError, match="outputs" if other == b else "preprocessing"):
            bundle_files(other, tmp_path / "a.head")


def test_an_int8_wrapped_body_runs_and_keeps_its_features_apart(models, tmp_path):
    conv = tensor_of(models["cnn_path"], "Relu")
    generated_images(tmp_path / "photos", 4)
    body = tmp_path / "int8.onnx"
    _cli("export", "--onnx", models["cnn_path"], "--preset", "imagenet", "--layers", f"gap={conv}:gap",
         "--quantize", "int8", "--calibrate", tmp_path / "photos", "--calibrate-count", 8, "-o", body)
    meta = read_metadata(body)
    assert meta["dtype"] == "int8" and json.loads(meta["quantization"])["calibration"]["count"] == 8
    model = onnx.load(str(body))
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    f32 = wrap_onnx(models["cnn_path"], preset="imagenet", outputs=parse_outputs(f"gap={conv}:gap"))
    x = pixels(4)
    q, f = run(model, x)["gap"], run(f32, x)["gap"]
    cos = (q * f).sum(1) / (np.linalg.norm(q, axis=1) * np.linalg.norm(f, axis=1))
    assert q.shape == (4, 16) and cos.min() > 0.95


def test_a_dask_cluster_extracts_a_wrapped_body_as_one_process_does(models, tmp_path):
    from distributed import Client, LocalCluster

    from headstart.pipeline.cache import FeatureCache
    from headstart.pipeline.extract import extract

    conv = tensor_of(models["cnn_path"], "Relu")
    body = tmp_path / "b.onnx"
    _cli("export", "--onnx", models["cnn_path"], "--image-size", 32, "--layers", f"gap={conv}:gap,logits", "-o",
         body)
    generated_images(tmp_path / "d", 3)
    extract(tmp_path / "d", body, tmp_path / "one.zarr", progress=False)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        extract(tmp_path / "d", body, tmp_path / "dask.zarr", client=client, progress=False)
    for layer in ("gap", "logits"):
        one, dask = FeatureCache(tmp_path / "one.zarr").xy(layer)[0], FeatureCache(tmp_path / "dask.zarr").xy(layer)[0]
        assert np.array_equal(one, dask) and one.shape[1] == {"gap": 16, "logits": 5}[layer]


class Block(torch.nn.Module):
    """torchvision's ResNet BasicBlock."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(cout)
        self.conv2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(cout)
        self.down = None if stride == 1 and cin == cout else torch.nn.Sequential(
            torch.nn.Conv2d(cin, cout, 1, stride, bias=False), torch.nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class ResNet18(torch.nn.Module):
    """torchvision's resnet18 (random weights): the other architecture of docs/bodies.md's table."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 7, 2, 3, bias=False), torch.nn.BatchNorm2d(64),
                                        torch.nn.ReLU(), torch.nn.MaxPool2d(3, 2, 1))
        widths = [(64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)]
        self.layers = torch.nn.Sequential(*(torch.nn.Sequential(Block(a, b, s), Block(b, b, 1)) for a, b, s in widths))
        self.fc = torch.nn.Linear(512, 1000)

    def forward(self, x):
        return self.fc(self.layers(self.stem(x)).mean(dim=(2, 3)))


def test_a_resnet18s_last_map_pooled_equals_torch(tmp_path):
    torch.manual_seed(2)
    net = ResNet18().eval()
    path = export(net, tmp_path / "resnet18.onnx", size=64)
    last = tensor_of(path, "Relu")
    body = wrap_onnx(path, preset="imagenet", outputs=parse_outputs(f"gap={last}:gap"))
    x = pixels(2, 64)
    t = torch.from_numpy(((x / 255.0 - MEAN) / STD).astype(np.float32)).permute(0, 3, 1, 2)
    with torch.no_grad():
        ref = net.layers(net.stem(t)).mean(dim=(2, 3)).numpy()
    assert close(run(body, x)["gap"], ref) < 1e-4
