"""Wiring shared by the job entrypoints: command line -> config, and the Ray connection.

Usage of every job: `python jobs/<job>.py [config.yaml] [key=value ...]`; `--help` lists the keys,
`print_config=true` prints the resolved config, and a mistake is one `error: ...` line (exit 2, see `run`).

With RAY_ADDRESS set (as `ray job submit` does), a job joins that cluster, ships the recalign its driver
imported to every worker (runtime_env py_modules) and checks that its storage is shared by every node
(recalign.cluster). Without, it starts an embedded local Ray bound to 127.0.0.1 whose files live in a
short temp dir (unix socket paths are capped at 107 bytes), removed on exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import yaml

from recalign.config import ConfigError, help_text, load_config, option, parse_yaml, to_dict
from recalign.errors import ClusterError, find_user_error, first_line

T = TypeVar("T")


@dataclass
class RayConfig:
    num_cpus: int = option(0, "embedded Ray's logical CPUs; 0 = max(4, cores) so 2 workers + actors fit")
    object_store_mb: int = option(1024, "embedded Ray's object store")
    dashboard: bool = option(True, "embedded Ray's dashboard on 127.0.0.1 (Ray's State API, used by Train, needs it)")


COMMON_HELP = """[every job]
  -h, --help          this text
  print_config=true   print the resolved config (defaults, then the YAML, then the overrides) and exit
  verbose=true        a traceback with every error, not just its one-line message
"""


def parse_args(cls: type[T], argv: list[str] | None = None, doc: str | None = None,
               resolve: Callable[[T], T] | None = None) -> T:
    """`[config.yaml] [key=value ...]` -> config.

    `-h`/`--help` prints every key (from the config dataclasses' help texts) and exits 0; `print_config=true`
    prints the resolved config as YAML and exits 0; `verbose=...` is read by `run`. `resolve` finishes the
    config (the pipeline fills in what one key sets for several stages) before it is printed or returned.
    A bad file or key raises ConfigError, which `run` prints as one line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(help_text(cls, _usage(doc)) + "\n" + COMMON_HELP, end="")
        raise SystemExit(0)
    flags = {k: v for k, _, v in (a.partition("=") for a in argv if a.split("=")[0] in ("print_config", "verbose"))}
    argv = [a for a in argv if a.split("=")[0] not in ("print_config", "verbose")]
    for arg in argv:
        if arg.startswith("-"):
            raise ConfigError(f"{arg}: unknown option; a job takes [config.yaml] [key=value ...] "
                              "(--help lists the keys)")
    path = None
    if argv and "=" not in argv[0]:
        path, argv = argv[0], argv[1:]
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(f"{arg!r}: expected key=value (only the first argument may be a config file)")
    cfg = load_config(cls, path, argv)
    if resolve is not None:
        cfg = resolve(cfg)
    if _truthy(flags.get("print_config", "false"), "print_config"):
        print(yaml.safe_dump(json.loads(json.dumps(to_dict(cfg), default=str)), sort_keys=False), end="")
        raise SystemExit(0)
    return cfg


def verbose_flag(argv: list[str] | None = None) -> bool:
    """Whether the command line says verbose=true."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return any(_truthy(a.partition("=")[2], "verbose") for a in argv if a.split("=")[0] == "verbose")


def run(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> None:
    """A job's `__main__`: run `main(argv)`; a UserError (a bad key, file, table, model, storage URI or
    cluster address, also when raised inside a Ray task or Train worker) is printed as one `error: ...` line
    on stderr and exits 2. `verbose=true` re-raises it with its traceback. Other errors are internal and
    keep their traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = verbose_flag(argv)
    try:
        main(argv)
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as err:
        user = find_user_error(err)
        if user is None or verbose:
            raise
        message = "; ".join(line.strip() for line in str(user).splitlines() if line.strip())
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


@contextlib.contextmanager
def console_to_log(log_uri: str, verbose: bool = False) -> Iterator[Callable[[str], None]]:
    """A quiet console: everything this process and Ray write to stdout/stderr (worker logs, progress bars,
    warnings, C++ log lines) goes to the file `log_uri` (a local temp copy uploaded on exit when it is remote),
    and the block gets `say`, which writes a line to the console as well as the log. `say(text, live=True)`
    shows a status line that the next one replaces, on a terminal only. With `verbose` nothing is redirected."""
    if verbose:
        yield lambda text, live=False: None if live else print(text, flush=True)
        return
    from recalign import io

    # Ray Data's progress bars would fill the log with carriage returns; the stage lines say what runs.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    remote = not io.is_local(log_uri)
    local = tempfile.mkstemp(prefix="recalign-", suffix=".log")[1] if remote else str(io.local_path(log_uri))
    os.makedirs(os.path.dirname(local), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    console = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    tty = console.isatty()
    showing = [False]  # a live status line is on the console

    def say(text: str, live: bool = False) -> None:
        if showing[0]:
            console.write("\r\033[K")
            showing[0] = False
        if live:
            if tty:
                console.write(text)
                console.flush()
                showing[0] = True
            return
        print(text, flush=True)
        console.write(text + "\n")
        console.flush()

    log = open(local, "a", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    try:
        yield say
    except BaseException:
        say(f"(the full log: {log_uri})")
        raise
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        console.close()
        log.close()
        if remote:
            with open(local, "rb") as handle:
                io.write_bytes(handle.read(), log_uri)
            os.remove(local)


def _truthy(text: str, key: str) -> bool:
    value = parse_yaml(text) if text.strip() else None
    if not isinstance(value, bool):
        raise ConfigError(f"overrides: {key}: expected true/false, got {text!r}")
    return value


def _usage(doc: str | None) -> str:
    text = (doc or "").strip("\n")
    return text or "usage: python jobs/<job>.py [config.yaml] [key=value ...]"


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
def ray_session(cfg: RayConfig, storage: dict[str, str] | None = None) -> Iterator[None]:
    """Join the cluster at RAY_ADDRESS, or run an embedded local Ray for the block.

    On a cluster the job's workers get this driver's recalign (`shipped_runtime_env`), and every path of
    `storage` ({config key: path or URI}, e.g. run.root) must be storage all nodes share (`check_storage`)."""
    import ray

    from recalign.cluster import check_driver_code, check_storage, shipped_runtime_env

    address = os.environ.get("RAY_ADDRESS", "")
    if address:
        _check_reachable(address)
    if ray.is_initialized():
        yield
        return
    if address:
        check_driver_code()
        runtime_env, override = shipped_runtime_env()
        if override:  # the job was submitted with py_modules of its own: the driver passes the union
            os.environ["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
        try:
            ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
        except (ConnectionError, ValueError, RuntimeError) as err:
            raise ClusterError(f"RAY_ADDRESS={address}: cannot join this Ray cluster ({first_line(err)}); start it "
                               "with `ray start --head` (or `ray up cluster.yaml`), or unset RAY_ADDRESS to run on an "
                               "embedded local Ray") from err
        try:
            check_storage(storage or {})
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


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A ClusterError at once when RAY_ADDRESS's host:port takes no connection (ray.init would retry for
    minutes). "auto" and addresses without a port are left to Ray."""
    import socket

    host, _, port = address.split("://")[-1].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return
    except OSError as err:
        raise ClusterError(f"RAY_ADDRESS={address}: nothing answers there ({err.strerror or err}); start the head with "
                           "`ray start --head` (or `ray up cluster.yaml`) and use its address, or unset RAY_ADDRESS "
                           "to run on an embedded local Ray") from err


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
