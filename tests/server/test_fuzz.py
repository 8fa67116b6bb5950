"""A bounded schemathesis run over the OpenAPI schema of a live server: whatever the input,
no response is a 500 (errors are 4xx JSON). Authenticated as a team with an uploaded corpus,
so the fuzzing reaches past the 401s."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.server.test_e2e import auth, make_team, serve, upload

_state: dict[str, str] = {}


@pytest.fixture(scope="module")
def live_schema(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path, corpus_slice: Path) -> Iterator:
    # No worker: captures the fuzzer requests stay queued instead of running.
    with serve(tmp_path_factory.mktemp("fuzz"), [f"tiny={tiny_teacher_dir}"], "--no-worker") as client:
        _state["key"] = make_team(client, "fuzzers")
        upload(client, _state["key"], corpus_slice)
        yield schemathesis.openapi.from_url(f"{str(client.base_url).rstrip('/')}/openapi.json")


def test_no_server_errors(live_schema) -> None:
    operations = [result.ok() for result in live_schema.get_all_operations()]
    assert len(operations) >= 15
    statuses: list[int] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=8, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def no_500(case) -> None:
            response = case.call(headers=auth(_state["key"]), timeout=30)
            statuses.append(response.status_code)
            assert response.status_code < 500, (case.method, case.formatted_path, response.status_code, response.text)

        no_500()
    # The run reached real work, not only refusals.
    assert any(200 <= s < 300 for s in statuses) and any(400 <= s < 500 for s in statuses)


# Python's JSON parser reads these as floats (the last overflows to inf), but they are not JSON.
NON_FINITE = ("NaN", "Infinity", "-Infinity", "1e400")


def test_non_finite_numbers_in_json_bodies_are_a_422(live_schema) -> None:
    """Every route that takes a JSON body, with each literal as the whole body, in a list, and as the
    value of each of its fields: a JSON 422, on one keep-alive connection that stays usable."""
    raw = live_schema.raw_schema
    sent = 0
    with httpx.Client(base_url=live_schema.get_base_url(), headers=auth(_state["key"]), timeout=30) as client:
        for path, operations in raw["paths"].items():
            for method, operation in operations.items():
                body_schema = operation.get("requestBody", {}).get("content", {}).get("application/json", {})
                if not body_schema:
                    continue
                ref = body_schema["schema"]["$ref"].rsplit("/", 1)[1]
                fields = raw["components"]["schemas"][ref]["properties"]
                url = re.sub(r"\{[^}]+\}", "x", path)
                for literal in NON_FINITE:
                    for body in (literal, f"[{literal}]", *(f'{{"{f}": {literal}}}' for f in fields)):
                        r = client.request(method, url, content=body, headers={"Content-Type": "application/json"})
                        assert r.status_code == 422, (method, path, body, r.status_code, r.text)
                        assert "not a JSON number" in r.text or "too large" in r.text, r.json()["detail"]
                        sent += 1
        assert client.get("/healthz").status_code == 200
    assert sent >= 3 * len(NON_FINITE) * 3
