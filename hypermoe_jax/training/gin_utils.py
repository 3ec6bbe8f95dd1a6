"""Gin command-line handling in the style of ``t5x.train``.

``--gin_file=F`` (repeatable), ``--gin.NAME=VALUE`` (repeatable; a bare word value is taken as a
string, so ``--gin.MODEL_DIR=/tmp/run`` works without shell-escaped quotes) and
``--gin_search_paths=a,b`` (the project's ``gin/`` directory is always searched).

After parsing, every macro still bound to ``%gin.REQUIRED`` is reported with the file that declares
it and how to set it -- instead of gin's silent sentinel or an obscure error deep in a run.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import gin

PROJECT_GIN_DIR = Path(__file__).resolve().parent.parent.parent / "gin"
_REQUIRED_DECL = re.compile(r"^\s*([A-Z][A-Z0-9_]*)\s*=\s*%gin\.REQUIRED\b", re.M)
_LITERAL_START = re.compile(r"""^\s*(['"%@\[\({]|-?\d|True\b|False\b|None\b)""")


class GinConfigError(ValueError):
    """A gin configuration is incomplete or wrong."""


def search_paths(extra: Sequence[str] = ()) -> list[str]:
    paths = [p for p in extra if p]
    if PROJECT_GIN_DIR.is_dir():
        paths.append(str(PROJECT_GIN_DIR))
    paths.append(os.getcwd())
    return paths


def _resolve(path: str, paths: Sequence[str]) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    for base in paths:
        cand = Path(base) / path
        if cand.is_file():
            return cand
    raise GinConfigError(
        f"gin file {path!r} not found (searched: {', '.join(paths)}); pass an existing file or add "
        "its directory with --gin_search_paths."
    )


def _included_files(path: Path, paths: Sequence[str], seen: set[Path]) -> list[Path]:
    """``path`` and everything it includes, depth first."""
    path = path.resolve()
    if path in seen:
        return []
    seen.add(path)
    out = [path]
    for line in path.read_text().splitlines():
        m = re.match(r"^\s*include\s+['\"](.+)['\"]", line)
        if m:
            child = _resolve(m.group(1), [str(path.parent), *paths])
            out.extend(_included_files(child, paths, seen))
    return out


def format_binding(name: str, value: str) -> str:
    """``NAME``, ``VALUE`` -> a gin binding; bare words become strings."""
    value = value.strip()
    if not _LITERAL_START.match(value):
        value = repr(value)
    return f"{name} = {value}"


def parse_gin_args(argv: Sequence[str]) -> tuple[list[str], list[str], list[str], list[str]]:
    """Splits t5x-style args into (gin_files, bindings, search_paths, rest)."""
    files, bindings, paths, rest = [], [], [], []
    it = iter(argv)
    for arg in it:
        if arg.startswith("--gin_file="):
            files.append(arg.split("=", 1)[1])
        elif arg == "--gin_file":
            files.append(next(it))
        elif arg.startswith("--gin_search_paths="):
            paths.extend(p for p in arg.split("=", 1)[1].split(",") if p)
        elif arg.startswith("--gin_bindings="):
            bindings.append(arg.split("=", 1)[1])
        elif arg.startswith("--gin."):
            key, sep, value = arg[len("--gin.") :].partition("=")
            if not sep:
                raise GinConfigError(f"{arg!r}: expected --gin.NAME=VALUE")
            bindings.append(format_binding(key, value))
        else:
            rest.append(arg)
    return files, bindings, paths, rest


def required_macros(files: Sequence[Path]) -> dict[str, Path]:
    """Macros declared ``NAME = %gin.REQUIRED`` in ``files`` -> the declaring file."""
    out: dict[str, Path] = {}
    for f in files:
        for name in _REQUIRED_DECL.findall(f.read_text()):
            out.setdefault(name, f)
    return out


def _macro_value(name: str):
    return gin.config._CONFIG.get((name, "gin.macro"), {}).get("value")  # noqa: SLF001


_MACRO_REF = re.compile(r"%([A-Z][A-Z0-9_]*)\b")


def _defined_macros() -> set[str]:
    return {name for name, sel in gin.config._CONFIG if sel == "gin.macro"}  # noqa: SLF001


def check_required_macros(files: Sequence[Path]) -> None:
    """Raises ``GinConfigError`` naming every macro that is still ``%gin.REQUIRED`` (with the file
    declaring it) or referenced but never defined (with the file referring to it)."""
    defined = _defined_macros()
    undefined: dict[str, Path] = {}
    for f in files:
        text = re.sub(r"#.*", "", f.read_text())
        for name in _MACRO_REF.findall(text):
            if name not in defined:
                undefined.setdefault(name, f)
    if undefined:
        lines = []
        for name, f in undefined.items():
            hint = (
                "pass a model gin, e.g. --gin_file=models/hypermoe_tiny.gin"
                if name == "MODEL"
                else f"set it with --gin.{name}=... or in your experiment gin"
            )
            lines.append(f"  {name}: used in {f} but never defined; {hint}")
        raise GinConfigError("Gin macros are not defined:\n" + "\n".join(lines))
    missing = []
    for name, f in required_macros(files).items():
        value = _macro_value(name)
        if value is None or repr(value) == "%gin.REQUIRED":
            missing.append((name, f))
    if missing:
        lines = [
            f"  {name}: declared in {f}; set it with --gin.{name}=... or in your experiment gin"
            for name, f in missing
        ]
        raise GinConfigError("Required gin macros are not set:\n" + "\n".join(lines))


class _DropGinProbeErrors(logging.Filter):
    """gin logs ``Path not found`` at ERROR level for every search-path prefix an include is
    not under (it tries each in turn); those probes are not errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.pathname.endswith("resource_reader.py")
                    and str(record.msg).startswith("Path not found"))


@contextlib.contextmanager
def _quiet_gin_probes():
    root = logging.getLogger()
    filt = _DropGinProbeErrors()
    root.addFilter(filt)
    try:
        yield
    finally:
        root.removeFilter(filt)


def parse(
    gin_files: Sequence[str],
    bindings: Sequence[str] = (),
    extra_search_paths: Sequence[str] = (),
    finalize: bool = True,
) -> list[Path]:
    """Parses gin files + bindings, checks required macros; returns the files read."""
    if not gin_files:
        raise GinConfigError(
            "No --gin_file given. Pass a model gin and a run gin, e.g. "
            "--gin_file=models/hypermoe_tiny.gin --gin_file=runs/pretrain.gin, or an experiment."
        )
    paths = search_paths(extra_search_paths)
    for p in paths:
        gin.add_config_file_search_path(p)
    resolved = [_resolve(f, paths) for f in gin_files]
    seen: set[Path] = set()
    all_files = [g for f in resolved for g in _included_files(f, paths, seen)]
    try:
        with _quiet_gin_probes():
            gin.parse_config_files_and_bindings(
                [str(f) for f in resolved], list(bindings), finalize_config=False
            )
    except (ValueError, ImportError, AttributeError, SyntaxError) as e:
        raise GinConfigError(f"Could not parse gin config: {e}") from e
    check_required_macros(all_files)
    if finalize:
        gin.finalize()
    return all_files


def suggest(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3)
    return f" Did you mean: {', '.join(close)}?" if close else ""


def arg_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
    p.add_argument("--gin_search_paths", default="", help="comma-separated gin search paths")
    return p
