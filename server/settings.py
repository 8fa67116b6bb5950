"""Server settings: environment variables with the prefix `LOGITSTORE_`, overridden by CLI flags.

Everything the API process and the worker processes must agree on (data dir, database,
storage root, teachers) lives here, so that an embedded worker can be started with the
server's exact settings by passing them through the environment (`to_env`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from logitstore import storage

ENV_PREFIX = "LOGITSTORE_"


class Settings(BaseSettings):
    """One server's configuration. Unset paths derive from `data_dir`."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    data_dir: Path = Field(Path("logitstore-data"), description="corpora, stores and the SQLite database live here")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default SQLite (WAL) in DATA_DIR; postgresql://... to scale out"
    )
    storage_root: str | None = Field(
        None, description="where stores live: a directory (default DATA_DIR/stores) or s3://bucket/prefix"
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for an s3:// storage_root, e.g. endpoint_url, key, secret, client_kwargs",
    )
    max_upload_bytes: int = Field(2 * 1024**3, gt=0, description="largest corpus upload; larger ones get 413")
    admin_key: str | None = Field(None, description="bootstrap key that may create teams and keys")
    teachers: dict[str, str] = Field(
        default_factory=lambda: {"smollm2-135m": "smollm2-135m"},
        description="teachers this server offers: name -> model directory, .gguf file, hub id or alias",
    )
    gpus_per_job: int | None = Field(
        None, ge=0,
        description="GPUs a capture job uses: unset, the worker's CUDA device when it has one, else the CPU; 0: the "
        "CPU; 1: one GPU; N > 1: N rank processes, one per visible GPU (N CPU processes without CUDA). Workers on "
        "one box split its GPUs with CUDA_VISIBLE_DEVICES",
    )  # fmt: skip
    teacher_device_map: Literal["auto", "balanced", "sequential"] | None = Field(
        None,
        description="spread each teacher over the worker's visible GPUs, layer by layer (accelerate's placement, "
        "offloading what does not fit), for teachers larger than one GPU; one process per job",
    )
    embedded_worker: bool = Field(True, description="`serve` starts one worker process beside the API")
    heartbeat_s: float = Field(5.0, gt=0, description="how often a worker marks its running job alive")
    stale_after_s: float = Field(60.0, gt=0, description="a running job silent this long is reclaimed")
    poll_s: float = Field(1.0, gt=0, description="how often an idle worker looks for queued jobs")
    max_attempts: int = Field(3, ge=1, description="a job whose worker goes silent this many times is failed")
    read_cache_s: float = Field(
        2.0, ge=0, description="store file reads reuse a (key, store) access check this long; 0: check every read"
    )

    @field_validator("storage_root", mode="before")
    @classmethod
    def _root_as_text(cls, root: Any) -> Any:
        return os.fspath(root) if isinstance(root, os.PathLike) else root

    @field_validator("teachers")
    @classmethod
    def _some_teacher(cls, teachers: dict[str, str]) -> dict[str, str]:
        if not teachers:
            raise ValueError("at least one teacher must be offered")
        return teachers

    @model_validator(mode="after")
    def _one_way_to_use_gpus(self) -> Settings:
        if self.teacher_device_map and (self.gpus_per_job or 1) > 1:
            raise ValueError("teacher_device_map places one teacher over the GPUs; gpus_per_job > 1 runs one "
                             "teacher per GPU: give one of them")
        return self

    @model_validator(mode="after")
    def _beats_within_the_lease(self) -> Settings:
        # A worker stops when no beat landed for stale_after_s / 2 (its lease; server/worker.py).
        if self.heartbeat_s >= self.stale_after_s / 2:
            raise ValueError(f"heartbeat_s ({self.heartbeat_s:g}) must be below half of stale_after_s "
                             f"({self.stale_after_s:g}): a worker's lease on its job is stale_after_s / 2")
        return self

    @property
    def db_url(self) -> str:
        """The database URL, with PostgreSQL pinned to the psycopg 3 driver that is installed."""
        url = self.database_url or f"sqlite:///{self.data_dir.resolve() / 'logitstore.db'}"
        for prefix in ("postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url.removeprefix(prefix)
        return url

    @property
    def stores_local(self) -> bool:
        """Stores live in a local (or network-mounted) directory, not behind a URL."""
        return self.storage_root is None or storage.is_local(self.storage_root)

    @property
    def stores_dir(self) -> Path:
        """The directory of the stores (local storage roots only)."""
        if not self.stores_local:
            raise ValueError(f"storage root {self.storage_root} is not a local directory")
        root = storage.local_path(self.storage_root) if self.storage_root else self.data_dir / "stores"
        return root.resolve()

    def store_url(self, store_id: str) -> str:
        """Where store `store_id` lives: an absolute path, or a URL under an s3:// root."""
        return storage.join(self.stores_dir if self.stores_local else self.storage_root, store_id)

    @property
    def corpora_dir(self) -> Path:
        return (self.data_dir / "corpora").resolve()

    @property
    def device(self) -> str:
        """What the worker loads teachers on: "auto" (CUDA when present) unless gpus_per_job says."""
        return {None: "auto", 0: "cpu", 1: "cuda"}.get(self.gpus_per_job, "auto")

    def to_env(self) -> dict[str, str]:
        """These settings as `LOGITSTORE_*` variables, for a worker process started by the server."""
        env = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            text = json.dumps(value) if isinstance(value, dict | bool) else str(value)
            env[ENV_PREFIX + name.upper()] = text
        return env
