"""Benchmarks: the measured numbers behind docs/benchmarks.md. Each returns rows for a table and JSON.

A little past 400 lines: one short function per `headstart bench` command, kept together so the measured commands
of the docs have one place.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from headstart.export.errors import UsageError


def machine() -> str:
    from headstart.export.cpu import cpu_model

    return f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def rate(fn: Callable[[], object], items: int, seconds: float = 10.0, min_runs: int = 2) -> float:
    """Items per second of `fn` (which handles `items` per call), after one warm-up call."""
    fn()
    runs, t0 = 0, time.perf_counter()
    while runs < min_runs or time.perf_counter() - t0 < seconds:
        fn()
        runs += 1
    return runs * items / (time.perf_counter() - t0)


def table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table."""
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in columns) + " |")
    return "\n".join(out)


def random_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def cpu_features() -> str:
    """The instruction sets that decide int8 and float32 speed on x86 CPUs, as /proc/cpuinfo lists them."""
    from headstart.export.cpu import describe

    return describe()


def bench_body(image_size: int = 224, batches: tuple[int, ...] = (1, 16), seconds: float = 10.0,
               calibrate: str | Path | None = None, calibrate_count: int = 32) -> list[dict]:
    """The body on the CPU, images/s per batch size: float32 and int8 in onnxruntime, and torch eager on the
    same weights where torch is installed, measured in turns in one run.

    int8 is calibrated on `calibrate` photos when given, else on random pixels (speed does not depend on it).
    """
    import onnxruntime as ort

    from headstart.export import build_body, load_weights
    from headstart.export.quantize import quantize_int8
    from headstart.export.runtime import open_session

    from .reader import sample_images

    weights = load_weights()
    model = build_body(weights, image_size, ("gap", "pool5"))
    if calibrate:
        images, hashes = sample_images(calibrate, calibrate_count, image_size)
    else:
        images, hashes = random_images(calibrate_count, image_size, seed=1), ["random pixels"]
    sessions = {"float32": open_session(model.SerializeToString(), "cpu", quiet=True),
                "int8": open_session(quantize_int8(model, images, hashes).SerializeToString(), "cpu", quiet=True)}
    torch_model, versions = None, f"onnxruntime {ort.__version__}"
    try:
        import torch

        from headstart.export.reference import TorchVGG16

        torch_model, versions = TorchVGG16(weights, threads=os.cpu_count()), versions + f", torch {torch.__version__}"
    except ImportError:
        pass
    rows = []
    for bs in batches:
        x = random_images(bs, image_size)
        row = {"image_size": image_size, "batch": bs}
        for name, session in sessions.items():
            row[f"{name}_img_s"] = rate(lambda x=x, s=session: s.run(["gap", "pool5"], {"images": x}), bs, seconds)
        row["int8_speedup"] = row["int8_img_s"] / row["float32_img_s"]
        if torch_model is not None:
            row["torch_eager_img_s"] = rate(lambda x=x: torch_model(x), bs, seconds)
        rows.append(row | {"versions": versions, "cpu": cpu_features()})
    return rows


def bench_wrapped(body: str | Path, source: str | Path | None = None, batches: tuple[int, ...] = (1, 16),
                  seconds: float = 10.0, turns: int = 3) -> list[dict]:
    """A body from `export --onnx` on the CPU, images/s per batch size, with the model's own GFLOP per image; with
    `source`, the model it wraps beside it, bare (float input already preprocessed, the same tensors out, no
    pooling), the two timed in alternating turns (median of `turns`): the cost of the wrapping."""
    import json
    import statistics

    import onnx
    import onnxruntime as ort

    from headstart.export.errors import UsageError
    from headstart.export.graph import read_metadata
    from headstart.export.runtime import open_session
    from headstart.export.wrap import load_source, parse_outputs, source_sha256

    meta = read_metadata(body)
    if meta.get("kind") != "body" or "outputs" not in meta:
        raise UsageError(f"{body}: not a body made by `headstart export --onnx`")
    size, pre = int(meta["image_size"]), json.loads(meta["preprocessing"])
    sessions = {"wrapped": (open_session(body, "cpu", quiet=True), "images", lambda x: x)}
    if source is not None:
        source = Path(source)
        model, files = load_source(source)
        if source_sha256(source, files) != meta["weights_sha256"]:
            raise UsageError(f"{source} is not the model {body} wraps (sha256 differs)")
        model = onnx.load(str(source))
        tensors = list(dict.fromkeys(o.tensor for o in parse_outputs(",".join(json.loads(meta["outputs"]).values()))))
        del model.graph.output[:]
        model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in tensors)
        name = next(i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer})
        scale = float(pre["scale"].split("/")[0]) / 255.0
        mean, std = np.array(pre["mean"], np.float32), np.array(pre["std"], np.float32)

        def prepare(x: np.ndarray) -> np.ndarray:
            v = (x[..., ::-1] if pre["channels"] == "bgr" else x) * scale
            v = ((v - mean) / std).astype(np.float32)
            return np.ascontiguousarray(v.transpose(0, 3, 1, 2) if pre["layout"] == "NCHW" else v)

        sessions["bare"] = (open_session(model.SerializeToString(), "cpu", quiet=True), name, prepare)
    rows = []
    for bs in batches:
        x = random_images(bs, size)
        feeds = {k: (s, {n: f(x)}) for k, (s, n, f) in sessions.items()}
        speeds = {k: [] for k in feeds}
        for _ in range(turns):
            for k, (s, feed) in feeds.items():
                speeds[k].append(rate(lambda s=s, feed=feed: s.run(None, feed), bs, seconds))
        row = {"image_size": size, "batch": bs, "gflop": float(meta.get("gflop", "nan"))}
        row |= {f"{k}_img_s": statistics.median(v) for k, v in speeds.items()}
        if "bare" in speeds:
            row["ratio"] = row["wrapped_img_s"] / row["bare_img_s"]
        rows.append(row | {"versions": f"onnxruntime {ort.__version__}", "cpu": cpu_features()})
    return rows


def bench_int8(data: str | Path, image_size: int = 224, calibrate_count: int = 32, unseen: int = 24,
               batch: int = 16, seconds: float = 6.0, turns: int = 3, weights=None) -> list[dict]:
    """int8 bodies with 8-bit and with 7-bit weights against float32: `gap` cosine to float32 on photos of
    `data`'s valid split never used to calibrate (the train split calibrates), and images/s at `batch`, the
    variants timed in alternating turns (median of `turns`). `weights`: the ImageNet ones unless given."""
    import statistics

    from headstart.export import build_body, load_weights
    from headstart.export.quantize import WEIGHT_BITS, quantize_int8
    from headstart.export.runtime import open_session

    from .reader import sample_images

    model = build_body(weights or load_weights(), image_size, ("gap",))
    calib, hashes = sample_images(Path(data) / "train", calibrate_count, image_size)
    photos, _ = sample_images(Path(data) / "valid", unseen, image_size)
    models = {"float32": model} | {f"int8, {b}-bit weights": quantize_int8(model, calib, hashes, weight_bits=b)
                                   for b in sorted(WEIGHT_BITS)}
    sessions = {name: open_session(m.SerializeToString(), "cpu", quiet=True) for name, m in models.items()}
    ref = sessions["float32"].run(["gap"], {"images": photos})[0]
    x, speeds = random_images(batch, image_size), {name: [] for name in sessions}
    for _ in range(turns):
        for name, session in sessions.items():
            speeds[name].append(rate(lambda s=session: s.run(["gap"], {"images": x}), batch, seconds))
    rows = []
    for name, session in sessions.items():
        f = session.run(["gap"], {"images": photos})[0]
        cos = (f * ref).sum(1) / np.maximum(np.linalg.norm(f, axis=1) * np.linalg.norm(ref, axis=1), 1e-30)
        rows.append({"body": name, "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
                     "img_s": statistics.median(speeds[name]), "unseen": len(photos), "batch": batch,
                     "cpu": cpu_features()})
    for row in rows:
        row["speedup"] = row["img_s"] / rows[0]["img_s"]
    return rows


def bench_extract(data: str | Path, model: str | Path, cache: str | Path, batch_size: int = 32, jobs: int = 2,
                  bare_images: int = 256, seconds: float = 20.0) -> list[dict]:
    """End-to-end extract (scan, hash, decode, infer, write) beside the bare model on pre-decoded arrays."""
    from headstart.export.graph import read_metadata
    from headstart.export.runtime import open_session

    from .dataset import scan
    from .decode import read_and_decode
    from .extract import extract

    meta = read_metadata(model)
    size, layers = int(meta["image_size"]), meta["layers"].split(",")
    x = np.stack([read_and_decode(p, size) for p in scan(data).paths[:bare_images]])
    session = open_session(model, "auto", quiet=True)

    def bare() -> float:
        return rate(lambda: [session.run(layers, {"images": x[i:i + batch_size]})
                             for i in range(0, len(x), batch_size)], len(x), seconds, min_runs=1)

    # The bare model is timed before and after the extract and averaged: shared CPUs drift over minutes.
    before = bare()
    report = extract(data, model, cache, batch_size=batch_size, jobs=jobs, progress=False)
    if report.computed == 0:
        raise UsageError(f"{cache} already held every image: pass a new --cache so that extract does the work")
    after = bare()
    end_to_end = report.computed / report.seconds
    mean = (before + after) / 2
    return [{"images": report.computed, "image_size": size, "batch": batch_size, "end_to_end_img_s": end_to_end,
             "bare_model_img_s": mean, "bare_before": before, "bare_after": after, "ratio": end_to_end / mean,
             "seconds": report.seconds, "fsync_seconds": report.flush_seconds,
             "fsync_share": report.flush_seconds / report.seconds}]


def bench_epochs(n_images: int = 256, image_size: int = 224, layer: str = "gap", data: str | Path | None = None,
                 batch_size: int = 32, classes: int = 2, extrapolate: int = 25_000) -> list[dict]:
    """Seconds per training epoch of a replacement head, three ways, all measured on this machine:

    cached    the head trained on features the body produced once (headstart);
    frozen    the Keras way: every image decoded and pushed through the frozen body again, then the head;
    full      fine-tuning the whole network, estimated as forward + backward (about twice the forward).

    With torch installed, also block 5 fine-tuned: last 1 or 3 convolutions trained on cached pool4
    (headstart tune), beside the Keras way of fine-tuning block 5 (blocks 1-4 forward, then block 5 trained).
    """
    from headstart.export import build_body, layer_shape, load_weights
    from headstart.export.runtime import open_session
    from headstart.export.vgg import body_gflop
    from headstart.heads.models import SoftmaxHead

    from .dataset import scan
    from .decode import read_and_decode

    session = open_session(build_body(load_weights(), image_size, (layer,)).SerializeToString(), "auto")
    dim = int(np.prod(layer_shape(layer, image_size)))
    if data is not None:
        paths = (scan(data).paths * n_images)[:n_images]

        def pixels(i: int) -> np.ndarray:
            return np.stack([read_and_decode(p, image_size) for p in paths[i:i + batch_size]])
    else:
        synthetic = random_images(batch_size, image_size)

        def pixels(i: int) -> np.ndarray:
            return synthetic[: min(batch_size, n_images - i)]

    t0 = time.perf_counter()
    feats = [session.run([layer], {"images": pixels(i)})[0].reshape(-1, dim) for i in range(0, n_images, batch_size)]
    forward = time.perf_counter() - t0
    X = np.concatenate(feats).astype(np.float16)
    y = np.random.default_rng(0).integers(0, classes, len(X))
    y[:classes] = np.arange(classes)
    head = SoftmaxHead(epochs=1, batch_size=batch_size, min_steps=0)
    t0 = time.perf_counter()
    head.fit(X, y)
    head_epoch = (time.perf_counter() - t0)
    head_gflop = 3 * 2 * dim * classes / 1e9  # forward + backward of Dense(classes)
    body = body_gflop(image_size)
    ways = [("cached features (headstart)", head_epoch, head_gflop),
            ("frozen body, Keras way", forward + head_epoch, body + head_gflop),
            ("full fine-tuning (estimated 3x forward)", 3 * forward + head_epoch, 3 * body + head_gflop)]
    rows = []
    for name, seconds, gflop in ways:
        rows.append({"epoch": name, "images": n_images, "seconds": seconds, "img_s": n_images / seconds,
                     "gflop_per_image": gflop, "speedup_of_cached": seconds / head_epoch,
                     f"s_per_epoch_at_{extrapolate}": seconds / n_images * extrapolate})
    rows.append({"epoch": "one-off extraction (forward once)", "images": n_images, "seconds": forward,
                 "img_s": n_images / forward, "gflop_per_image": body, "speedup_of_cached": float("nan"),
                 f"s_per_epoch_at_{extrapolate}": forward / n_images * extrapolate})
    rows += _tune_rows(n_images, image_size, batch_size, classes, pixels, head_epoch, extrapolate)
    for r in rows:
        r.update(image_size=image_size, layer=layer, device=session.get_providers()[0])
    return rows


def _tune_rows(n_images: int, image_size: int, batch_size: int, classes: int, pixels, head_epoch: float,
               extrapolate: int) -> list[dict]:
    """Epochs of block-5 fine-tuning, from cached pool4 and the Keras way; none without torch."""
    try:
        import torch
    except ImportError:
        return []
    from headstart.export import build_body, load_weights
    from headstart.export.runtime import open_session
    from headstart.export.vgg import body_gflop, layer_shape
    from headstart.heads.tuned import TunedHead

    from .tune import to_torch

    weights = load_weights()
    to_pool4 = open_session(build_body(weights, image_size, ("pool4",)).SerializeToString(), "auto", quiet=True)
    t0 = time.perf_counter()
    pool4 = np.concatenate([to_pool4.run(["pool4"], {"images": pixels(i)})[0] for i in range(0, n_images, batch_size)])
    blocks_1_4 = time.perf_counter() - t0
    side = layer_shape("pool4", image_size)[1]
    conv_gflop = 2 * 9 * 512 * 512 * side * side / 1e9
    y = torch.from_numpy(np.arange(n_images) % classes)
    rows = []
    for unfreeze in (1, 3):
        head = TunedHead(unfreeze)
        head.classes_, head.side = np.arange(classes), side
        head.convs_ = weights.convs[-3:]
        head.mean_, head.scale_ = np.zeros(512, np.float32), np.ones(512, np.float32)
        head.layers_ = [(np.zeros((512, classes), np.float32), np.zeros(classes, np.float32))]
        net = to_torch(head)
        for conv in net.convs[:3 - unfreeze]:
            conv.requires_grad_(False)
        optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-4)
        x = torch.from_numpy(pool4)
        t0 = time.perf_counter()
        for i in range(0, n_images, batch_size):
            loss = torch.nn.functional.cross_entropy(net(x[i:i + batch_size]), y[i:i + batch_size])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        seconds = time.perf_counter() - t0
        gflop = conv_gflop * (3 + 2 * unfreeze)  # every conv forward, the trained ones backward too
        rows.append((f"block 5, last {unfreeze} conv{'s' if unfreeze > 1 else ''} on cached pool4 (headstart)",
                     seconds, gflop))
    keras_gflop = body_gflop(image_size) - 3 * conv_gflop + rows[-1][2]  # blocks 1-4 forward, then block 5
    rows.append(("block 5 fine-tuned, Keras way (blocks 1-4 + block 5 every epoch)", blocks_1_4 + rows[-1][1],
                 keras_gflop))
    return [{"epoch": name, "images": n_images, "seconds": sec, "img_s": n_images / sec, "gflop_per_image": g,
             "speedup_of_cached": sec / head_epoch, f"s_per_epoch_at_{extrapolate}": sec / n_images * extrapolate}
            for name, sec, g in rows]


def plot_epochs(rows: list[dict], path: str | Path) -> None:
    """Bar chart, log scale: seconds per epoch of each way."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = next(k for k in rows[0] if k.startswith("s_per_epoch_at_"))
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.45 * len(rows)), dpi=100)
    names = [r["epoch"] for r in rows]
    values = [r[key] for r in rows]
    palette = ["#888", "#c44", "#d84", "#2a6", "#68c", "#46a", "#a4a"]
    bars = ax.barh(names[::-1], values[::-1], color=palette[: len(rows)][::-1])
    ax.set_xscale("log")
    ax.set_xlabel(f"seconds per epoch of {key.rsplit('_', 1)[1]} images (log scale)")
    for bar, v in zip(bars, values[::-1], strict=True):
        ax.text(v, bar.get_y() + bar.get_height() / 2, f" {v:,.2f} s", va="center", fontsize=8)
    r = rows[0]
    ax.set_title(f"VGG16 {r['image_size']} px, head on {r['layer']}, {r['device']}\n{machine()}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def bench_heads(rows: int = 25_000, epochs: int = 10, mlp_rows: int = 1_999, mlp_epochs: int = 20,
                batch_size: int = 64) -> list[dict]:
    """Head training on synthetic features of the cache's shapes: softmax on gap (512 float32) and on pool5 at
    224 px (25,088 float16), and the default MLP (256 hidden, dropout 0.5) on pool5; mlp_rows=0 leaves it out.
    ms_per_epoch is the median; the first epoch also loads the compiled loops (and compiles them, once per
    installation)."""
    from headstart.heads.models import MLPHead, SoftmaxHead

    cases = [(SoftmaxHead, rows, 512, "float32", epochs), (SoftmaxHead, rows, 25_088, "float16", epochs)]
    cases += [(MLPHead, mlp_rows, 25_088, "float16", mlp_epochs)] if mlp_rows else []
    out = []
    for cls, n, dim, dtype, n_epochs in cases:
        rng = np.random.default_rng(0)
        y = rng.integers(0, 2, n)
        X = np.empty((n, dim), dtype)
        for i in range(0, n, 1000):  # in blocks: a float32 copy of the whole pool5 array would be 2.5 GB
            X[i:i + 1000] = rng.standard_normal((min(1000, n - i), dim), np.float32) + 0.05 * y[i:i + 1000, None]
        t0 = time.perf_counter()
        head = cls(epochs=n_epochs, batch_size=batch_size, min_steps=0).fit(X, y)  # one pass an epoch
        total = time.perf_counter() - t0
        out.append({"head": "mlp" if cls is MLPHead else "softmax", "rows": n, "dim": dim, "dtype": dtype,
                    "epochs": n_epochs, "batch": batch_size, "seconds": total,
                    "ms_per_epoch": float(np.median([r["ms"] for r in head.history_])),
                    "first_epoch_ms": head.history_[0]["ms"]})
    return out


def bench_predict(data: str | Path, model: str | Path, counts: tuple[int, ...] = (200, 2000),
                  batch_size: int = 32, jobs: int = 2) -> list[dict]:
    """Peak resident memory of `headstart predict` over the first N files of `data`, for each N.

    Each run is a fresh process (its peak RSS read from the kernel when it ends) over a folder of links, so
    the numbers compare how memory grows with the folder, which the bounded reader keeps flat.
    """
    import subprocess
    import sys
    import tempfile

    from .dataset import scan

    paths = scan(data).paths
    if max(counts) > len(paths):
        raise UsageError(f"{data} holds {len(paths)} files; --counts asks for {max(counts)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            folder = Path(tmp) / f"n{n}"
            folder.mkdir()
            for i, p in enumerate(paths[:n]):
                (folder / f"{i:06d}{Path(p).suffix}").symlink_to(Path(p).resolve())
            cmd = [sys.executable, "-m", "headstart.pipeline.cli", "predict", str(folder), "--model", str(model),
                   "-o", str(Path(tmp) / f"n{n}.csv"), "--batch-size", str(batch_size), "--jobs", str(jobs),
                   "--device", "cpu"]
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            _, status, usage = os.wait4(proc.pid, 0)
            seconds = time.perf_counter() - t0
            if status:
                raise RuntimeError(f"predict failed: {proc.stderr.read().decode()[-500:]}")
            rows.append({"files": n, "peak_rss_mib": usage.ru_maxrss / 1024, "seconds": seconds,
                         "img_s": n / seconds})
    for r in rows:
        r["rss_vs_first"] = r["peak_rss_mib"] / rows[0]["peak_rss_mib"]
    return rows
