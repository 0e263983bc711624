"""Download GroupLens MovieLens zips, verify checksums, extract atomically.

Checksums: the sha256 of the files inside each archive that fedrec reads (taken from the
official files), checked after extraction, plus the archive's own digest where one is
published (MD5 for ml-100k and ml-1m, as GroupLens and several loaders list it). A
mismatch removes everything downloaded; nothing half-written is left in the target.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from fedrec.errors import DownloadError

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens"


@dataclass(frozen=True)
class Archive:
    """One downloadable dataset archive."""

    name: str  # dataset name, also the zip's stem and its top folder
    zip_sha256: str = ""  # digest of the archive, when published
    zip_md5: str = ""
    files_sha256: dict[str, str] = field(default_factory=dict)  # member -> sha256


ARCHIVES: dict[str, Archive] = {
    "ml-100k": Archive(
        "ml-100k",
        zip_md5="0e33842e24a9c977be4e0107933c0723",
        files_sha256={
            "u.data": "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490",
            "u.item": "553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701",
        },
    ),
    "ml-1m": Archive("ml-1m", zip_md5="c4d9eecfca2ab87c1945afe126590906"),
    "ml-latest-small": Archive(
        "ml-latest-small",
        files_sha256={
            "ratings.csv": "aa289ca83157595d0df6aea1be6a4ded676ddc4385472e8313a8ed9805352646",
            "movies.csv": "5a5f32dd9bb3797b8e728a1b98958789d2b13f294a69fdfbc5727f8a9611aa07",
        },
    ),
}


def _digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch(url: str, dest: Path, timeout: float, progress: bool) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, dest.open("wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1],
                      disable=not progress) as bar:
                for chunk in iter(lambda: resp.read(1 << 16), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as err:
        raise DownloadError(f"{url}: server answered HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(
            f"{url}: cannot download ({reason}). No network? Download the zip by hand, "
            "unzip it and pass its folder with --data-dir"
        ) from None


def download_dataset(
    name: str,
    root: Path,
    *,
    base_url: str = GROUPLENS_URL,
    archive: Archive | None = None,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Fetch ``{base_url}/{name}.zip``, verify it, extract to ``root/name``.

    Args:
        name: a key of ARCHIVES (or any name when ``archive`` is given).
        root: folder that receives ``name/``.
        base_url: where the zips are served.
        archive: checksums to verify (default: ARCHIVES[name]).
        timeout: network timeout in seconds.
        progress: show a progress bar.

    Returns:
        The dataset folder, ready for ``--data-dir``.

    Raises:
        DownloadError: unknown name, no network, HTTP error, checksum mismatch, bad zip.
    """
    if archive is None:
        if name not in ARCHIVES:
            raise DownloadError(f"unknown dataset {name!r}; downloadable: {sorted(ARCHIVES)}")
        archive = ARCHIVES[name]
    target = root / name
    if target.exists():
        raise DownloadError(f"{target}: already exists; remove it to download again")
    root.mkdir(parents=True, exist_ok=True)
    url = f"{base_url.rstrip('/')}/{name}.zip"
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{name}-") as tmp:
        zpath = Path(tmp) / f"{name}.zip"
        _fetch(url, zpath, timeout, progress)
        for algo, want in (("sha256", archive.zip_sha256), ("md5", archive.zip_md5)):
            if want and (got := _digest(zpath, algo)) != want:
                raise DownloadError(f"{url}: {algo} is {got}, expected {want}; "
                                    "the download is corrupt or not the official file")
        try:
            with zipfile.ZipFile(zpath) as z:
                z.extractall(Path(tmp) / "x")
        except zipfile.BadZipFile:
            raise DownloadError(f"{url}: not a valid zip archive") from None
        found = list((Path(tmp) / "x").rglob("*"))
        top = Path(tmp) / "x" / name
        if not top.is_dir():
            raise DownloadError(f"{url}: archive has no top folder {name}/ "
                                f"(found {[p.name for p in found[:5]]})")
        for member, want in archive.files_sha256.items():
            path = top / member
            if not path.exists():
                raise DownloadError(f"{url}: archive lacks {name}/{member}")
            if (got := _digest(path, "sha256")) != want:
                raise DownloadError(f"{url}: {name}/{member} sha256 is {got}, expected {want}")
        shutil.move(str(top), str(target))
    return target
