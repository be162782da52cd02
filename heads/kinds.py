"""Every head kind by the name the command line, head files and sweeps use: the one registry of them."""

from .adam_tasks import MLPRegressorHead, SigmoidHead
from .auto import AutoHead
from .knn import KNNHead
from .models import LogisticHead, MLPHead, SoftmaxHead
from .regression import RidgeHead
from .tags import TagHead

KINDS: dict[str, type] = {"softmax": SoftmaxHead, "logistic": LogisticHead, "mlp": MLPHead, "knn": KNNHead,
                          "auto": AutoHead}
# The heads of tasks beyond one label an image (pipeline.targets): task kind -> head kind -> estimator.
# `auto` is the closed-form or L-BFGS probe, whose penalty cross-validation chooses on the training rows.
TASK_KINDS: dict[str, dict[str, type]] = {
    "tags": {"auto": TagHead, "logistic": TagHead, "sigmoid": SigmoidHead},
    "value": {"auto": RidgeHead, "ridge": RidgeHead, "mlp": MLPRegressorHead},
}


def task_kind_of(head: object) -> str | None:
    """'tags' or 'value' for the heads of those tasks, None for a head of classes."""
    return next((k for k, reg in TASK_KINDS.items() if type(head) in reg.values()), None)


def kind_name(head: object) -> str:
    """The name of a fitted head's kind, as a head file records it: its KINDS name, or its tags or value kind's
    own (never `auto`, an alias there)."""
    tasks = [(n, cls) for reg in TASK_KINDS.values() for n, cls in reg.items() if n != "auto"]
    return next(n for n, cls in [*KINDS.items(), *tasks] if type(head) is cls)
