"""Connection arguments shared by every command that talks to a cluster.

Operators run these commands from cron, Kubernetes and CI, where the
command line is visible to every local user (``ps``, ``/proc/PID/cmdline``).
So each command takes

* the URL from ``--url`` or, when that is absent, from ``$TQRC_URL``;
* the password from ``--password-file`` or ``$TQRC_PASSWORD_FILE``: the
  file's content without its trailing newline, handed to redis-py as a
  keyword (never spliced into a URL string that could be logged).

A password written into ``--url`` still works, with a warning on stderr.
Every error line goes through :meth:`Target.scrub`, which removes the URL's
password in each form and the file's password.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from .._redis import ConnectionOptions, scrub, url_secrets

#: Environment variable read when ``--url`` is not given.
URL_ENV = "TQRC_URL"
#: Environment variable read when ``--password-file`` is not given.
PASSWORD_FILE_ENV = "TQRC_PASSWORD_FILE"

EXIT_USAGE = 2


class TargetError(Exception):
    """The URL or the password file cannot be used; the message is safe to print."""


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--url`` and ``--password-file`` to ``parser``."""
    parser.add_argument(
        "--url",
        default=None,
        help=f"cluster URL, e.g. redis://127.0.0.1:7000 (default: ${URL_ENV}). "
        "Prefer the environment variable: the command line is visible to every local user",
    )
    add_password_file_argument(parser, what="the password for the cluster")


def add_password_file_argument(parser: argparse.ArgumentParser, *, what: str) -> None:
    """Add ``--password-file`` (also read from ``$TQRC_PASSWORD_FILE``)."""
    parser.add_argument(
        "--password-file",
        type=Path,
        default=None,
        metavar="PATH",
        help=f"read {what} from this file; a trailing newline is ignored "
        f"(default: ${PASSWORD_FILE_ENV})",
    )


def read_password_file(path: Path) -> str:
    """The password stored in ``path``, without the line ending after it.

    Only line-ending characters are stripped: spaces may be part of a
    password.

    :raises TargetError: if the file cannot be read or holds no password.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TargetError(f"cannot read the password file {str(path)!r}: {exc}") from None
    password = text.rstrip("\r\n")
    if not password:
        raise TargetError(f"the password file {str(path)!r} is empty")
    if "\n" in password or "\r" in password:
        raise TargetError(f"the password file {str(path)!r} holds more than one line")
    return password


def password_from(args: argparse.Namespace) -> str | None:
    """The password of ``--password-file`` / ``$TQRC_PASSWORD_FILE``, if any."""
    path: Path | None = getattr(args, "password_file", None)
    if path is None:
        env = os.environ.get(PASSWORD_FILE_ENV)
        path = Path(env) if env else None
    return read_password_file(path) if path is not None else None


@dataclass(frozen=True)
class Target:
    """Where a command connects: the URL and the password kept beside it."""

    url: str
    password: str | None = field(default=None, repr=False)

    def options(self, base: ConnectionOptions | None = None) -> ConnectionOptions:
        """``base`` (default options if ``None``) with the password added."""
        base = base or ConnectionOptions()
        if self.password is None:
            return base
        return ConnectionOptions(
            max_connections=base.max_connections,
            socket_timeout=base.socket_timeout,
            socket_connect_timeout=base.socket_connect_timeout,
            retries=base.retries,
            extra=base.extra,
            password=self.password,
        )

    def scrub(self, text: str) -> str:
        """``text`` without the URL's password or the file's, in any form."""
        return scrub(text, self.url, self.password)


def resolve_target(args: argparse.Namespace, err: TextIO | None = None) -> Target:
    """The command's :class:`Target` from its arguments and the environment.

    :raises TargetError: if no URL is given, the password file is unusable,
        or the password is given twice (in the URL and in a file).
    """
    err = err or sys.stderr
    from_argv: str | None = getattr(args, "url", None)
    url = from_argv or os.environ.get(URL_ENV, "")
    if not url:
        raise TargetError(f"no cluster URL: pass --url or set {URL_ENV}")
    password = password_from(args)
    in_url = url_secrets(url)
    if password is not None and in_url:
        raise TargetError(
            "the password is given twice: in the URL and in the password file; keep one"
        )
    if from_argv and in_url:
        print(
            "warning: --url holds a password, which every local user can read in the "
            f"process list; set {URL_ENV} or use --password-file instead",
            file=err,
        )
    return Target(url=url, password=password)


def print_error(exc: BaseException, target: Target | None, err: TextIO | None = None) -> None:
    """Print ``exc`` as one ``error:`` line with every secret of ``target`` removed."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if target is not None:
        text = target.scrub(text)
    print(f"error: {text}", file=err or sys.stderr)
