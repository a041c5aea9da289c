"""Bounded work per request: the token is checked before the body is read, bodies have ceilings
(413 from the Content-Length or as the streamed body passes it, no temporary file left), image
bombs are refused from their header and decodes queue, a dataset completion's preflight holds no
database lock, a data directory that disappears makes writes 503, and bad link signatures are
rate-limited. The memory measurements run the server as its own process (`tailoredgen-train serve`)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from service_helpers import (OTHER_TOKEN, TOKEN, CliServer, ThreadServer, client, engine_yaml, sample_rows,
                             settings_for, wait_until)

from tailoredgen_train.errors import RateLimitedError
from tailoredgen_train.service import datasets
from tailoredgen_train.service.core import DecodeQueue

MiB = 2**20
PROJECT = {"project_name": "bounds", "ip_medium": "illustration", "ip_type": "stylized_scene"}


def sixteen_bit_png(width: int, height: int) -> bytes:
    """A black 16-bit greyscale PNG: 8000x8000 is ~120 KB on disk and 128 MB decoded (an image bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    compressor = zlib.compressobj(9)
    row = b"\x00" + bytes(2 * width)  # filter byte, then the row's 16-bit samples
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


# ---- raw HTTP: to see what the server answers before the client has sent its whole body ------------


def open_request(port: int, method: str, path: str, headers: dict[str, str]) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    sock.sendall("\r\n".join(head).encode())
    return sock


def send_chunked(sock: socket.socket, data: bytes, piece: int = 64 * 2**10) -> bool:
    """Send `data` as HTTP chunks; False once the server has closed the connection."""
    try:
        for start in range(0, len(data), piece):
            part = data[start:start + piece]
            sock.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        return True
    except OSError:
        return False


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], dict]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection without an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, json.loads(body)


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def multipart_head(name: str = "big.png") -> bytes:
    return (f'--bnd\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: image/png\r\n\r\n").encode()


# ---- the server as its own process: --max-upload-mb 1, --max-json-kb 64, one decode at a time ----


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bounds")
    spool = tmp / "spool"  # the server's TMPDIR: where a form parser would spool an upload
    spool.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(spool))
        server = CliServer(tmp / "data", tmp / "base-not-needed", engine_yaml(tmp), "--max-upload-mb", "1",
                           "--max-json-kb", "64", "--max-concurrent-decodes", "1").start()
    api = client(server.url)
    project = api.post("/projects", json=PROJECT).json()["id"]
    dataset = api.post("/datasets", json={"project_id": project, "name": "d", "training_version": "fibo"}).json()["id"]
    yield server, api, dataset, spool, tmp / "data" / "datasets" / f"dataset-{dataset}"
    server.stop()


def temporary_files(pid: int, spool: Path) -> list[str]:
    """The spooled files the server process holds open, and those left in its TMPDIR."""
    held = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(spool)) or target.endswith("(deleted)"):
            held.append(target)
    return held + [p.name for p in spool.iterdir()]


def peak_rss_growth_mb(pid: int, run) -> float:
    """How far the process's peak resident memory rose above its resident memory while `run` ran."""
    status = Path(f"/proc/{pid}/status")
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM (the peak) to the current VmRSS
    before = int(status.read_text().split("VmHWM:")[1].split()[0])
    run()
    return (int(status.read_text().split("VmHWM:")[1].split()[0]) - before) / 1024


def test_a_request_without_a_valid_token_is_answered_401_before_its_body_is_read(served):
    server, _, dataset, _, _ = served
    for path, content_type in (("/tailored-gen/projects", "application/json"),
                               (f"/tailored-gen/datasets/{dataset}/images", "multipart/form-data; boundary=bnd")):
        for token in ({}, {"api_token": "not-a-token-at-all"}):
            sock = open_request(server.port, "POST", path, {"Content-Type": content_type,
                                                             "Content-Length": str(256 * MiB), **token})
            sock.sendall(b"x" * 16384)  # 16 KiB of the 256 MiB it announced
            status, headers, body = read_response(sock)
            assert status == 401 and "api_token" in body["message"], body
            assert headers["connection"] == "close" and closed_by_server(sock)  # it does not wait for the rest
            sock.close()
    # negative control: a body the server accepts is waited for, not answered early
    sock = open_request(server.port, "POST", "/tailored-gen/projects", {"Content-Type": "application/json",
                                                                         "Content-Length": "1000", "api_token": TOKEN})
    sock.sendall(b'{"project_name": ')
    sock.settimeout(0.5)
    with pytest.raises(socket.timeout):
        sock.recv(1)
    sock.close()


def test_json_bodies_over_the_cap_are_413_naming_it(served):
    _, api, _, _, _ = served
    big = json.dumps({**PROJECT, "project_description": "x" * 70_000}).encode()  # > 64 KiB
    for response in (api.post("/projects", content=big, headers={"Content-Type": "application/json"}),
                     api.post("/projects", content=iter([big[:40_000], big[40_000:]]),  # chunked: no Content-Length
                              headers={"Content-Type": "application/json"})):
        assert response.status_code == 413, response.text
        assert response.json()["code"] == "body_too_large"
        assert "64 KiB" in response.json()["message"] and "--max-json-kb" in response.json()["message"]
        assert response.headers["X-Request-ID"]
    small = json.dumps({**PROJECT, "project_description": "x" * 9_000}).encode()
    assert api.post("/projects", content=iter([small]), headers={"Content-Type": "application/json"}).status_code == 201


def test_uploads_over_the_cap_are_413_and_leave_no_temporary_file(served):
    server, api, dataset, spool, folder = served
    path = f"/tailored-gen/datasets/{dataset}/images"
    multipart = {"Content-Type": "multipart/form-data; boundary=bnd", "api_token": TOKEN}

    # announced too large: refused from the Content-Length, nothing read
    sock = open_request(server.port, "POST", path, {**multipart, "Content-Length": str(3 * MiB)})
    status, _, body = read_response(sock)
    sock.close()
    assert status == 413 and body["code"] == "upload_too_large" and "1 MiB" in body["message"], body

    # streamed without a Content-Length: the parser spools it to a temporary file ...
    sock = open_request(server.port, "POST", path, {**multipart, "Transfer-Encoding": "chunked"})
    assert send_chunked(sock, multipart_head() + bytes(int(1.5 * MiB)))
    wait_until(lambda: temporary_files(server.process.pid, spool), 20, "the upload to be spooled")  # the check sees it
    # ... until the body passes the limit (1 MiB and the form's fields): 413, and the file is gone
    send_chunked(sock, bytes(MiB // 2 + 2**16))  # just past it: the server reads all that was sent
    status, headers, body = read_response(sock)
    sock.close()
    assert status == 413 and body["code"] == "upload_too_large" and "--max-upload-mb" in body["message"], body
    assert headers["connection"] == "close"
    wait_until(lambda: not temporary_files(server.process.pid, spool), 10, "the spooled upload to be deleted")

    # a file over the limit inside a body under it: refused while it is copied, its staging file deleted
    response = api.post(f"/datasets/{dataset}/images", files={"file": ("big.png", bytes(int(1.5 * MiB)))})
    assert response.status_code == 413 and response.json()["code"] == "upload_too_large", response.text
    assert not [p.name for p in folder.iterdir()]
    wait_until(lambda: not temporary_files(server.process.pid, spool), 10, "the spooled upload to be deleted")


@pytest.mark.slow
def test_png_bombs_are_refused_from_the_header_and_decodes_queue_with_bounded_memory(served):
    server, api, dataset, _, _ = served
    pid = server.process.pid

    def six(image: bytes) -> list[httpx.Response]:
        def upload(index):
            return api.post(f"/datasets/{dataset}/images", files={"file": (f"{index}.png", image)})
        with ThreadPoolExecutor(6) as pool:
            return list(pool.map(upload, range(6)))

    bomb = sixteen_bit_png(8000, 8000)  # 64 MP, 128 MB decoded; a whole-image float conversion took 1.7 GB
    assert len(bomb) < 200_000
    responses = []
    growth = peak_rss_growth_mb(pid, lambda: responses.extend(six(bomb)))
    assert [r.status_code for r in responses] == [413] * 6, [r.text for r in responses]
    assert all("--max-image-pixels" in r.json()["message"] for r in responses)
    assert growth < 40, f"six refused bombs raised the server's peak memory by {growth:.0f} MB"

    # under the pixel cap, six at once decode one at a time (--max-concurrent-decodes 1): 2500x2500
    # 16-bit is 6.25 MP, and one decode is bounded by ~10 bytes per pixel (62 MB)
    image = sixteen_bit_png(2500, 2500)
    assert api.post(f"/datasets/{dataset}/images", files={"file": ("first.png", image)}).status_code == 201  # warm
    responses.clear()
    growth = peak_rss_growth_mb(pid, lambda: responses.extend(six(image)))
    assert [r.status_code for r in responses] == [201] * 6, [r.text for r in responses]
    assert growth < 62 + 40, f"six uploads of 6.25 MP raised the server's peak memory by {growth:.0f} MB"


def test_the_decode_queue_runs_one_at_a_time_and_then_refuses():
    decoder = DecodeQueue(1, queue=1)
    entered, release = threading.Event(), threading.Event()

    def hold():
        entered.set()
        release.wait(10)
        return threading.current_thread().name

    with ThreadPoolExecutor(2) as callers:
        first = callers.submit(decoder.run, hold)
        assert entered.wait(10)
        second = callers.submit(decoder.run, threading.current_thread)  # queued behind the first
        time.sleep(0.2)
        assert not second.done()
        with pytest.raises(RateLimitedError):  # one running, one waiting: the queue is full
            decoder.run(threading.current_thread)
        release.set()
        assert second.result(10).name == first.result(10)  # both ran on the decoder's one thread
    decoder.stop()


# ---- in-process servers -----------------------------------------------------------------------------


def tiny_png(seed: int) -> bytes:
    from io import BytesIO

    from PIL import Image
    out = BytesIO()
    Image.new("RGB", (64, 64), (seed * 20 % 256, 90, 160)).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.slow
def test_a_dataset_completion_holds_no_lock_while_its_preflight_runs(tmp_path, monkeypatch):
    checking, real = threading.Event(), datasets.validate_dataset

    def slow_preflight(*args, **kwargs):  # stands for 60 large images: the database must not wait for it
        checking.set()
        time.sleep(2)
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "validate_dataset", slow_preflight)
    with ThreadServer(settings_for(tmp_path, tmp_path / "base-not-needed")) as server:
        api, other = client(server.url), client(server.url, OTHER_TOKEN)
        project = api.post("/projects", json=PROJECT).json()["id"]
        dataset = api.post("/datasets", json={"project_id": project, "name": "d", "training_version": "fibo"}).json()
        captions = [row["caption"] for row in sample_rows()]
        for index in range(12):
            caption = captions[index % len(captions)]
            response = api.post(f"/datasets/{dataset['id']}/images", files={"file": (f"{index}.png", tiny_png(index))},
                                data={"caption": caption if isinstance(caption, str) else json.dumps(caption)})
            assert response.status_code == 201, response.text
        completion = ThreadPoolExecutor(1).submit(api.put, f"/datasets/{dataset['id']}", json={"status": "completed"})
        assert checking.wait(30)
        for call in (lambda: other.get("/projects"), lambda: other.post("/projects", json=PROJECT),
                     lambda: api.get(f"/datasets/{dataset['id']}")):
            started = time.monotonic()
            response = call()
            assert response.status_code in (200, 201), response.text
            assert time.monotonic() - started < 1.0, f"{response.request.method} waited for the completion"
        assert not completion.done()  # the answers above came while the preflight was still running
        done = completion.result(timeout=60)
        assert done.status_code == 200 and done.json()["status"] == "completed", done.text
        assert done.json()["images_count"] == 12


def test_writes_answer_503_once_the_data_directory_is_gone(tmp_path):
    with ThreadServer(settings_for(tmp_path, tmp_path / "base-not-needed")) as server:
        api = client(server.url)
        assert api.post("/projects", json=PROJECT).status_code == 201
        data_dir = tmp_path / "data"
        for gone in (lambda: shutil.rmtree(data_dir), data_dir.mkdir):  # removed, then replaced by an empty folder
            gone()
            response = api.post("/projects", json=PROJECT)
            assert response.status_code == 503, response.text
            body = response.json()
            assert body["code"] == "storage_unavailable" and "nothing was written" in body["message"]
            assert api.put("/datasets/1", json={"name": "x"}).status_code == 503
            assert httpx.get(f"{server.url}/healthz").status_code == 503
        assert not any(data_dir.iterdir())  # no write recreated anything


def test_bad_link_signatures_count_against_the_rate_limit(tmp_path):
    with ThreadServer(settings_for(tmp_path, tmp_path / "base-not-needed", rate_limit_per_minute=3)) as server:
        link = f"{server.url}/tailored-gen/files/generations/{'0' * 32}/00.png?expires=9999999999&signature=forged"
        assert [httpx.get(link).status_code for _ in range(3)] == [401] * 3
        refused = httpx.get(link)
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1, refused.text
        assert "client address" in refused.json()["message"]
        assert client(server.url).get("/projects").status_code == 200  # a token's own rate is not spent
