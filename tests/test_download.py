"""``fedrec data download`` against a zip served by a local HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
import zipfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from fedrec.cli import main
from fedrec.data.download import Archive, download_dataset
from fedrec.errors import DownloadError

U_DATA = b"1\t1\t5\t1\n2\t1\t3\t2\n"


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "srv"
    root.mkdir()
    with zipfile.ZipFile(root / "ml-100k.zip", "w") as z:
        z.writestr("ml-100k/u.data", U_DATA)
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root / "ml-100k.zip"
    finally:
        server.shutdown()
        server.server_close()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_verifies_and_extracts(served: tuple[str, Path], tmp_path: Path) -> None:
    url, zpath = served
    arch = Archive("ml-100k", zip_sha256=_sha(zpath),
                   files_sha256={"u.data": hashlib.sha256(U_DATA).hexdigest()})
    dest = download_dataset("ml-100k", tmp_path / "data", base_url=url, archive=arch,
                            progress=False)
    assert (dest / "u.data").read_bytes() == U_DATA


def test_checksum_mismatch_leaves_nothing(served: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = served
    arch = Archive("ml-100k", zip_sha256="0" * 64)
    with pytest.raises(DownloadError, match="sha256 is .* expected 0000"):
        download_dataset("ml-100k", tmp_path / "data", base_url=url, archive=arch,
                         progress=False)
    assert list((tmp_path / "data").iterdir()) == []


def test_official_checksums_reject_a_foreign_zip(served: tuple[str, Path],
                                                 tmp_path: Path) -> None:
    url, _ = served
    with pytest.raises(DownloadError, match="md5"):
        download_dataset("ml-100k", tmp_path / "data", base_url=url, progress=False)


def test_no_network_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = main(["data", "download", "ml-100k", "--root", str(tmp_path), "--quiet",
                 "--base-url", f"http://127.0.0.1:{port}"])
    assert code == 2
    assert "No network?" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
