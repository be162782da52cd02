"""VGG16 written once, as data: the ONNX graph, the weight names and the layer shapes all derive from CFG."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UsageError

# Configuration "D" of Simonyan & Zisserman (timm's cfgs["vgg16"]): the output channels of each 3x3 convolution
# (padding 1, then ReLU), "M" a 2x2 max-pool of stride 2.
CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
FC = (4096, 4096)  # fc6, fc7: the classifier's hidden layers, reading pool5 at 7x7 (224 px)
FC_SIZE = 224


@dataclass(frozen=True)
class Stage:
    """One conv or pool of CFG: its name (conv3_2, pool3), channels, and downsampling of the image at its output."""

    name: str
    kind: str  # "conv" or "pool"
    cin: int
    cout: int
    stride: int  # the image side divided by this stage's output side
    index: int  # position in torchvision's `features` Sequential, where each conv is followed by its ReLU


def _stages() -> tuple[Stage, ...]:
    out, cin, stride, block, j, index = [], 3, 1, 1, 0, 0
    for v in CFG:
        if v == "M":
            stride *= 2
            out.append(Stage(f"pool{block}", "pool", cin, cin, stride, index))
            block, j, index = block + 1, 0, index + 1
        else:
            j += 1
            out.append(Stage(f"conv{block}_{j}", "conv", cin, int(v), stride, index))
            cin, index = int(v), index + 2
    return tuple(out)


STAGES = _stages()
CONVS = tuple(s for s in STAGES if s.kind == "conv")
LAST = STAGES[-1]  # pool5
# The outputs a body can give: pool4 (the input of block 5, for training that block on cached activations),
# conv5_3 and pool5, the global average of pool5 (gap) and of a shallower block's pool (gap1-gap4: they keep
# more of an image's colour and brightness, docs/heads.md), and the classifier's fc6/fc7.
LAYERS = ("pool4", "conv5_3", "pool5", "gap", "gap1", "gap2", "gap3", "gap4", "fc6", "fc7")
SHALLOW_GAPS = {f"gap{s.name[4:]}": s for s in STAGES if s.kind == "pool" and s is not LAST}
DEFAULT_LAYERS = ("gap", "pool5")


def check_image_size(image_size: int) -> None:
    if image_size < LAST.stride or image_size % LAST.stride:
        raise UsageError(f"image size {image_size} is not a multiple of {LAST.stride} from {LAST.stride} up "
                         f"(VGG16 halves it {CFG.count('M')} times)")


def layer_shape(layer: str, image_size: int) -> tuple[int, ...]:
    """Per-image shape of a body output: (C, H, W) for a stage, (C,) for gap and fc6/fc7."""
    if layer == "gap":
        return (LAST.cout,)
    if layer in SHALLOW_GAPS:
        return (SHALLOW_GAPS[layer].cout,)
    if layer in ("fc6", "fc7"):
        return (FC[layer == "fc7"],)
    stage = next((s for s in STAGES if s.name == layer), None)
    if stage is None:
        raise UsageError(f"unknown layer {layer!r}; choose from {', '.join(LAYERS)}")
    side = image_size // stage.stride
    return (stage.cout, side, side)


def fc_input() -> int:
    """fc6's input size: pool5 flattened at the classifier's own image size."""
    side = FC_SIZE // LAST.stride
    return LAST.cout * side * side


def body_gflop(image_size: int) -> float:
    """Forward GFLOP of the convolutions per image (2 per multiply-add; 30.7 at 224 px)."""
    return sum(2 * 9 * s.cin * s.cout * (image_size // s.stride) ** 2 for s in CONVS) / 1e9
