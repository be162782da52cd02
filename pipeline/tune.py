"""Fine-tuning the top of the body from the cache: the last 1-3 convolutions of block 5, trained on cached pool4.

The Keras way (blog: fine-tune block 5 on images) pushes every image through blocks 1-4 every epoch; here
blocks 1-4 ran once, at extraction, and an epoch costs block 5 forward and backward alone. PyTorch does the
training (`pip install 'headstart[tune]'`), on CUDA when it is there; the result is a TunedHead of plain arrays.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from headstart.export.errors import CacheError, DataError, ModelError, UsageError
from headstart.export.fingerprint import body_fingerprint, compatible
from headstart.export.graph import read_metadata
from headstart.heads.metrics import loss_and_accuracy
from headstart.heads.models import EpochLog
from headstart.heads.tuned import POOLINGS, TunedHead

from .cache import FeatureCache
from .selection import Selection, task_rows

LAYER = "pool4"


def _torch():
    try:
        import torch
    except ImportError:
        raise UsageError("headstart tune trains with PyTorch: pip install 'headstart[tune]'") from None
    return torch


def block5_weights(model: str | Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """conv5_1..3 of a float32 headstart body, as (W (512, 512, 3, 3), b) float32."""
    meta = read_metadata(model)
    if meta.get("kind") != "body" or meta.get("dtype") != "float32":
        raise ModelError(f"{model}: tune starts from a float32 headstart body (export it without --dtype or "
                         "--quantize)")
    inits = {i.name: i for i in onnx.load(str(model)).graph.initializer}
    return [(numpy_helper.to_array(inits[f"conv5_{i}.w"]).astype(np.float32),
             numpy_helper.to_array(inits[f"conv5_{i}.b"]).astype(np.float32)) for i in (1, 2, 3)]


def to_torch(head: TunedHead):
    """The head as a torch module on pool4 (N, 512, s, s): what tune trains and what bundle must equal."""
    torch = _torch()
    nn = torch.nn

    class Block5(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.convs = nn.ModuleList(nn.Conv2d(512, 512, 3, padding=1) for _ in range(3))
            sizes = [head.mean_.shape[0], *head.hidden, len(head.classes_)]
            self.dense = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
            self.register_buffer("mean", torch.from_numpy(head.mean_.copy()))
            self.register_buffer("scale", torch.from_numpy(head.scale_.copy()))

        def forward(self, x):
            for conv in self.convs:
                x = torch.relu(conv(x))
            x = torch.nn.functional.max_pool2d(x, 2)
            x = x.mean(dim=(2, 3)) if head.pooling == "gap" else x.flatten(1)
            x = (x - self.mean) / self.scale
            for i, layer in enumerate(self.dense):
                x = layer(x)
                if i < len(self.dense) - 1:
                    x = torch.relu(x)
            return x

    module = Block5()
    with torch.no_grad():
        for conv, (W, b) in zip(module.convs, head.convs_, strict=True):
            conv.weight.copy_(torch.from_numpy(W))
            conv.bias.copy_(torch.from_numpy(b))
        for layer, (W, b) in zip(module.dense, head.layers_, strict=True):
            layer.weight.copy_(torch.from_numpy(W.T.copy()))
            layer.bias.copy_(torch.from_numpy(b))
    return module


def _from_torch(head: TunedHead, module) -> None:
    head.convs_ = [(c.weight.detach().cpu().numpy().copy(), c.bias.detach().cpu().numpy().copy())
                   for c in module.convs]
    head.layers_ = [(d.weight.detach().cpu().numpy().T.copy(), d.bias.detach().cpu().numpy().copy())
                    for d in module.dense]


def tune_head(cache: str | Path, model: str | Path, selection: Selection | None = None, *, unfreeze: int = 1,
              pooling: str = "gap", hidden: tuple[int, ...] = (), epochs: int = 10, lr: float = 1e-3,
              conv_lr: float = 1e-4, batch_size: int = 32, l2: float = 1e-4, random_init: bool = False,
              task: str | None = None, log: EpochLog | None = None, say: Callable[[str], None] | None = None
              ) -> TunedHead:
    """Train the last `unfreeze` convolutions of block 5 (from the ImageNet weights of `model`, or random ones
    with `random_init`, a control), pool5, `pooling` and a dense head on the cached pool4 of `cache`, on the rows
    and labels of `selection` (its seed seeds the training too).

    The convolutions learn at `conv_lr`, the head at `lr` (Adam); `l2` penalises the head's weights.
    """
    torch = _torch()
    if unfreeze not in (1, 2, 3) or pooling not in POOLINGS or epochs < 1 or batch_size < 1:
        raise UsageError(f"unfreeze is 1, 2 or 3 and pooling one of {', '.join(POOLINGS)}; epochs and batch "
                         f"size at least 1 (got {unfreeze}, {pooling!r}, {epochs}, {batch_size})")
    selection = selection or Selection()
    seed, augmented = selection.seed, selection.augmented
    say = say or (lambda _: None)
    log = log or (lambda _: None)
    if "outputs" in read_metadata(model):  # export --onnx: the user's model has no VGG16 block 5 to tune
        raise UsageError(f"{model} wraps another model (`headstart export --onnx`): tune fine-tunes VGG16's block 5; "
                         "train a head on the cached layers instead")
    fc = FeatureCache(cache, selection.dataset)
    if LAYER not in fc.layers:
        raise CacheError(f"{fc.path} has no {LAYER} features; export the body with --layers {LAYER},gap,pool5 "
                         "and extract again")
    # The body gives the weights, not features: its output layers may differ from the cache's.
    compatible(fc.fingerprint, body_fingerprint(read_metadata(model)) | {k: fc.fingerprint[k] for k in
                                                                         ("resize", "layers")}, str(model))
    classes, y, record, train, valid = task_rows(fc, selection, say)
    side = int(round((fc.root[f"features/{LAYER}"].shape[1] / 512) ** 0.5))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

    head = TunedHead(unfreeze, pooling, hidden)
    head.classes_, head.side = np.array(classes), side
    head.convs_ = block5_weights(model)
    if random_init:
        head.convs_ = [((rng.standard_normal(W.shape) * np.sqrt(2 / (9 * 512))).astype(np.float32),
                        np.zeros_like(b)) for W, b in head.convs_]
    width = 512 if pooling == "gap" else 512 * (side // 2) ** 2
    head.mean_, head.scale_ = np.zeros(width, np.float32), np.ones(width, np.float32)
    sizes = [width, *hidden, len(classes)]
    head.layers_ = [((rng.standard_normal((a, b)) * np.sqrt(1 / a)).astype(np.float32), np.zeros(b, np.float32))
                    for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
    net = to_torch(head).to(device)

    storage = np.float16 if fc.attrs.get("dtype") == "float16" else np.float32

    def load(rows: np.ndarray) -> np.ndarray:
        """pool4 of `rows`, read in one pass (each chunk once), kept as stored: (n, 512, s, s)."""
        return fc.features_at(LAYER, rows, storage).reshape(-1, 512, side, side)

    def tensor(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x.astype(np.float32)).to(device)

    def pooled(x: torch.Tensor) -> torch.Tensor:  # the head's input, before standardization
        for conv in net.convs:
            x = torch.relu(conv(x))
        x = torch.nn.functional.max_pool2d(x, 2)
        return x.mean(dim=(2, 3)) if pooling == "gap" else x.flatten(1)

    # Standardize the head's input as it is at the start, from the ImageNet (or control) convolutions.
    X_plain, X_valid = load(fc.entry_rows[train]), load(fc.entry_rows[valid])
    with torch.no_grad():
        z = torch.cat([pooled(tensor(X_plain[i:i + 256])) for i in range(0, len(train), 256)])
        net.mean.copy_(z.mean(0))
        net.scale.copy_(torch.where(z.std(0) > 1e-6, z.std(0), torch.ones_like(z.std(0))))
    for conv in net.convs[:3 - unfreeze]:
        conv.requires_grad_(False)
    optimizer = torch.optim.Adam([{"params": [p for c in net.convs[3 - unfreeze:] for p in c.parameters()],
                                   "lr": conv_lr}, {"params": net.dense.parameters(), "lr": lr}])
    y_train, y_valid = torch.from_numpy(y[train]).to(device), y[valid]
    if augmented and fc.view_rows.shape[1] == 0:
        raise DataError(f"{fc.path}: dataset {fc.dataset!r} has no augmented views; extract it with --augment K")
    say(f"tuning conv5_{4 - unfreeze}..conv5_3 on cached {LAYER} ({len(train)} train rows, {device})")
    head.history_ = []
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        net.train()
        X = X_plain
        if augmented:  # this epoch's view of every image, read in one pass
            X = load(fc.draw_views(train, rng))
        order = rng.permutation(len(train))
        proba = np.empty((len(train), len(classes)), np.float32)
        for i in range(0, len(train), batch_size):
            idx = np.sort(order[i:i + batch_size])
            logits = net(tensor(X[idx]))
            loss = torch.nn.functional.cross_entropy(logits, y_train[idx])
            loss = loss + 0.5 * l2 * sum((d.weight ** 2).sum() for d in net.dense)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            proba[idx] = torch.softmax(logits.detach(), 1).cpu().numpy()
        net.eval()
        with torch.no_grad():
            p_valid = np.concatenate([torch.softmax(net(tensor(X_valid[i:i + 256])), 1).cpu().numpy()
                                      for i in range(0, len(valid), 256)]) if len(valid) else None
        rec = {"epoch": epoch, "ms": round((time.perf_counter() - t0) * 1000, 2)}
        rec["train_loss"], rec["train_accuracy"] = loss_and_accuracy(y[train], proba)
        if p_valid is not None:
            rec["valid_loss"], rec["valid_accuracy"] = loss_and_accuracy(y_valid, p_valid)
        head.history_.append(rec)
        log(rec)
    net = net.cpu()
    head.mean_, head.scale_ = net.mean.numpy().copy(), net.scale.numpy().copy()
    _from_torch(head, net)
    head.meta_ = {"task": task or fc.dataset, "layer": LAYER, "fingerprint": fc.fingerprint, "selection": record,
                  "rows": {"train": int(len(train)), "valid": int(len(valid))},
                  "metrics": {k: v for k, v in head.history_[-1].items() if k != "epoch"},
                  "tune": {"unfreeze": unfreeze, "conv_lr": conv_lr, "lr": lr, "epochs": epochs,
                           "augmented": augmented, "random_init": random_init}}
    return head
