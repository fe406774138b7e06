"""Thin Typer layer: parse options, call the library, print. Only this module prints."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from . import __version__
from .errors import CosegError

app = typer.Typer(
    name="coseg",
    help="Instance co-segmentation (DeepCO3): find every instance of the shared category in a "
    "folder of photos, without annotations.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
err = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def fail(exc: CosegError | str, code: int = 1) -> typer.Exit:
    """Print one red `error:` line on stderr and return the Exit to raise."""
    err.print(f"[red]error:[/] {exc}", markup=True, soft_wrap=True)
    return typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        out.print(f"coseg {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = None,
) -> None:
    """coseg command line."""


def _not_yet(name: str, issue: int) -> typer.Exit:
    return fail(f"`coseg {name}` is not implemented yet (tracked in issue {issue})", code=2)


@app.command()
def run() -> None:
    """Fine-tune VGG-16 on each folder and write instance masks, JSON and overlays."""
    raise _not_yet("run", 6)


@app.command("eval")
def eval_cmd() -> None:
    """Score predicted instances against ground truth: mAP^r@.25/.5/.75 and CorLoc^r."""
    raise _not_yet("eval", 3)


@app.command()
def saliency() -> None:
    """Compute the saliency prior of every image of a folder."""
    raise _not_yet("saliency", 4)


@app.command()
def proposals() -> None:
    """Compute the mask proposals of every image of a folder."""
    raise _not_yet("proposals", 4)


@app.command()
def weights() -> None:
    """Show where the ImageNet VGG-16 weights come from and prepare the cache."""
    raise _not_yet("weights", 5)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("[red]interrupted[/]")
        sys.exit(130)


__all__ = ["app", "main", "Path"]
