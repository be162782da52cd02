import hashlib
import io
import tarfile
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner
from helpers import generated_images

from headstart.pipeline.cli import main
from headstart.pipeline.data import PARITY, write_pets
from headstart.pipeline.dataset import scan
from headstart.pipeline.selection import read_classes_map
from headstart.pipeline.targets import read_tags_map


def test_digits_are_written_as_an_image_folder(tmp_path):
    result = CliRunner().invoke(main, ["data", "digits", str(tmp_path / "digits")])
    assert result.exit_code == 0, result.output
    assert "1437 train and 360 valid digits" in result.output
    ds = scan(tmp_path / "digits")
    assert len(ds) == 1797 and ds.classes == [str(d) for d in range(10)]
    assert read_classes_map(tmp_path / "digits" / "parity.yaml") == PARITY
    tags = read_tags_map(tmp_path / "digits" / "tags.yaml")
    assert tags["3"] == ("odd", "prime") and tags["4"] == () and tags["9"] == ("loop", "odd")
    again = CliRunner().invoke(main, ["data", "digits", str(tmp_path / "digits")])
    assert again.exit_code != 0 and "exists and is not empty" in again.output


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def pets_server(tmp_path):
    """A local HTTP server with small archives in the Oxford-IIIT Pet layout (generated JPEGs inside)."""
    images = generated_images(tmp_path / "src", 3)
    cats, dogs = images[:3], images[3:]
    names = [("Abyssinian_1", 1, cats[0]), ("Abyssinian_2", 1, cats[1]), ("Bengal_1", 1, cats[2]),
             ("beagle_1", 2, dogs[0]), ("beagle_2", 2, dogs[1]), ("pug_1", 2, dogs[2])]
    images = _tar({f"images/{n}.jpg": p.read_bytes() for n, _, p in names})
    lines = [f"{n} 1 {kind} 1" for n, kind, _ in names]
    notes = _tar({"annotations/trainval.txt": "\n".join(lines[0:1] + lines[2:4] + lines[5:]).encode(),
                  "annotations/test.txt": "\n".join(lines[1:2] + lines[4:5]).encode(),
                  "annotations/list.txt": ("#Image CLASS-ID SPECIES BREED ID\n" + "\n".join(lines)).encode()})
    root = tmp_path / "www"
    root.mkdir()
    (root / "images.tar.gz").write_bytes(images)
    (root / "annotations.tar.gz").write_bytes(notes)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    md5 = {name: hashlib.md5((root / name).read_bytes()).hexdigest() for name in ("images.tar.gz",
                                                                                    "annotations.tar.gz")}
    yield f"http://127.0.0.1:{server.server_address[1]}/", md5
    server.shutdown()


def test_pets_download_is_verified_and_laid_out(pets_server, tmp_path):
    url, md5 = pets_server
    counts = write_pets(tmp_path / "pets", url, md5, downloads=tmp_path / "dl")
    assert counts == {"train": 4, "valid": 2}
    ds = scan(tmp_path / "pets")
    assert ds.classes == ["Abyssinian", "Bengal", "beagle", "pug"] and set(ds.splits) == {"train", "valid"}
    assert read_classes_map(tmp_path / "pets" / "species.yaml") == {
        "Abyssinian": "cat", "Bengal": "cat", "beagle": "dog", "pug": "dog"}


def test_pets_archive_with_another_checksum_is_refused(pets_server, tmp_path, monkeypatch):
    url, _ = pets_server
    monkeypatch.setenv("HEADSTART_WEIGHTS", str(tmp_path / "cache"))
    result = CliRunner().invoke(main, ["data", "pets", str(tmp_path / "pets"), "--mirror", url])
    assert result.exit_code != 0
    assert "does not match the expected 5c4f3ee8e5d25df40f4fd59a7f44e54c; refusing the download" in result.output
    assert not (tmp_path / "pets").exists()
    assert not list((tmp_path / "cache").rglob("*.tar.gz"))
