"""The click group's plumbing: the user-error contract, the per-command Settings, output helpers.

The contract: a user-caused failure (a bad option or value, a bad file, an unreachable server or
broker, a bad `ETSQ_*` setting) prints one `etsq: error: ...` line on stderr and exits with status 2;
anything else is a bug and keeps its traceback.  `--debug` (before the command) shows the traceback of
every error.  It lives in the group's `main`, so click's test runner sees exactly what a user sees.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from etsq.errors import EtsqError
from etsq.settings import Settings

if TYPE_CHECKING:
    from etsq.store.session import Store

F = TypeVar("F", bound=Callable[..., Any])


class AppContext:
    """What every command shares: the Settings, read from the environment once, on first use."""

    def __init__(self) -> None:
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = Settings.from_env()
        return self._settings


def pass_settings(command: F) -> F:
    """Decorator: call the command with the Settings as its first argument."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        app = click.get_current_context().ensure_object(AppContext)
        return command(app.settings, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def open_store(settings: Settings) -> Store:
    """The command's database (`etsq.store.session.Store`): one per process, its schema brought up
    to date on first use, so a command that refuses its input first creates no database.  Imported
    here, not at start-up: the database layer costs ~0.5 s to import."""
    from etsq.store.session import Store

    return Store.open(settings.database_url)


class EtsqGroup(click.Group):
    """A click group whose `main` applies the user-error contract."""

    def main(  # type: ignore[override]
        self, args: Sequence[str] | None = None, prog_name: str | None = None, **extra: Any
    ) -> NoReturn:
        argv = list(sys.argv[1:] if args is None else args)
        try:
            result = super().main(argv, prog_name or "etsq", standalone_mode=False, **extra)
        except click.exceptions.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)
        except click.exceptions.NoArgsIsHelpError as exc:  # `etsq` alone: the help, not an error
            click.echo(exc.ctx.get_help() if exc.ctx else exc.format_message())
            sys.exit(0)
        except Exception as exc:
            if not _user_error(exc) or _debug(argv):
                raise
            click.echo(f"etsq: error: {_one_line(exc)}", err=True)
            sys.exit(2)
        sys.exit(result if isinstance(result, int) else 0)


def _user_error(exc: BaseException) -> bool:
    """Whether the user caused the failure (and can fix it); anything else is a bug.

    Of the database's errors only the operational ones are the user's (cannot connect, locked, disk
    full, read-only, permission: `etsq.store.faults`); an IntegrityError or a ProgrammingError is a bug.
    """
    if isinstance(exc, (click.ClickException, EtsqError)):
        return True
    if isinstance(exc, (PermissionError, FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return True
    if type(exc).__module__.startswith("sqlalchemy"):
        from etsq.store.faults import user_fault  # imported only once something failed

        return user_fault(exc)
    return False


def _debug(argv: list[str]) -> bool:
    """Whether `--debug` came before the command name."""
    for arg in argv:
        if not arg.startswith("-"):
            return False
        if arg == "--debug":
            return True
    return False


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, click.ClickException):
        return " ".join(exc.format_message().split())
    if type(exc).__module__.startswith("sqlalchemy"):
        return f"database: {str(getattr(exc, 'orig', None) or exc).splitlines()[0]}"
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror}"
    return " ".join(str(exc).split())


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def table(rows: list[dict[str, Any]], columns: list[str], title: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console.width = 200  # piped output: never squeeze columns into 80 characters
    view = Table(*columns, title=title)
    for row in rows:
        view.add_row(*(_cell(row.get(c)) for c in columns))
    console.print(view)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "" if value is None else str(value)
