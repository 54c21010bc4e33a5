"""Secrets stay out of argv, logs, errors and reprs (issue 17).

A password-protected cluster (an ACL user and a password) is started through
the CLI itself, ``cluster up --password-file``; the other commands then run
as operators run them from cron or Kubernetes: the URL in ``TQRC_URL`` and
the password in a file. The process list (``ps -o args`` and
``/proc/PID/cmdline``) and everything the commands print are searched for
the password, raw and percent-encoded.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from helpers import eventually

from taskiq_redis_cluster import (
    ClusterStreamBroker,
    ConnectError,
    ConnectionOptions,
    connect,
)
from taskiq_redis_cluster.testing import find_free_base_port

CLI = [sys.executable, "-m", "taskiq_redis_cluster._cli._main"]
#: Has characters that must be percent-encoded in a URL, so both forms exist.
PASSWORD = "tq-S3cret@Pw17/x"
FORMS = (PASSWORD, quote(PASSWORD, safe=""))
USER = "ops"


def _no_secret(*texts: str) -> None:
    for text in texts:
        for form in FORMS:
            assert form not in text, f"the password ({form!r}) leaked: {text[-500:]!r}"


def _env(url: str, password_file: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQRC_")}
    env["TQRC_URL"] = url
    if password_file is not None:
        env["TQRC_PASSWORD_FILE"] = str(password_file)
    return env


def _cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, check=False, env=env
    )


@pytest.fixture(scope="module")
def password_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "redis-password"
    path.write_text(PASSWORD + "\n")  # as `echo` writes it: the newline is not part of it
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def secret_url(tmp_path_factory: pytest.TempPathFactory, password_file: Path) -> Iterator[str]:
    """A 3-master cluster started by ``cluster up --password-file``; its URL has no password."""
    directory = tmp_path_factory.mktemp("secret-cluster")
    base = find_free_base_port(3)
    common = ["--dir", str(directory), "--base-port", str(base)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQRC_")}
    up = _cli(
        "cluster", "up", "--masters", "3", "--replicas", "0", "--username", USER,
        "--password-file", str(password_file), *common, env=env,
    )  # fmt: skip
    try:
        assert up.returncode == 0, up.stderr
        url = up.stdout.strip()
        assert url == f"redis://{USER}@127.0.0.1:{base}"
        _no_secret(up.stdout, up.stderr)
        yield url
    finally:
        down = _cli("cluster", "down", *common, env=env)
        assert down.returncode == 0, down.stderr
    for log in directory.glob("*/redis.log"):
        _no_secret(log.read_text(errors="replace"))


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _process_views(pid: int) -> str:
    """What others may see of ``pid``: its ps line, /proc cmdline and environment."""
    ps = subprocess.run(
        ["ps", "-ww", "-o", "args=", "-p", str(pid)],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    # The environment is only readable by the same user, but it holds only
    # the URL and the file's path, never the password itself.
    environ = Path(f"/proc/{pid}/environ").read_bytes().replace(b"\0", b" ").decode()
    return f"{ps.stdout}\n{cmdline}\n{environ}"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.cluster
def test_plan_and_rebalance_read_the_url_and_password_from_the_environment(
    secret_url: str, password_file: Path, unique_name: str
) -> None:
    env = _env(secret_url, password_file)
    created = _cli("plan", "create", "--queue", unique_name, "--shards", "3", env=env)
    assert created.returncode == 0, created.stderr
    assert f"plan for queue {unique_name!r} created" in created.stdout
    shown = _cli("-v", "plan", "show", "--queue", unique_name, env=env)
    assert shown.returncode == 0, shown.stderr
    assert "balanced" in shown.stdout
    verified = _cli("-v", "rebalance", "verify", "--queue", unique_name, env=env)
    assert verified.returncode == 0, verified.stderr
    _no_secret(*(p.stdout + p.stderr for p in (created, shown, verified)))

    # Without the password file the cluster refuses, and the error is one
    # line that names neither the password nor its file's content.
    refused = _cli("plan", "show", "--queue", unique_name, env=_env(secret_url))
    assert refused.returncode == 2
    assert refused.stderr.splitlines()[-1].startswith("error:")


@pytest.mark.cluster
def test_wrong_password_and_double_password_errors_hide_the_secrets(
    secret_url: str, password_file: Path, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong"
    wrong_password = "Wr0ng@Pw-99"
    wrong.write_text(wrong_password + "\n")
    out = _cli("plan", "list", "--password-file", str(wrong), env=_env(secret_url))
    assert out.returncode == 2
    assert "error:" in out.stderr
    assert wrong_password not in out.stdout + out.stderr
    assert quote(wrong_password, safe="") not in out.stdout + out.stderr

    # The password both in the URL and in a file: refused before connecting.
    with_password = secret_url.replace(f"{USER}@", f"{USER}:{quote(PASSWORD, safe='')}@")
    twice = _cli("plan", "list", env=_env(with_password, password_file))
    assert twice.returncode == 2
    assert "given twice" in twice.stderr
    _no_secret(twice.stdout, twice.stderr)

    # A password on the command line still works, with a warning.
    argv = _cli("plan", "list", "--url", with_password, env=_env(""))
    assert argv.returncode == 0, argv.stderr
    assert "warning: --url holds a password" in argv.stderr
    _no_secret(argv.stdout, argv.stderr)

    missing = _cli("plan", "list", env=_env(""))
    assert missing.returncode == 2
    assert "TQRC_URL" in missing.stderr


@pytest.mark.cluster
async def test_exporter_keeps_the_password_out_of_ps_and_its_log(
    secret_url: str, password_file: Path, unique_name: str, tmp_path: Path
) -> None:
    env = _env(secret_url)
    created = await asyncio.to_thread(
        _cli, "plan", "create", "--queue", unique_name, "--shards", "2",
        "--password-file", str(password_file), env=env,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    port = _free_port()
    log = tmp_path / "exporter.log"
    with log.open("wb") as fh:  # the child keeps its own copy of the descriptor
        proc = await asyncio.create_subprocess_exec(
            *CLI, "-v", "exporter", "--port", str(port), "--password-file", str(password_file),
            stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    try:
        async def serving() -> tuple[int, str] | None:
            assert proc.returncode is None, log.read_text()
            status, body = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")
            return (status, body) if status == 200 and unique_name in body else None

        # Not up yet, the exporter refuses (OSError).
        status, body = await eventually(serving, "the exporter serving the queue", 30,
                                        interval=0.2, ignoring=OSError, detail=log.read_text)
        assert status == 200, log.read_text()
        assert f'taskiq_redis_cluster_plan_epoch{{queue="{unique_name}"}}' in body
        assert (await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/other"))[0] == 404
        views = _process_views(proc.pid)
        assert "exporter" in views  # the views are of the right process
        _no_secret(views)
    finally:
        proc.terminate()
        rc = await asyncio.wait_for(proc.wait(), 20)
    text = log.read_text()
    assert rc == 0, text
    assert "Exporting metrics of redis://ops@127.0.0.1" in text  # debug logging was on
    _no_secret(text)


def test_repr_and_connection_errors_hide_every_form(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    encoded = quote(PASSWORD, safe="")
    for url in (
        f"redis://{USER}:{encoded}@127.0.0.1:7000",
        f"redis://127.0.0.1:7000/?password={encoded}",
        f"rediss://:{encoded}@127.0.0.1:7000/0?ssl_password={encoded}",
    ):
        broker = ClusterStreamBroker(url, queue_name="jobs")
        _no_secret(repr(broker))
    _no_secret(repr(ConnectionOptions(password=PASSWORD, extra={"ssl_password": PASSWORD})))


async def test_connect_errors_hide_query_and_keyword_passwords(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("DEBUG")
    port = _free_port()  # nothing listens there
    encoded = quote(PASSWORD, safe="")
    attempts = [
        (f"redis://127.0.0.1:{port}/?password={encoded}", ConnectionOptions()),
        (f"redis://{USER}@127.0.0.1:{port}", ConnectionOptions(password=PASSWORD)),
    ]
    for url, options in attempts:
        opts = ConnectionOptions(socket_connect_timeout=1, password=options.password)
        with pytest.raises(ConnectError) as info:
            await connect(url, opts)
        _no_secret(str(info.value), repr(info.value))
    _no_secret(caplog.text)


@pytest.mark.cluster
async def test_a_wrong_keyword_password_is_not_in_the_error(secret_url: str) -> None:
    with pytest.raises(ConnectError, match="username-password") as info:
        await connect(secret_url, ConnectionOptions(password=PASSWORD[::-1]))
    assert PASSWORD[::-1] not in str(info.value)
    client = await connect(secret_url, ConnectionOptions(password=PASSWORD))
    try:
        assert await client.execute_command("ACL WHOAMI") in (USER, USER.encode())
    finally:
        await client.aclose()
