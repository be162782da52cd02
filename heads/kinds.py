"""Every head kind by the name the command line, head files and sweeps use: the one registry of them."""

from .auto import AutoHead
from .knn import KNNHead
from .models import LogisticHead, MLPHead, SoftmaxHead

KINDS: dict[str, type] = {"softmax": SoftmaxHead, "logistic": LogisticHead, "mlp": MLPHead, "knn": KNNHead,
                          "auto": AutoHead}
