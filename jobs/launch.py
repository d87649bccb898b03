"""Wiring shared by the job entrypoints: command line -> config, and the Ray connection.

Usage of every job: `python jobs/<job>.py [config.yaml] [key=value ...]`.

With RAY_ADDRESS set (as `ray job submit` does), a job joins that cluster. Without, it starts an
embedded local Ray bound to 127.0.0.1 whose files live in a short temp dir (unix socket paths are
capped at 107 bytes), removed on exit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import Iterator, TypeVar

from recalign.config import ConfigError, load_config, option

T = TypeVar("T")


@dataclass
class RayConfig:
    num_cpus: int = option(0, "embedded Ray's logical CPUs; 0 = max(4, cores) so 2 workers + actors fit")
    object_store_mb: int = option(1024, "embedded Ray's object store")
    dashboard: bool = option(True, "embedded Ray's dashboard on 127.0.0.1 (Ray's State API, used by Train, needs it)")


def parse_args(cls: type[T], argv: list[str] | None = None) -> T:
    """`[config.yaml] [key=value ...]` -> config; a bad file or key exits with a one-line error."""
    argv = sys.argv[1:] if argv is None else argv
    path = None
    if argv and "=" not in argv[0]:
        path, argv = argv[0], argv[1:]
    try:
        return load_config(cls, path, argv)
    except ConfigError as err:
        raise SystemExit(f"config error: {err}") from None


# Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when it is imported: "0" makes every Ray process bind
# to 127.0.0.1. So these are set when this module is imported, before anything imports ray, and
# only when no cluster address is given (a driver joining a cluster needs a reachable IP).
LOCAL_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",  # nothing is downloaded at run time
}
if not os.environ.get("RAY_ADDRESS"):
    for _key, _value in LOCAL_ENV.items():
        os.environ.setdefault(_key, _value)


@contextlib.contextmanager
def ray_session(cfg: RayConfig) -> Iterator[None]:
    """Join the cluster at RAY_ADDRESS, or run an embedded local Ray for the block."""
    import ray

    address = os.environ.get("RAY_ADDRESS", "")
    if ray.is_initialized():
        yield
        return
    if address:
        ray.init(address=address, log_to_driver=True)
        try:
            yield
        finally:
            ray.shutdown()
        return
    tmp = tempfile.mkdtemp(prefix="rcray-", dir="/tmp" if os.path.isdir("/tmp") else None)
    saved = {k: os.environ.get(k) for k in [*LOCAL_ENV, "RAY_TMPDIR", "HOME", "RAY_API_SERVER_ADDRESS"]}
    os.environ.update(LOCAL_ENV)
    dashboard_port = _free_port()
    if cfg.dashboard:
        # Ray Train's controller queries the State API with no address; with a second Ray on this machine it
        # cannot tell which is ours and fails. Workers inherit this variable, which the State API reads first.
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
    # In case ray was imported before this module set the variable (see LOCAL_ENV).
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ["RAY_TMPDIR"] = tmp
    os.environ["HOME"] = os.path.join(tmp, "home")
    os.makedirs(os.environ["HOME"], exist_ok=True)
    try:
        ray.init(
            address="local",
            num_cpus=cfg.num_cpus or max(4, os.cpu_count() or 1),
            object_store_memory=cfg.object_store_mb * 1024 * 1024,
            include_dashboard=cfg.dashboard,
            dashboard_host="127.0.0.1",
            dashboard_port=dashboard_port,
            _node_ip_address="127.0.0.1",
            _temp_dir=tmp,
            log_to_driver=True,
        )
        yield
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(tmp, ignore_errors=True)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
