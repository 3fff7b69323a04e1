"""Submitting diffkd commands to a Ray cluster with Ray's Jobs SDK, and following them there.

A job is a shell command run on the cluster's head node. Its code travels as a zip of the project
(``runtime_env["working_dir"]``) or ships inside a container image (``image_uri``); its data never
travels: datasets, checkpoints and results live on storage every node can read (a shared mount or an
object store URI, see ``diffkd.runtime.storage``). The package is built from an allow-list, not by
exclusion: only the project's code, configs and tune spaces (`PACKAGE_PATHS`), and in them only code
and configuration files (`PACKAGE_SUFFIXES`, no hidden files, no links), so a salt, a clinical CSV or
an image left in the project tree never leaves the machine. `include` adds paths for a project of
one's own. The Jobs server accepts at most about 100 MiB per upload; a larger package is refused
with a list of its largest files.

Token-authenticated clusters (``RAY_AUTH_MODE=token`` on the cluster) get the token as an
``Authorization: Bearer`` header: from ``token=``, else ``RAY_AUTH_TOKEN``, else the file named by
``RAY_AUTH_TOKEN_PATH``; this is the header Ray's own clients send.
"""
from __future__ import annotations

import asyncio
import getpass
import logging
import os
import re
import secrets
import shlex
import shutil
import socket
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable
from urllib.parse import urlparse

import diffkd

log = logging.getLogger(__name__)

# What goes into the job package: these paths of the project (folders walked), and in them only
# files with these suffixes. Nothing else travels.
PACKAGE_PATHS: tuple[str, ...] = ("diffkd", "configs", "tune_spaces", "pyproject.toml", "setup.py", "setup.cfg",
                                  "MANIFEST.in")
PACKAGE_SUFFIXES: tuple[str, ...] = (".py", ".pyi", ".yaml", ".yml", ".toml", ".cfg", ".json", ".html", ".css",
                                     ".js", ".in", ".typed")
CONNECT_TIMEOUT_S = 10.0
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class JobsError(RuntimeError):
    """A job could not be submitted, found or followed; the message says what to do."""


# ---- connecting ---------------------------------------------------------------------------------
def resolve_address(address: str | None) -> str:
    """The Jobs API URL (http[s]://head:8265) from `address`, RAY_API_SERVER_ADDRESS or RAY_ADDRESS."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise JobsError("no cluster address: pass --address http://HEAD:8265 (the head's dashboard port) "
                        "or set RAY_ADDRESS")
    if address in ("auto", "local") or address.startswith("ray://"):
        raise JobsError(f"address {address!r} is not a Jobs API address: use the head's dashboard URL, "
                        "e.g. http://HEAD:8265")
    if "://" not in address:
        address = "http://" + address
    parsed = urlparse(address)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise JobsError(f"address {address!r} is not an http(s) URL like http://HEAD:8265")
    return address.rstrip("/")


def resolve_token(token: str | None = None) -> str | None:
    """The cluster token: explicit, else RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names."""
    if token:
        return token.strip()
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            return Path(path).expanduser().read_text().strip()
        except OSError as err:
            raise JobsError(f"RAY_AUTH_TOKEN_PATH={path} cannot be read: {err}") from err
    return None


def warn_plain_http_token(url: str, token: str | None) -> bool:
    """Warn (and return True) when a token would cross the network unencrypted: plain http to a host
    that is not this machine. Anyone on the path could read it and run code on the cluster."""
    parsed = urlparse(url)
    if not token or parsed.scheme != "http" or _is_loopback(parsed.hostname or ""):
        return False
    log.warning("sending the cluster token over plain http to %s: anyone on the network path can read it and "
                "run code on the cluster; use https (a TLS proxy in front of the dashboard) or an SSH tunnel "
                "(ssh -L 8265:localhost:8265 HEAD, then --address http://127.0.0.1:8265)", parsed.hostname)
    return True


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _probe(url: str) -> None:
    """Fail fast and plainly when nothing listens at the address (the SDK would otherwise hang or bury it)."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except socket.timeout:
        raise JobsError(f"cannot reach the Ray cluster at {url}: no answer within {CONNECT_TIMEOUT_S:.0f}s "
                        "(is the address right and the port open or forwarded?)") from None
    except OSError as err:
        raise JobsError(f"cannot reach the Ray cluster at {url}: {err.strerror or err} "
                        "(is the head running, is that its dashboard port?)") from None


def connect(address: str | None = None, token: str | None = None):
    """A checked `JobSubmissionClient`: reachable, and the token (if the cluster wants one) accepted."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    _probe(url)
    token = resolve_token(token)
    warn_plain_http_token(url, token)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(url, headers=headers)
    except AuthenticationError as err:
        if "401" in str(err) or "Missing" in str(err) or not token:
            raise JobsError(f"the Ray cluster at {url} requires a token: pass --token or set RAY_AUTH_TOKEN "
                            "(get it from the cluster's operator or `ray get-auth-token` on the head)") from None
        raise JobsError(f"the Ray cluster at {url} refused the token (403): check --token / RAY_AUTH_TOKEN") from None
    except ConnectionError as err:
        raise JobsError(f"cannot reach the Ray Jobs API at {url}: {err}") from None
    except RuntimeError as err:  # e.g. a version check failing on a non-Ray server
        raise JobsError(f"{url} does not look like a Ray dashboard: {err}") from None


# ---- packaging ----------------------------------------------------------------------------------
def project_root() -> Path:
    """The source tree this diffkd runs from (where pyproject.toml is)."""
    root = Path(diffkd.__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise JobsError(f"diffkd is installed without its source tree ({root}): pass --working-dir with a "
                        "checkout of the project, or --image with an image that has it installed")
    return root


def upload_limit_bytes() -> int:
    from ray._private import ray_constants

    return ray_constants.DASHBOARD_CLIENT_MAX_SIZE  # the Jobs server's request size limit


def package_files(working_dir: Path, include: Iterable[str] = ()) -> list[str]:
    """The project files (posix, relative) that travel: `PACKAGE_PATHS` plus `include`, allow-listed."""
    chosen: set[str] = set()
    for entry in (*PACKAGE_PATHS, *include):
        top = working_dir / entry
        if not top.exists() or top.is_symlink():
            continue
        paths = [top] if top.is_file() else [Path(d, n) for d, dirs, names in os.walk(top)
                                             for n in names if not _hidden_below(Path(d), working_dir)]
        for path in paths:
            rel = path.relative_to(working_dir).as_posix()
            if path.name.startswith(".") or path.is_symlink() or "__pycache__" in rel.split("/"):
                continue
            if path.suffix.lower() in PACKAGE_SUFFIXES or rel in PACKAGE_PATHS or rel in include:
                chosen.add(rel)
    return sorted(chosen)


def _hidden_below(folder: Path, root: Path) -> bool:
    return any(part.startswith(".") or part == "__pycache__" for part in folder.relative_to(root).parts)


def build_package(working_dir: str | os.PathLike, out_dir: str | os.PathLike, excludes: Iterable[str] = (),
                  limit_bytes: int | None = None, include: Iterable[str] = ()) -> Path:
    """Zip the allow-listed files of `working_dir` (`package_files`) into `out_dir`; check the size.

    `excludes`: gitignore-style patterns dropped from what the allow-list chose. Returns the zip path,
    which is then submitted as the working_dir itself: what is checked here is exactly what travels.
    """
    from ray._private.runtime_env.packaging import create_package

    working_dir = Path(working_dir).resolve()
    if not working_dir.is_dir():
        raise JobsError(f"working dir {working_dir} is not a directory")
    files = package_files(working_dir, tuple(include))
    if not files:
        raise JobsError(f"nothing to package in {working_dir}: none of {', '.join(PACKAGE_PATHS)} is there; "
                        "pass --include PATH for a project of your own")
    target = Path(out_dir) / f"{working_dir.name}-{secrets.token_hex(4)}.zip"
    with tempfile.TemporaryDirectory(prefix="diffkd-pkg-", dir=out_dir) as tmp:
        staged = Path(tmp) / working_dir.name
        for rel in files:
            (staged / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(working_dir / rel, staged / rel)
        create_package(str(staged), target, include_gitignore=False, excludes=list(excludes), logger=None)
    limit = upload_limit_bytes() if limit_bytes is None else limit_bytes
    size = target.stat().st_size
    if size >= limit:
        with zipfile.ZipFile(target) as zf:
            largest = sorted(zf.infolist(), key=lambda i: i.compress_size, reverse=True)[:5]
        target.unlink()
        listing = ", ".join(f"{i.filename} ({i.compress_size / 2**20:.1f} MiB)" for i in largest)
        raise JobsError(f"the job package from {working_dir} is {size / 2**20:.1f} MiB, over the "
                        f"{limit / 2**20:.0f} MiB upload limit. Data must stay on storage, not in the package: "
                        f"move it out or pass --exclude PATTERN. Largest: {listing}")
    return target


# ---- submitting ---------------------------------------------------------------------------------
@dataclass
class JobSpec:
    """What to run and how; `runtime_env()` turns it into Ray's runtime_env."""
    command: list[str]
    working_dir: str | None = None  # None: the project root (unless image is set)
    excludes: list[str] = field(default_factory=list)
    include: list[str] = field(default_factory=list)  # paths added to the package's allow-list
    env: dict[str, str] = field(default_factory=dict)
    pip: list[str] = field(default_factory=list)
    image: str | None = None
    num_cpus: float | None = None
    num_gpus: float | None = None
    submission_id: str | None = None

    def entrypoint(self) -> str:
        if not self.command:
            raise JobsError("no command to run: put it after `--`, e.g. diffkd submit -- diffkd train teacher ...")
        command = list(self.command)
        if command[0] == "diffkd":
            # Run the submitted code (the working_dir copy, first on the path) with the node's Python.
            command = ["python", "-m", "diffkd.cli"] + command[1:]
        return shlex.join(command)

    def runtime_env(self, package_dir: str | os.PathLike) -> dict:
        """Ray's runtime_env; the code package (unless an image holds the code) is written into package_dir."""
        env: dict = {}
        if self.env:
            env["env_vars"] = dict(self.env)
        if self.image:
            if self.pip or self.working_dir:
                raise JobsError("--image cannot be combined with --pip or --working-dir: the image holds the "
                                "code and its dependencies (Ray allows only env vars beside image_uri)")
            env["image_uri"] = self.image
            return env
        root = self.working_dir or str(project_root())
        env["working_dir"] = str(build_package(root, package_dir, self.excludes, include=self.include))
        if self.pip:
            env["pip"] = list(self.pip)
        return env


def new_submission_id(command: list[str]) -> str:
    """Readable and unique: diffkd-<subcommand>-<UTC time>-<random>."""
    words = [w for w in command[1:3] if not w.startswith("-")] if command and command[0] == "diffkd" else command[:1]
    slug = re.sub(r"[^a-z0-9]+", "-", "-".join(Path(w).name for w in words).lower()).strip("-")[:30] or "job"
    return f"diffkd-{slug}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


def parse_env(pairs: Iterable[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise JobsError(f"--env {pair!r} is not KEY=VALUE")
        env[key] = value
    return env


def submit(client, spec: JobSpec) -> str:
    """Submit `spec`; returns the submission id."""
    submission_id = spec.submission_id or new_submission_id(spec.command)
    with tempfile.TemporaryDirectory(prefix="diffkd-pkg-") as package_dir:
        runtime_env = spec.runtime_env(package_dir)
        metadata = {"diffkd_version": diffkd.__version__, "submitted_by": getpass.getuser(),
                    "command": shlex.join(spec.command)}
        try:
            return client.submit_job(entrypoint=spec.entrypoint(), submission_id=submission_id,
                                     runtime_env=runtime_env, metadata=metadata,
                                     entrypoint_num_cpus=spec.num_cpus, entrypoint_num_gpus=spec.num_gpus)
        except (RuntimeError, ValueError) as err:
            raise JobsError(f"the cluster rejected the job: {err}") from None


# ---- following ----------------------------------------------------------------------------------
def _call(what: str, fn, *args):
    try:
        return fn(*args)
    except RuntimeError as err:
        message = str(err)
        if "404" in message or "does not exist" in message:
            raise JobsError(f"no job {args[0]!r} on this cluster (see `diffkd jobs list`)") from None
        raise JobsError(f"{what} failed: {message}") from None


def status(client, job_id: str) -> str:
    return str(_call("status", client.get_job_status, job_id).value)


def info(client, job_id: str):
    return _call("job info", client.get_job_info, job_id)


def list_jobs(client) -> list:
    return sorted(client.list_jobs(), key=lambda j: j.start_time or 0)


def stop(client, job_id: str) -> bool:
    return bool(_call("stop", client.stop_job, job_id))


def logs(client, job_id: str) -> str:
    return _call("logs", client.get_job_logs, job_id)


def follow(client, job_id: str, out: IO[str] | None = None, poll_s: float = 2.0) -> str:
    """Stream a job's logs from the start until it ends (reattaching works the same); returns the final status.

    If the log stream drops while the job still runs (a dashboard restart, a flaky network), the
    logs are re-read and streaming resumes after what was already shown.
    """
    out = out or sys.stdout
    shown = 0

    async def stream() -> None:
        nonlocal shown
        seen = 0
        async for chunk in client.tail_job_logs(job_id):
            start = max(0, shown - seen)  # skip what an earlier attempt printed
            seen += len(chunk)
            if start < len(chunk):
                out.write(chunk[start:])
                out.flush()
                shown = seen

    info(client, job_id)  # a clear error for an unknown id
    while True:
        try:
            asyncio.run(stream())
        except (RuntimeError, OSError) as err:
            out.flush()
            log.warning("the job's log stream was interrupted (%s); resuming", err)
        current = status(client, job_id)
        if current in TERMINAL:
            return current
        time.sleep(poll_s)


def wait(client, job_id: str, timeout_s: float, poll_s: float = 2.0) -> str:
    """Poll until the job ends; returns its final status."""
    deadline = time.monotonic() + timeout_s
    while True:
        current = status(client, job_id)
        if current in TERMINAL:
            return current
        if time.monotonic() > deadline:
            raise JobsError(f"job {job_id} still {current} after {timeout_s:.0f}s")
        time.sleep(poll_s)
