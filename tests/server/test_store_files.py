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
