"""Download a source file: HTTP(S) with Range resume and retries, hf:// and file://.

The download goes to `DEST.part`, which is kept across attempts and across runs
so a large file is never downloaded twice; only a complete, verified file is
renamed onto `DEST`.
"""
from __future__ import annotations

import http.client
import logging
import os
import re
import shutil
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

from zhlm import __version__
from zhlm.data import demo
from zhlm.io import sha256_file

log = logging.getLogger("zhlm.fetch")

DEFAULT_HF_ENDPOINT = "https://huggingface.co"
CHUNK = 1 << 20
# HTTP statuses worth retrying; every other 4xx is permanent.
RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


class FetchError(OSError):
    """A download failed for good (permanent HTTP error or retries exhausted)."""


class ChecksumError(ValueError):
    """The downloaded file does not have the pinned sha256."""


class _Transient(Exception):
    """A failure worth retrying; `retry_after` is the server's hint in seconds."""

    def __init__(self, msg: str, retry_after: float | None = None):
        super().__init__(msg)
        self.retry_after = retry_after


def _hf_parts(uri: str) -> tuple[str, str, str, str]:
    """OWNER, NAME, PATH and REVISION ("" when not pinned) of hf://datasets/OWNER/NAME/PATH[@REVISION]."""
    rest = uri[len("hf://"):]
    parts = rest.split("/", 3)
    if len(parts) != 4 or parts[0] != "datasets" or not all(parts[1:]):
        raise ValueError(f"hf uri must look like hf://datasets/OWNER/NAME/PATH[@REVISION]: {uri!r}")
    _, owner, name, path = parts
    path, at, revision = path.rpartition("@") if "@" in path else (path, "", "")
    if at and not (path and revision):
        raise ValueError(f"hf uri has an empty path or revision: {uri!r}")
    return owner, name, path, revision


def file_name(uri: str) -> str:
    """The name of the file `uri` downloads to: the last segment of its path (an hf:// URI's
    without its @REVISION, a URL's without its query), or NAME.jsonl for demo:NAME."""
    if uri.startswith("demo:"):
        return uri.removeprefix("demo:") + ".jsonl"
    if uri.startswith("hf://"):
        path = _hf_parts(uri)[2]
    elif _SCHEME.match(uri):
        path = urllib.parse.urlparse(uri).path
    else:
        path = uri  # a local path
    name = path.rsplit("/", 1)[-1]
    if name in ("", ".", ".."):
        raise ValueError(f"{uri!r} does not end in a file name")
    return name


def resolve_url(uri: str) -> str:
    """The HTTP(S) URL for `uri`; hf://datasets/OWNER/NAME/PATH[@REV] goes through HF_ENDPOINT."""
    if uri.startswith(("http://", "https://")):
        return uri
    if not uri.startswith("hf://"):
        raise ValueError(f"not an http(s):// or hf:// uri: {uri!r}")
    owner, name, path, revision = _hf_parts(uri)
    endpoint = os.environ.get("HF_ENDPOINT") or DEFAULT_HF_ENDPOINT
    q = urllib.parse.quote
    # A revision such as refs/pr/1 is one path segment on the hub, so its slashes are escaped.
    return (f"{endpoint.rstrip('/')}/datasets/{q(owner)}/{q(name)}/resolve/"
            f"{q(revision or 'main', safe='')}/{q(path)}")


def fetch(uri: str, dest: str | os.PathLike, sha256: str | None = None, *, retries: int = 5,
          timeout: float = 60, backoff: float = 1.0, progress: bool = True) -> Path:
    """Fetch `uri` to `dest` (atomically), verifying `sha256` when given; return `dest`.

    Transient HTTP failures are retried `retries` times with exponential backoff
    (`backoff`, 2*backoff, ...), resuming from the partial download.
    """
    dest = Path(dest)
    if sha256 is not None:
        sha256 = sha256.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise ValueError(f"sha256 for {uri} is not 64 hex digits: {sha256!r}")
    m = _SCHEME.match(uri)
    scheme = m.group(1).lower() if m else ""
    if scheme in ("http", "https", "hf"):
        url = resolve_url(uri)
    elif scheme == "file" or not scheme:
        url = None
    elif scheme == "demo":
        raise ValueError(f"{uri}: demo: sources are built by zhlm.data.demo, not fetched")
    else:
        raise ValueError(f"{uri}: unsupported uri scheme {scheme!r} "
                         "(use https://, http://, hf://datasets/..., file:// or a local path)")

    if sha256 and dest.exists() and sha256_file(dest) == sha256:
        log.info("%s already present with the pinned sha256", dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if url is None:
        shutil.copyfile(_local_path(uri), part)
    else:
        headers = {"User-Agent": f"zhlm/{__version__}"}
        token = os.environ.get("HF_TOKEN") if scheme == "hf" else None
        _download(uri, url, part, headers, token, retries=retries, timeout=timeout,
                  backoff=backoff, progress=progress, desc=dest.name)

    actual = sha256_file(part)
    if sha256 is None:
        log.info("%s sha256=%s (pin it in the config to verify later downloads)", uri, actual)
    elif actual != sha256:
        part.unlink(missing_ok=True)
        dest.unlink(missing_ok=True)
        raise ChecksumError(f"{uri}: sha256 mismatch: expected {sha256}, got {actual}")
    os.replace(part, dest)
    return dest


def local_file(uri: str) -> Path | None:
    """The local file that a file:// URI (or a plain path) is copied from; None for any other URI."""
    m = _SCHEME.match(uri)
    if m and m.group(1).lower() != "file":
        return None
    return _local_path(uri)


def _local_path(uri: str) -> Path:
    if not uri.startswith("file:"):
        return Path(uri)
    parsed = urllib.parse.urlparse(uri)
    if parsed.netloc not in ("", "localhost"):
        raise ValueError(f"file uri must hold an absolute path (file:///abs/path): {uri!r}")
    return Path(urllib.request.url2pathname(parsed.path))


def _download(uri, url, part, headers, token, *, retries, timeout, backoff, progress, desc) -> None:
    attempt = 0
    while True:
        try:
            _download_once(uri, url, part, headers, token, timeout, progress, desc)
            return
        except _Transient as e:
            err, retry_after = str(e), e.retry_after
        except (http.client.HTTPException, ConnectionError, TimeoutError) as e:
            err, retry_after = f"{type(e).__name__}: {e}", None
        except urllib.error.URLError as e:
            # HTTPError is handled inside _download_once; a certificate problem won't fix itself.
            if isinstance(e.reason, ssl.SSLCertVerificationError):
                raise FetchError(f"{url}: {e.reason}") from e
            err, retry_after = f"{e.reason}", None
        attempt += 1
        if attempt > retries:
            raise FetchError(f"{url}: giving up after {retries} retries: {err}")
        delay = backoff * 2 ** (attempt - 1)
        if retry_after is not None:
            delay = max(delay, min(retry_after, 300.0))
        log.warning("%s: %s; retry %d/%d in %.1fs", url, err, attempt, retries, delay)
        time.sleep(delay)


def _download_once(uri, url, part, headers, token, timeout, progress, desc) -> None:
    """One request: append to `part` from where it ends; raise _Transient to retry."""
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers=dict(headers))
    if have:
        req.add_header("Range", f"bytes={have}-")
    if token:
        # Unredirected: the token must not follow the hub's redirect to a CDN host.
        req.add_unredirected_header("Authorization", f"Bearer {token}")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        with e:
            if e.code == 416 and have:
                m = re.fullmatch(r"bytes\s+\*/(\d+)", e.headers.get("Content-Range", "").strip())
                if m and int(m.group(1)) == have:
                    return  # the part is already complete (an earlier run died before the rename)
                log.info("%s: partial download does not fit the remote file; restarting", url)
                part.unlink()
                return _download_once(uri, url, part, headers, token, timeout, progress, desc)
            if e.code in RETRY_STATUSES or e.code >= 500:
                raise _Transient(f"HTTP {e.code} {e.reason}", _retry_after(e.headers)) from None
            hint = ""
            if e.code in (401, 403) and uri.startswith("hf://"):
                hint = " (a gated or private dataset? set HF_TOKEN)"
            raise FetchError(f"{url}: HTTP {e.code} {e.reason}{hint}") from None

    with resp:
        total = None
        if resp.status == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != have:
                part.unlink()
                raise _Transient(f"unexpected Content-Range {resp.headers.get('Content-Range')!r}; restarting")
            total = None if m.group(3) == "*" else int(m.group(3))
            mode = "ab"
        else:
            if have:
                log.info("%s: server ignored the Range request; restarting from zero", url)
            have, mode = 0, "wb"
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        with open(part, mode) as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                         unit_divisor=1024, desc=desc, disable=not progress) as bar:
            while chunk := resp.read(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))

    if total is not None:
        size = part.stat().st_size
        if size < total:
            # http.client returns a short body without raising when the connection drops.
            raise _Transient(f"connection closed at {size} of {total} bytes")
        if size > total:
            part.unlink()
            raise _Transient(f"got {size} bytes, more than the announced {total}; restarting")


def _retry_after(headers) -> float | None:
    value = (headers.get("Retry-After") or "").strip()
    return float(value) if value.isdigit() else None


def download(uri: str, dest: str | os.PathLike, sha256: str | None = None) -> Path:
    """Bring one source to `dest`: fetch a URI, or write a `demo:NAME` dataset from the package files."""
    if uri.startswith("demo:"):
        demo.write_jsonl(uri.removeprefix("demo:"), dest)
        return Path(dest)
    return fetch(uri, dest, sha256)
