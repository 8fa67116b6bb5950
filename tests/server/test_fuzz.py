"""A bounded schemathesis run over the OpenAPI schema of a live server: whatever the input,
no response is a 500 (errors are 4xx JSON). Authenticated as a team with an uploaded corpus,
so the fuzzing reaches past the 401s."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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
