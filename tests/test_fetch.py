"""fetch() against a local HTTP server on 127.0.0.1 that can misbehave on demand."""
from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from zhlm.data.fetch import ChecksumError, FetchError, fetch, file_name, local_file, resolve_url

BODY = random.Random(0).randbytes(300_000)
SHA = hashlib.sha256(BODY).hexdigest()


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output quiet
        pass

    def do_GET(self):
        srv = self.server
        srv.requests.append((self.path, dict(self.headers)))
        n = len(srv.requests)
        if self.path in srv.redirects:
            self.send_response(302)
            self.send_header("Location", srv.redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if n <= len(srv.fail_statuses):
            self.send_response(srv.fail_statuses[n - 1])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if n <= srv.stall_first:
            time.sleep(1.0)
        body = srv.body
        rng = self.headers.get("Range")
        if rng and not srv.ignore_range:
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            start = 0
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if n <= srv.drop_first:
            # Half the body, then the connection goes away.
            self.wfile.write(body[start:start + (len(body) - start) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body[start:])


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client that timed out leaves a broken pipe behind; that is expected


@pytest.fixture
def server():
    srv = Server(("127.0.0.1", 0), Handler)
    srv.body, srv.requests, srv.fail_statuses = BODY, [], []
    srv.drop_first = srv.stall_first = 0
    srv.ignore_range = False
    srv.redirects = {}
    srv.url = f"http://127.0.0.1:{srv.server_port}"
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def get(server, tmp_path, sha=SHA, **kw):
    kw = {"backoff": 0, "progress": False, "timeout": 5, **kw}
    return fetch(f"{server.url}/data/file.bin", tmp_path / "out" / "file.bin", sha, **kw)


def test_plain_download(server, tmp_path):
    dest = get(server, tmp_path)
    assert dest == tmp_path / "out" / "file.bin"
    assert dest.read_bytes() == BODY
    assert not dest.with_name("file.bin.part").exists()
    assert len(server.requests) == 1 and "Range" not in server.requests[0][1]


def test_logs_sha_when_not_pinned(server, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="zhlm.fetch"):
        get(server, tmp_path, sha=None)
    assert SHA in caplog.text


def test_resumes_after_dropped_connection(server, tmp_path):
    server.drop_first = 1
    dest = get(server, tmp_path)
    assert dest.read_bytes() == BODY
    assert len(server.requests) == 2
    assert server.requests[1][1]["Range"] == f"bytes={len(BODY) // 2}-"


def test_checksum_mismatch(server, tmp_path):
    with pytest.raises(ChecksumError) as exc:
        get(server, tmp_path, sha="0" * 64)
    msg = str(exc.value)
    assert server.url in msg and "0" * 64 in msg and SHA in msg
    assert isinstance(exc.value, ValueError)
    assert not (tmp_path / "out" / "file.bin").exists()
    assert not (tmp_path / "out" / "file.bin.part").exists()


def test_404_fails_without_retry(server, tmp_path):
    server.fail_statuses = [404] * 10
    with pytest.raises(FetchError, match="404") as exc:
        get(server, tmp_path)
    assert "/data/file.bin" in str(exc.value)
    assert len(server.requests) == 1


def test_503_then_success(server, tmp_path):
    server.fail_statuses = [503, 503]
    assert get(server, tmp_path).read_bytes() == BODY
    assert len(server.requests) == 3


def test_gives_up_after_retries(server, tmp_path):
    server.fail_statuses = [500] * 10
    with pytest.raises(FetchError, match="giving up after 2 retries"):
        get(server, tmp_path, retries=2)
    assert len(server.requests) == 3


def test_timeout_is_retried(server, tmp_path):
    server.stall_first = 1
    assert get(server, tmp_path, timeout=0.3).read_bytes() == BODY
    assert len(server.requests) == 2


def test_server_ignoring_range(server, tmp_path):
    server.ignore_range = True
    server.drop_first = 1
    assert get(server, tmp_path).read_bytes() == BODY
    assert server.requests[1][1]["Range"] == f"bytes={len(BODY) // 2}-"


def test_resumes_part_from_earlier_run(server, tmp_path):
    part = tmp_path / "out" / "file.bin.part"
    part.parent.mkdir()
    part.write_bytes(BODY[:1000])
    assert get(server, tmp_path).read_bytes() == BODY
    assert server.requests[0][1]["Range"] == "bytes=1000-"
    assert not part.exists()


def test_complete_part_from_earlier_run(server, tmp_path):
    # The server answers 416 (the part already has every byte); fetch just verifies it.
    part = tmp_path / "out" / "file.bin.part"
    part.parent.mkdir()
    part.write_bytes(BODY)
    assert get(server, tmp_path).read_bytes() == BODY
    assert len(server.requests) == 1


def test_oversized_part_restarts(server, tmp_path):
    part = tmp_path / "out" / "file.bin.part"
    part.parent.mkdir()
    part.write_bytes(BODY + b"junk")
    assert get(server, tmp_path).read_bytes() == BODY
    assert "Range" not in server.requests[-1][1]


def test_hf_uri(server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", server.url + "/")
    monkeypatch.setenv("HF_TOKEN", "secret")
    dest = fetch("hf://datasets/o/n/sub/f.jsonl@rev", tmp_path / "f.jsonl", SHA,
                 backoff=0, progress=False)
    assert dest.read_bytes() == BODY
    path, headers = server.requests[0]
    assert path == "/datasets/o/n/resolve/rev/sub/f.jsonl"
    assert headers["Authorization"] == "Bearer secret"


def test_hf_token_not_sent_after_redirect(server, tmp_path, monkeypatch):
    # The hub redirects downloads to a CDN, which must not see the token.
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", "secret")
    server.redirects["/datasets/o/n/resolve/main/f.bin"] = server.url + "/cdn/f.bin"
    fetch("hf://datasets/o/n/f.bin", tmp_path / "f.bin", SHA, backoff=0, progress=False)
    assert [p for p, _ in server.requests] == ["/datasets/o/n/resolve/main/f.bin", "/cdn/f.bin"]
    assert "Authorization" not in server.requests[1][1]


def test_resolve_url(monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert (resolve_url("hf://datasets/BelleGroup/train_0.5M_CN/Belle_open_source_0.5M.json")
            == "https://huggingface.co/datasets/BelleGroup/train_0.5M_CN/resolve/main/"
               "Belle_open_source_0.5M.json")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:8080/")
    assert (resolve_url("hf://datasets/o/n/a/b.parquet@refs/convert/parquet")
            == "http://127.0.0.1:8080/datasets/o/n/resolve/refs%2Fconvert%2Fparquet/a/b.parquet")
    assert resolve_url("https://127.0.0.1/f") == "https://127.0.0.1/f"
    with pytest.raises(ValueError):
        resolve_url("hf://models/o/n/f")
    with pytest.raises(ValueError):
        resolve_url("hf://datasets/o/n")


@pytest.mark.parametrize("uri, name", [
    ("hf://datasets/pleisto/wikipedia-cn-20230720-filtered/wikipedia-cn-20230720-filtered.json@"
     "f5ff1ef7b2d2d9e7a1e1dbfd7b2a4ecbd5eb5b43", "wikipedia-cn-20230720-filtered.json"),
    ("hf://datasets/o/n/data/train-00000-of-00002.parquet", "train-00000-of-00002.parquet"),
    ("hf://datasets/o/n/a/b.parquet@refs/convert/parquet", "b.parquet"),  # a revision with slashes
    ("hf://datasets/o/n/user@host.jsonl@main", "user@host.jsonl"),        # the revision is after the last @
    ("https://127.0.0.1:8000/dir/planted.jsonl", "planted.jsonl"),
    ("https://example.org/get/data.csv?download=1#top", "data.csv"),
    ("file:///data/corpus/news.txt", "news.txt"),
    ("/data/corpus/news.txt", "news.txt"),
    ("demo:people_daily", "people_daily.jsonl"),  # demo datasets are written as jsonl
])
def test_file_name(uri, name):
    assert file_name(uri) == name


@pytest.mark.parametrize("uri", ["https://example.org/dir/", "file:///data/", "hf://datasets/o/n", "hf://datasets/o/n/f@"])
def test_file_name_of_a_uri_without_one(uri):
    with pytest.raises(ValueError):
        file_name(uri)


def test_local_file():
    assert str(local_file("file:///data/corpus/news.txt")) == "/data/corpus/news.txt"
    assert str(local_file("file://localhost/data/a%20b.txt")) == "/data/a b.txt"
    assert str(local_file("/data/corpus/news.txt")) == "/data/corpus/news.txt"
    for uri in ("https://127.0.0.1/f.jsonl", "hf://datasets/o/n/f.json", "demo:news"):
        assert local_file(uri) is None


def test_file_uri_and_local_path(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(BODY)
    assert fetch(f"file://{src}", tmp_path / "a.bin", SHA).read_bytes() == BODY
    assert fetch(str(src), tmp_path / "b.bin", SHA, progress=False).read_bytes() == BODY
    with pytest.raises(ChecksumError):
        fetch(f"file://{src}", tmp_path / "c.bin", "1" * 64)
    assert not (tmp_path / "c.bin").exists() and not (tmp_path / "c.bin.part").exists()


@pytest.mark.parametrize("uri", ["demo:people_daily", "ftp://127.0.0.1/f", "s3://bucket/key"])
def test_unknown_scheme(uri, tmp_path):
    with pytest.raises(ValueError, match="demo" if uri.startswith("demo") else "scheme"):
        fetch(uri, tmp_path / "x")
