"""The ``adasplash-tune`` command line. Each command lives in its own module; heavy imports
happen inside the commands, so ``--help`` is instant.

Exit status: 0 success, 2 usage error, 1 any other failure with a one-line ``error: ...`` on
stderr (a traceback only with ``--debug``).
"""

from __future__ import annotations

import logging
import sys

import click

__all__ = ["main", "CliError"]


class CliError(click.ClickException):
    """A failure to report as one line and exit status 1."""

    exit_code = 1

    def show(self, file=None) -> None:  # noqa: D401 - click API
        click.echo(f"error: {self.format_message()}", err=True)


class _Group(click.Group):
    """Turns unexpected exceptions into one-line errors (traceback only with --debug)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        except Exception as exc:  # the one place every failure is reported
            if ctx.obj and ctx.obj.get("debug"):
                raise
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            click.echo(f"error: {message}", err=True)
            sys.exit(1)


#: ``-h`` is ``--help`` on the group and, inherited through the context, on every command.
_CONTEXT = {"help_option_names": ["-h", "--help"]}


@click.group(cls=_Group, context_settings=_CONTEXT)
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.option("-v", "--verbose", is_flag=True, help="Show info logs.")
@click.version_option(package_name="adasplash-tune")
@click.pass_context
def main(ctx: click.Context, debug: bool, verbose: bool) -> None:
    """Tune, inspect and ship AdaSplash launch configs."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _register() -> None:
    """Attach every command module that exists (each defines ``register(main)``)."""
    import importlib

    for name in ("info", "cache_cmds", "tune", "bench", "verify"):
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue
            raise
        module.register(main)


_register()
