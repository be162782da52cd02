"""VGG16 features in torch eager, written independently of the ONNX graph: the tests' numerical reference and
the benchmark's baseline. Torch is not a runtime dependency; it is imported only here.

Nothing here comes from the code it checks: the layer plan and the input statistics are written out again,
as torchvision's `vgg16` and its ImageNet transforms define them.
"""

from __future__ import annotations

import numpy as np

from .weights import Weights

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
CONVS_PER_BLOCK = (2, 2, 3, 3, 3)


class TorchVGG16:
    """`__call__(images uint8 (N, S, S, 3)) -> {"pool4", "conv5_3", "pool5", "gap", "gap1".."gap4"}` as float32
    numpy arrays."""

    def __init__(self, weights: Weights, threads: int | None = None) -> None:
        import torch

        self.torch = torch
        if threads:
            torch.set_num_threads(threads)
        self.params = [(torch.from_numpy(w), torch.from_numpy(b)) for w, b in weights.convs]
        self.mean = torch.tensor(MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(STD).view(1, 3, 1, 1)

    def forward(self, x):
        F = self.torch.nn.functional
        x = (x.permute(0, 3, 1, 2).float() / 255.0 - self.mean) / self.std
        i, pools = 0, []
        for n_convs in CONVS_PER_BLOCK:
            for _ in range(n_convs):
                x = F.relu(F.conv2d(x, *self.params[i], padding=1))
                i += 1
            conv = x
            x = F.max_pool2d(x, 2)
            pools.append(x)
        return {"pool4": pools[3], "conv5_3": conv, "pool5": x, "gap": x.mean(dim=(2, 3)),
                **{f"gap{i}": pools[i - 1].mean(dim=(2, 3)) for i in range(1, 5)}}

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        with self.torch.inference_mode():
            out = self.forward(self.torch.from_numpy(np.ascontiguousarray(images)))
        return {k: v.numpy() for k, v in out.items()}
