"""Bulk upload over HTTP: a zip of 16-px images (from a server path under --import-root, or an http
URL) lands in an advanced draft dataset with the zip's captions, through the single-upload checks
(bad images are listed per file); a malicious zip (`../` names, a symlink, a 10,000:1 bomb) is
refused as a whole with nothing written anywhere, and server paths need the operator's flag."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import stat
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image as PILImage

from service_helpers import ThreadServer, client, settings_for, wait_until
from tailoredgen_train.service.imports import ZipRefusedError, check_zip

pytestmark = pytest.mark.both_databases  # on SQLite and again on PostgreSQL

ENGINE = "data: {resolution: 64, min_side: 16, batch_size: 1, num_workers: 0}\n"


def caption(text: str) -> str:
    return json.dumps({"short_description": text})


def png(color: str, side: int = 16) -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", (side, side), color).save(buffer, "PNG")
    return buffer.getvalue()


def make_zip(members: dict[str, bytes], *, symlinks: dict[str, str] | None = None,
             compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        for name, target in (symlinks or {}).items():
            link = zipfile.ZipInfo(name)
            link.create_system = 3  # Unix, so that the mode bits below mean what they say
            link.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(link, target)
    return buffer.getvalue()


GOOD = {"a.png": png("red"), "a.txt": caption("a red square").encode(),
        "sub/b.png": png("blue"), "sub/metadata.jsonl": (json.dumps({"file_name": "b.png",
                                                                     "caption": caption("a blue square")}) + "\n").encode(),
        "c.png": b"not an image", "tiny.png": png("green", side=8)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_fibo_base, service_database):
    root = tmp_path_factory.mktemp("bulk")
    imports = root / "imports"
    imports.mkdir()
    engine = root / "engine16.yaml"
    engine.write_text(ENGINE)
    settings = settings_for(root, tiny_fibo_base, engine_configs={"fibo": str(engine)}, import_roots=[imports])
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(imports))
    handler.log_message = lambda *args: None
    web = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    with ThreadServer(settings) as server, client(server.url) as api:
        project = api.post("/projects", json={"project_name": "p", "ip_medium": "illustration",
                                              "ip_type": "other"}).json()["id"]
        yield {"root": root, "imports": imports, "server": server, "api": api, "project": project,
               "web": f"http://127.0.0.1:{web.server_address[1]}"}
    web.shutdown()


def advanced_dataset(setup, upload_type: str = "advanced") -> int:
    response = setup["api"].post("/datasets", json={"project_id": setup["project"], "name": "zip",
                                                     "training_version": "fibo", "upload_type": upload_type})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def settled_status(api, dataset_id: int) -> dict:
    def ended():
        body = api.get(f"/datasets/{dataset_id}/images/bulk-upload/status").json()
        return body if body["status"] in ("completed", "failed") else None
    return wait_until(ended, 60, f"the bulk upload of dataset {dataset_id}")


def fingerprint(folder: Path) -> dict[str, str]:
    """Every file under `folder` (the database's own files aside) and its content's hash."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*")
            if p.is_file() and "tailoredgen.sqlite3" not in p.name}


def test_a_zip_on_the_server_lands_with_its_captions_and_each_bad_image_is_listed(setup):
    api, dataset_id = setup["api"], advanced_dataset(setup)
    (setup["imports"] / "good.zip").write_bytes(make_zip(GOOD))
    accepted = api.post(f"/datasets/{dataset_id}/images/bulk-upload",
                        json={"zip_url": str(setup["imports"] / "good.zip")})
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["status"] == "pending"
    status = settled_status(api, dataset_id)
    assert (status["status"], status["done"], status["failed"], status["total_processed"],
            status["progress_percentage"]) == ("completed", 2, 2, 4, 100)
    assert {f["filename"]: f["error_code"] for f in status["failed_images"]} == {
        "c.png": "unsupported_image", "tiny.png": "resolution_too_low"}  # the single upload's own checks
    images = {i["image_name"]: i for i in api.get(f"/datasets/{dataset_id}/images").json()}
    assert {name: json.loads(i["caption"]) for name, i in images.items()} == {
        "a.png": {"short_description": "a red square"}, "sub/b.png": {"short_description": "a blue square"}}
    stored = sorted(p.name for p in setup["server"].service.dataset_dir(dataset_id).iterdir())
    assert stored == sorted(f"{i['id']:08d}.png" for i in images.values())  # server names, no staging left
    # Bria's rules: one zip per dataset, into an advanced dataset
    again = api.post(f"/datasets/{dataset_id}/images/bulk-upload", json={"zip_url": str(setup["imports"] / "good.zip")})
    assert again.status_code == 409, again.text
    basic = advanced_dataset(setup, "basic")
    refused = api.post(f"/datasets/{basic}/images/bulk-upload", json={"zip_url": str(setup["imports"] / "good.zip")})
    assert refused.status_code == 400 and "upload_type advanced" in refused.json()["message"]
    assert api.get(f"/datasets/{basic}/images/bulk-upload/status").status_code == 404


def test_a_zip_at_an_http_url_is_fetched_and_stored(setup):
    api, dataset_id = setup["api"], advanced_dataset(setup)
    (setup["imports"] / "web.zip").write_bytes(make_zip({"x/one.png": png("red"), "x/one.txt":
                                                         caption("one").encode()}))
    accepted = api.post(f"/datasets/{dataset_id}/images/bulk-upload", json={"zip_url": f"{setup['web']}/web.zip"})
    assert accepted.status_code == 202, accepted.text
    assert settled_status(api, dataset_id)["done"] == 1
    assert [i["image_name"] for i in api.get(f"/datasets/{dataset_id}/images").json()] == ["x/one.png"]
    missing = advanced_dataset(setup)
    api.post(f"/datasets/{missing}/images/bulk-upload", json={"zip_url": f"{setup['web']}/nothing.zip"})
    failed = settled_status(api, missing)
    assert failed["status"] == "failed" and "HTTP 404" in failed["error"]["message"]


def bomb() -> bytes:
    data = make_zip({"ok.png": png("red"), "bomb.png": b"\0" * (8 * 2**20)}, compression=zipfile.ZIP_BZIP2)
    info = zipfile.ZipFile(io.BytesIO(data)).getinfo("bomb.png")
    assert info.file_size >= 10_000 * info.compress_size  # what the test claims: a 10,000:1 member
    return data


MALICIOUS = {
    "dot-dot": (lambda: make_zip({"ok.png": png("red"), "../escaped.png": png("blue")}), "unsafe name"),
    "symlink": (lambda: make_zip({"ok.png": png("red")}, symlinks={"link.png": "/etc/passwd"}), "symbolic link"),
    "bomb": (bomb, "zip bomb"),
}


@pytest.mark.parametrize("kind", sorted(MALICIOUS))
def test_a_malicious_zip_is_refused_and_writes_nothing_anywhere(setup, kind):
    api, root = setup["api"], setup["root"]
    build, reason = MALICIOUS[kind]
    (setup["imports"] / f"{kind}.zip").write_bytes(build())
    by_path, by_url = advanced_dataset(setup), advanced_dataset(setup)
    before = fingerprint(root)
    refused = api.post(f"/datasets/{by_path}/images/bulk-upload", json={"zip_url": str(setup["imports"] /
                                                                                     f"{kind}.zip")})
    assert refused.status_code == 400 and reason in refused.json()["message"], refused.text
    assert api.post(f"/datasets/{by_url}/images/bulk-upload",  # fetched first, so refused in the background
                    json={"zip_url": f"{setup['web']}/{kind}.zip"}).status_code == 202
    failed = settled_status(api, by_url)
    assert failed["status"] == "failed" and failed["error"]["code"] == "zip_refused", failed
    assert reason in failed["error"]["message"]
    assert fingerprint(root) == before  # nothing written: not outside the dataset, not inside it either
    assert not list(root.rglob("escaped.png"))
    for dataset_id in (by_path, by_url):
        assert api.get(f"/datasets/{dataset_id}").json()["images_count"] == 0


def test_the_checks_can_fail_on_a_good_zip_only_by_its_limits():
    # negative control: the same members without the malicious one pass check_zip
    plan = check_zip(zipfile.ZipFile(io.BytesIO(make_zip(GOOD))), max_images=10, max_member_bytes=2**20,
                     max_total_bytes=2**24)
    assert sorted(i.filename for i in plan.images) == ["a.png", "c.png", "sub/b.png", "tiny.png"]
    with pytest.raises(ZipRefusedError, match="at most 3"):
        check_zip(zipfile.ZipFile(io.BytesIO(make_zip(GOOD))), max_images=3, max_member_bytes=2**20,
                  max_total_bytes=2**24)
    with pytest.raises(ZipRefusedError, match="expands to more than"):
        check_zip(zipfile.ZipFile(io.BytesIO(make_zip(GOOD))), max_images=10, max_member_bytes=2**20,
                  max_total_bytes=100)


def test_server_paths_need_the_operator_s_flag_and_stay_inside_its_folders(setup, tmp_path, tiny_fibo_base):
    api, imports = setup["api"], setup["imports"]
    outside = tmp_path / "outside.zip"
    outside.write_bytes(make_zip(GOOD))
    (imports / "sneaky.zip").symlink_to(outside)
    dataset_id = advanced_dataset(setup)
    for zip_url, message in ((str(outside), "inside the server's import folders"),
                             (str(imports / "sneaky.zip"), "inside the server's import folders"),
                             ("../imports/good.zip", "inside the server's import folders"),
                             (f"file://{outside}", "file: scheme is not fetched"),
                             ("ftp://example.com/a.zip", "ftp: scheme is not fetched")):
        refused = api.post(f"/datasets/{dataset_id}/images/bulk-upload", json={"zip_url": zip_url})
        assert refused.status_code == 400, (zip_url, refused.text)
        assert refused.json()["errors"][0]["field_name"] == "zip_url" and message in refused.json()["errors"][0]["msg"]
    with ThreadServer(settings_for(tmp_path, tiny_fibo_base)) as bare, client(bare.url) as other:
        project = other.post("/projects", json={"project_name": "p", "ip_medium": "illustration",
                                                "ip_type": "other"}).json()["id"]
        dataset = other.post("/datasets", json={"project_id": project, "name": "d", "training_version": "fibo",
                                                "upload_type": "advanced"}).json()["id"]
        refused = other.post(f"/datasets/{dataset}/images/bulk-upload", json={"zip_url": str(outside)})
    assert refused.status_code == 400 and "serve --import-root DIR" in refused.json()["errors"][0]["msg"]
