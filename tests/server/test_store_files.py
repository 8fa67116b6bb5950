"""The store-file fast path: which requests it answers itself, and that its answers are the route's."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.deps import ReadAccessCache
from server.routers.store_files import StoreFileFastPath
from server.settings import Settings
from tests.server.conftest import Api

DATA = bytes(range(256)) * 40  # 10,240 bytes

# (key, extra headers) the fast path answers itself ...
ANSWERED = [
    ("segments/blob", {}),
    ("segments/blob", {"Range": "bytes=0-0"}),
    ("segments/blob", {"Range": "bytes=100-"}),
    ("segments/blob", {"Range": "bytes=-17"}),
    ("segments/blob", {"Range": "bytes=10000-20000"}),
    ("segments/blob", {"Range": "bytes=-99999"}),
    ("zarr.json", {"Range": " bytes=2-5 "}),
]
# ... and those it leaves to the route.
PASSED_ON = [
    ("segments/blob", {"Range": "bytes=10240-"}),  # 416
    ("segments/blob", {"Range": "bytes=-0"}),  # 416
    ("segments/blob", {"Range": "bytes=0-1,5-6"}),  # multipart
    ("segments/blob", {"Range": "bytes=9-3"}),  # unsatisfiable as written: the whole file
    ("segments/blob", {"Range": "items=0-1"}),
    ("segments/blob", {"Range": "bytes=0-1", "If-Range": '"x"'}),
    ("segments/blob", {"If-None-Match": "*"}),
    ("segments/missing", {}),  # 404
    ("segments", {}),  # a directory: 404
    ("segments//blob", {}),  # 400
    ("a/%2e%2e/x", {}),  # 400
]
# Hostile requests the route answers with a 4xx (not a 500), and the status it gives.
HOSTILE = [
    ("segments/" + "x" * 300, {}, 404),  # a name too long for the file system
    ("segments/blob", {"Range": "bytes=0-" + "9" * 5000}, 416),  # past any file, and past int()'s digit limit
    ("segments/blob", {"Range": "bytes=" + "1" * 19 + "-"}, 416),
    ("segments/blob", {"Range": "bytes=0-1," + "2" * 30 + "-"}, 416),
]
PASSED_ON += [(name, extra) for name, extra, _ in HOSTILE]


def _prepare(api: Api) -> tuple[str, str]:
    """A team key and the id of a store of that team holding `segments/blob` and `zarr.json`."""
    key = api.team("alpha")
    corpus = api.upload(key, b"some words\n").json()["id"]
    store_id = api.capture(key, corpus).json()["store_id"]
    root = api.settings.stores_dir / store_id
    (root / "segments").mkdir(parents=True)
    (root / "segments" / "blob").write_bytes(DATA)
    (root / "zarr.json").write_text('{"zarr_format": 3}')
    return key, store_id


def _comparable(response) -> tuple:
    headers = {k: v for k, v in response.headers.items() if k not in ("date", "server")}
    return response.status_code, headers, response.content


def test_fast_path_answers_exactly_as_the_route(api: Api, make_settings: Callable[..., Settings]) -> None:
    key, store_id = _prepare(api)
    # The same data dir and database, without the access cache: every request goes to the route.
    with TestClient(create_app(make_settings(read_cache_s=0))) as route_only:
        for name, extra in ANSWERED:
            url, headers = f"/v1/stores/{store_id}/zarr/{name}", {**api.auth(key), **extra}
            expected = _comparable(route_only.get(url, headers=headers))
            api.client.get(url, headers=headers)  # the first read checks access and caches it
            assert _comparable(api.client.get(url, headers=headers)) == expected, (name, extra)


def test_hostile_requests_get_a_client_error(api: Api) -> None:
    key, store_id = _prepare(api)
    for name, extra, status in HOSTILE:
        for method in ("GET", "HEAD"):  # the second GET goes through the fast path's checks, too
            for _ in range(2):
                r = api.client.request(method, f"/v1/stores/{store_id}/zarr/{name}", headers={**api.auth(key), **extra})
                assert r.status_code == status, (method, name[:40], extra.get("Range", "")[:40], r.text[:200])


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_fast_path_answers_only_checked_local_reads(api: Api) -> None:
    key, store_id = _prepare(api)
    passed_on: list[str] = []

    async def route(scope, receive, send) -> None:
        passed_on.append(scope["path"])
        await send({"type": "http.response.start", "status": 599, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    cache = ReadAccessCache(ttl_s=60)
    client = TestClient(StoreFileFastPath(route, api.settings, cache))
    url, auth = f"/v1/stores/{store_id}/zarr/segments/blob", api.auth(key)
    assert client.get(url, headers=auth).status_code == 599  # access not checked yet
    cache.remember(key, store_id)
    for name, extra in ANSWERED:
        r = client.get(f"/v1/stores/{store_id}/zarr/{name}", headers={**auth, **extra})
        assert r.status_code in (200, 206), (name, extra)
    assert passed_on == [f"/v1/stores/{store_id}/zarr/segments/blob"]
    passed_on.clear()
    for name, extra in PASSED_ON:
        assert client.get(f"/v1/stores/{store_id}/zarr/{name}", headers={**auth, **extra}).status_code == 599
    assert client.head(url, headers=auth).status_code == 599
    assert client.get(url, headers=api.auth("another-key")).status_code == 599
    assert client.get(url, headers={"Authorization": f"Basic {key}"}).status_code == 599
    assert client.get("/v1/stores/other/zarr/segments/blob", headers=auth).status_code == 599
    remote = api.settings.model_copy(update={"storage_root": "s3://bucket/stores"})
    assert TestClient(StoreFileFastPath(route, remote, cache)).get(url, headers=auth).status_code == 599
    assert len(passed_on) == len(PASSED_ON) + 5


@pytest.mark.parametrize("swap", ["file", "directory"])
def test_a_link_swapped_in_after_a_read_cannot_lead_out_of_the_store(
    api: Api, make_settings: Callable[..., Settings], swap: str
) -> None:
    key, store_id = _prepare(api)
    root = api.settings.stores_dir / store_id
    outside = api.settings.data_dir / "outside"
    (outside / "segments").mkdir(parents=True)
    (outside / "segments" / "blob").write_bytes(b"secret" * 100)
    url, auth = f"/v1/stores/{store_id}/zarr/segments/blob", api.auth(key)
    # An access check that outlives the test: every read after the first is the fast path's.
    with TestClient(create_app(make_settings(read_cache_s=600))) as client:
        for _ in range(3):  # the route checks access; then the fast path remembers where the key resolves to
            assert client.get(url, headers=auth).content == DATA
        (root / "segments" / "blob").unlink()
        if swap == "file":
            (root / "segments" / "blob").symlink_to(outside / "segments" / "blob")
        else:
            (root / "segments").rmdir()
            (root / "segments").symlink_to(outside / "segments", target_is_directory=True)
        for headers in ({}, {"Range": "bytes=0-5"}):
            r = client.get(url, headers={**auth, **headers})
            assert r.status_code == 400 and b"secret" not in r.content, (r.status_code, r.content[:40])
            assert "outside the store" in r.json()["detail"]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_range_errors_are_json(api: Api) -> None:
    key, store_id = _prepare(api)
    url = f"/v1/stores/{store_id}/zarr/segments/blob"
    # (Range, status): malformed ones that Starlette's FileResponse parses, and one it finds past the end.
    for rng, status in [("items=0-1", 400), ("bytes=9-3", 400), ("bytes", 400), ("bytes=x-y", 400),
                        ("bytes=5-6,99999-", 416)]:
        for method in ("GET", "HEAD"):
            r = api.client.request(method, url, headers={**api.auth(key), "Range": rng})
            assert r.status_code == status and r.headers["content-type"] == "application/json", (method, rng, r)
            if method == "GET":
                assert rng in r.json()["detail"], r.text
    assert api.client.get(url, headers={**api.auth(key), "Range": "bytes=99999-"}).headers["content-range"] == (
        f"bytes */{len(DATA)}")
