"""`logitstore-server`: run the API (with an embedded worker) or extra workers.

    logitstore-server serve  [--host 127.0.0.1 --port 8000 --data-dir DIR ...]
    logitstore-server worker [--data-dir DIR --database-url URL ...]

Every setting also reads from `LOGITSTORE_<NAME>` environment variables; flags win.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError

from logitstore.errors import LogitStoreError
from server.settings import Settings


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings(**_overrides(args))
    except ValidationError as e:
        err = e.errors()[0]
        print(f"error: setting {'.'.join(map(str, err['loc']))}: {err['msg']}", file=sys.stderr)
        return 2
    try:
        return args.run(args, settings)
    except LogitStoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except DBAPIError as e:
        reason = str(e.orig or e).strip().splitlines()[0]
        print(f"error: database {settings.db_url.split('@')[-1]}: {reason}", file=sys.stderr)
        return 1


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from server.app import EmbeddedWorker, create_app, prepare
    from server.db import Database

    if args.http_workers == 1:
        uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info")
        return 0
    # Several API processes (uvicorn's supervisor spawns them, each builds its app from the
    # environment, so the settings travel there). Work that must happen once happens here:
    # directories and tables are created before the processes could race to, and the one
    # embedded capture worker is started by this process rather than by every app's lifespan.
    db = Database(settings.db_url)
    prepare(settings, db)
    db.dispose()
    worker = EmbeddedWorker(settings) if settings.embedded_worker else None
    if worker is not None:
        worker.start()  # restarted here when it dies; the API processes' /healthz do not see it
    os.environ.update(settings.model_copy(update={"embedded_worker": False}).to_env())
    try:
        uvicorn.run("server.app:create_app", factory=True, workers=args.http_workers, host=args.host,
                    port=args.port, log_level="info")
    finally:
        if worker is not None:
            worker.stop()
    return 0


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    from server.worker import run_worker

    run_worker(settings)
    return 0


def _teacher(value: str) -> tuple[str, str]:
    name, sep, source = value.partition("=")
    if not sep or not name or not source:
        raise argparse.ArgumentTypeError(f"{value!r}: expected NAME=SOURCE, e.g. smollm2-135m=smollm2-135m")
    return name, source


def _json_object(value: str) -> dict:
    try:
        parsed = json.loads(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. {\"endpoint_url\": \"http://host:9000\"}")
    return parsed


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", help="corpora, stores and the SQLite database (env LOGITSTORE_DATA_DIR)")
    common.add_argument("--database-url", help="SQLAlchemy URL, e.g. postgresql://user@host/db (default: SQLite)")
    common.add_argument("--storage-root", help="where stores live: a directory (default DATA_DIR/stores) or "
                        "s3://bucket/prefix")
    common.add_argument("--storage-options", type=_json_object, metavar="JSON",
                        help='fsspec options for an s3:// root, e.g. \'{"endpoint_url": "http://minio:9000"}\'')
    common.add_argument("--teacher", action="append", type=_teacher, metavar="NAME=SOURCE",
                        help="offer a teacher (repeatable; replaces the default smollm2-135m)")
    common.add_argument("--gpus-per-job", type=int,
                        help="0: capture on CPU, 1: on the CUDA device, N > 1: on N GPUs, one process each "
                        "(default: CUDA when present, else CPU)")
    common.add_argument("--teacher-device-map", choices=("auto", "balanced", "sequential"),
                        help="spread each teacher over the visible GPUs (accelerate), for teachers larger than one GPU")
    common.add_argument("--stale-after-s", type=float, help="reclaim a running job silent this long")
    common.add_argument("--heartbeat-s", type=float, help="heartbeat period of a running job")

    parser = argparse.ArgumentParser(prog="logitstore-server", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", parents=[common], help="the HTTP API, with one embedded worker by default")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--admin-key", help="bootstrap key that may create teams (env LOGITSTORE_ADMIN_KEY)")
    serve.add_argument("--max-upload-bytes", type=int, help="largest corpus upload")
    serve.add_argument("--http-workers", type=int, default=1, choices=range(1, 65), metavar="N",
                       help="API processes answering requests (default 1); more serve store files to many "
                       "readers faster. Prometheus request metrics are then per process")
    serve.add_argument("--no-worker", dest="embedded_worker", action="store_false", default=None,
                       help="do not start the embedded worker (run `logitstore-server worker` elsewhere)")
    serve.set_defaults(run=_serve)
    worker = sub.add_parser("worker", parents=[common], help="claim and run capture jobs")
    worker.set_defaults(run=_worker)
    return parser


def _overrides(args: argparse.Namespace) -> dict:
    names = ("data_dir", "database_url", "storage_root", "storage_options", "gpus_per_job", "teacher_device_map",
             "stale_after_s", "heartbeat_s", "admin_key", "max_upload_bytes", "embedded_worker")
    out = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    if args.teacher:
        out["teachers"] = dict(args.teacher)
    return out


if __name__ == "__main__":
    sys.exit(main())
