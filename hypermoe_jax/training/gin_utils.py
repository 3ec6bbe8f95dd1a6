"""Gin command-line handling in the style of ``t5x.train``.

``--gin_file=F`` (repeatable), ``--gin.NAME=VALUE`` (repeatable; a bare word value is taken as a
string, so ``--gin.MODEL_DIR=/tmp/run`` works without shell-escaped quotes) and
``--gin_search_paths=a,b``.

Gin files (named on the command line or in ``include``) are looked up in the directories of
``search_paths``, in order: ``--gin_search_paths``, the project's gin files (``project_gin_dir``:
the package data of an installed copy, or the repository's top-level ``gin/``), then the working
directory. So ``include 'runs/pretrain.gin'`` is the project's run gin wherever a run starts, and
a user's own files (``--gin_file=my_runs/exp.gin``) are found in the working directory.

After parsing, bindings that would have no effect are errors, with a suggestion: a macro that no
parsed gin file (or binding) refers to (``--gin.NUM_EXPERTSS=8``), and a parameter that its
configurable does not take. Every macro still bound to ``%gin.REQUIRED`` is reported with the
file that declares it and how to set it -- instead of gin's silent sentinel or an obscure error
deep in a run.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import importlib
import importlib.resources
import inspect
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import gin

# The repository's gin files, next to the package in a source checkout.
SOURCE_GIN_DIR = Path(__file__).resolve().parent.parent.parent / "gin"
_REQUIRED_DECL = re.compile(r"^\s*([A-Z][A-Z0-9_]*)\s*=\s*%gin\.REQUIRED\b", re.M)
_LITERAL_START = re.compile(r"""^\s*(['"%@\[\({]|-?\d|True\b|False\b|None\b)""")

# Configurables whose ``**kwargs`` are passed on, by module: the callables whose parameters those
# keyword arguments may name (gin itself accepts any name for them).
KWARGS_TARGETS = {
    "hypermoe_jax.architectures.sizes": (
        "hypermoe_jax.architectures.sizes.t5_1_1",
        "hypermoe_jax.architectures.config.TransformerConfig",
    ),
}


class GinConfigError(ValueError):
    """A gin configuration is incomplete or wrong."""


def _is_gin_dir(path: Path) -> bool:
    # A marker file: the directory above a source checkout's package may hold another ``gin``
    # (gin-config's own package, in site-packages).
    return (path / "runs" / "pretrain.gin").is_file()


def project_gin_dir() -> Path | None:
    """The project's gin files: ``hypermoe_jax/gin`` (package data of an installed copy) or, in a
    source checkout, the repository's top-level ``gin/`` directory."""
    installed = importlib.resources.files("hypermoe_jax") / "gin"
    if isinstance(installed, Path) and _is_gin_dir(installed):
        return installed
    if _is_gin_dir(SOURCE_GIN_DIR):
        return SOURCE_GIN_DIR
    return None


def search_paths(extra: Sequence[str] = ()) -> list[str]:
    """Where gin files are looked up, in order (absolute): ``extra`` (``--gin_search_paths``),
    the project's gin files, the working directory."""
    gin_dir = project_gin_dir()
    paths = [os.path.abspath(os.path.expanduser(p)) for p in extra if p]
    paths += [str(gin_dir)] if gin_dir else []
    paths.append(os.getcwd())
    return list(dict.fromkeys(paths))


def _resolve(path: str, paths: Sequence[str]) -> Path:
    """The gin file ``path`` names: an absolute path as it is, a relative one in the first of
    ``paths`` that holds it (as gin's own lookup does inside ``_gin_file_lookup``)."""
    path = os.path.expanduser(path)
    if os.path.isabs(path):
        if os.path.isfile(path):
            return Path(path)
    else:
        for base in paths:
            cand = Path(base) / path
            if cand.is_file():
                return cand
    raise GinConfigError(
        f"gin file {path!r} not found (searched: {', '.join(paths)}); pass an existing file or add "
        "its directory with --gin_search_paths."
    )


@contextlib.contextmanager
def _gin_file_lookup(paths: Sequence[str]):
    """Makes gin look up relative file names (its ``include`` statements) in ``paths`` only, as
    ``_resolve`` does. Gin's own lookup tries the working directory first and, there, imports
    the include's directory as a Python package (its resource reader), which crashes on a
    namespace package such as a ``runs/`` directory in the working directory."""
    prefixes, readers = gin.config._LOCATION_PREFIXES, gin.config._FILE_READERS  # noqa: SLF001
    saved = list(prefixes), list(readers)
    prefixes[:] = list(paths)
    readers[:] = [(open, os.path.isfile)]
    try:
        yield
    finally:
        prefixes[:], readers[:] = saved


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
            child = _resolve(m.group(1), paths)
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
# Any macro reference (``%NAME``, ``%scope/NAME``; ``%gin.REQUIRED`` too) and any binding line
# (``NAME = ...``; in a file, the parameters of a block match too, and are not macros).
_ANY_MACRO_REF = re.compile(r"%(?:[\w.]+/)*([A-Za-z_][\w.]*)")
_BINDING_LINE = re.compile(r"^[ \t]*([A-Za-z_]\w*)[ \t]*=.*$", re.M)


def _strip_comments(text: str) -> str:
    return re.sub(r"#.*", "", text)


def _sources(files: Sequence[Path], bindings: Sequence[str]) -> list[tuple[str, str]]:
    """(where, text without comments) of the bindings, then of the files."""
    return [("--gin binding", b) for b in bindings] + [
        (f"in {f}", _strip_comments(f.read_text())) for f in files]


def _defined_macros() -> set[str]:
    return {name for name, sel in gin.config._CONFIG if sel == "gin.macro"}  # noqa: SLF001


@functools.lru_cache(maxsize=4)
def _run_macros(gin_dir: Path | None) -> frozenset[str]:
    """The macros the project's run gins (``runs/*.gin``) declare or use. Binding one of them is
    never an error: scripts pass the same run macros to several runs (a training run and the
    evaluation of its checkpoint), and a model gin is checked without a run gin."""
    names: set[str] = set()
    for f in sorted((gin_dir / "runs").glob("*.gin")) if gin_dir else ():
        text = _strip_comments(f.read_text())
        names.update(_ANY_MACRO_REF.findall(text))
        names.update(m.group(1) for m in _BINDING_LINE.finditer(text))
    return frozenset(names)


def check_unknown_macros(files: Sequence[Path], bindings: Sequence[str] = ()) -> None:
    """Raises ``GinConfigError`` naming every macro that ``bindings`` or ``files`` bind but that
    nothing parsed refers to (``%NAME``) -- a misspelling, most likely, which would have no effect
    -- with a suggestion. The project's run macros (``_run_macros``) are exempt."""
    sources = _sources(files, bindings)
    used: set[str] = set()
    bound: dict[str, tuple[str, str]] = {}  # name -> (where, the binding's first line)
    for where, text in sources:
        used.update(_ANY_MACRO_REF.findall(text))
        for m in _BINDING_LINE.finditer(text):
            bound.setdefault(m.group(1), (where, m.group(0).strip()))
    macros = _defined_macros()
    known = used | _run_macros(project_gin_dir())
    unknown = [name for name in bound if name in macros and name not in known]
    if unknown:
        choices = sorted((known | macros) - set(unknown))
        lines = [f"  {bound[name][1]}  ({bound[name][0]}).{suggest(name, choices)}"
                 for name in unknown]
        raise GinConfigError(
            "Gin macros are bound but no gin file uses them (%NAME), so they would have no "
            "effect:\n" + "\n".join(lines))


def check_required_macros(files: Sequence[Path]) -> None:
    """Raises ``GinConfigError`` naming every macro that is still ``%gin.REQUIRED`` (with the file
    declaring it) or referenced but never defined (with the file referring to it)."""
    defined = _defined_macros()
    undefined: dict[str, Path] = {}
    for f in files:
        text = _strip_comments(f.read_text())
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


# ---------------------------------------------------------------------------------------------
# Parameters a configurable does not take
# ---------------------------------------------------------------------------------------------

_NO_PARAMETER = re.compile(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'")
_NO_CONFIGURABLE = re.compile(r"No configurable matching '([^']+)'")


def _import_object(dotted: str):
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _named_parameters(fn) -> tuple[list[str], bool]:
    """``fn``'s parameter names (keyword-passable) and whether it takes ``**kwargs``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return [], True
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


def _accepted_parameters(configurable) -> list[str] | None:
    """The parameter names gin may bind for ``configurable``; None: any (``**kwargs`` that go
    somewhere ``KWARGS_TARGETS`` does not say)."""
    names, var_kw = _named_parameters(configurable.wrapped)
    if not var_kw:
        return names
    targets = KWARGS_TARGETS.get(getattr(configurable.wrapped, "__module__", ""))
    if targets is None:
        return None
    for target in targets:
        names += _named_parameters(_import_object(target))[0]
    return sorted(set(names))


def _registry():
    return gin.config._REGISTRY  # noqa: SLF001


def _configurable(selector: str):
    try:
        return _registry().get_match(selector)
    except (KeyError, ValueError):  # ambiguous
        return None


def _configurable_names(like: str) -> list[str]:
    """Names of registered configurables with as many dotted parts as ``like``."""
    k = like.count(".") + 1
    return sorted({".".join(sel.split(".")[-k:]) for sel, _ in _registry().items()
                   if not sel.startswith("gin.")})


def _explain_parse_error(error: Exception) -> str:
    """Gin's parse error, with a suggestion where it names an unknown configurable or
    parameter."""
    first, _, location = str(error).partition("\n")
    hint = ""
    if m := _NO_PARAMETER.search(first):
        configurable = _configurable(m.group(1))
        if configurable is not None:
            hint = suggest(m.group(2), _accepted_parameters(configurable) or [])
    elif m := _NO_CONFIGURABLE.search(first):
        hint = suggest(m.group(1), _configurable_names(m.group(1)))
    return f"Could not parse gin config: {first}{hint}" + (f"\n{location}" if location else "")


def _binding_of(selector: str, param: str, sources: Iterable[tuple[str, str]]) -> str:
    short = re.escape(selector.rsplit(".", 1)[-1])
    pattern = re.compile(rf"^[ \t]*(?:[\w.]*/)?(?:[\w.]*\.)?{short}\.{re.escape(param)}[ \t]*=.*$",
                         re.M)
    for where, text in sources:
        if m := pattern.search(text):
            return f"`{m.group(0).strip()}` ({where})"
    return f"`{selector}.{param}`"


def check_unknown_parameters(files: Sequence[Path], bindings: Sequence[str] = ()) -> None:
    """Raises ``GinConfigError`` for a binding of a parameter that its configurable does not take.
    Gin checks named parameters itself (``_explain_parse_error`` adds the suggestion); this checks
    the ``**kwargs`` of the configurables in ``KWARGS_TARGETS``, which gin lets through."""
    errors = []
    for (_, selector), params in gin.config._CONFIG.items():  # noqa: SLF001
        if selector == "gin.macro":
            continue
        configurable = _configurable(selector)
        if configurable is None or not _named_parameters(configurable.wrapped)[1]:
            continue  # gin has checked the parameters of a function without **kwargs
        accepted = _accepted_parameters(configurable)
        if accepted is None:
            continue
        for param in params:
            if param not in accepted:
                errors.append((selector, param, accepted))
    if errors:
        sources = _sources(files, bindings)
        lines = [f"  {_binding_of(sel, param, sources)}: {sel} takes no parameter {param!r}."
                 f"{suggest(param, accepted)}" for sel, param, accepted in errors]
        raise GinConfigError("Unknown gin parameters:\n" + "\n".join(lines))


def parse(
    gin_files: Sequence[str],
    bindings: Sequence[str] = (),
    extra_search_paths: Sequence[str] = (),
    finalize: bool = True,
) -> list[Path]:
    """Parses gin files + bindings and checks them (unknown macros and parameters, required
    macros); returns the files read, includes included."""
    if not gin_files:
        raise GinConfigError(
            "No --gin_file given. Pass a model gin and a run gin, e.g. "
            "--gin_file=models/hypermoe_tiny.gin --gin_file=runs/pretrain.gin, or an experiment."
        )
    paths = search_paths(extra_search_paths)
    resolved = [_resolve(f, paths) for f in gin_files]
    seen: set[Path] = set()
    all_files = [g for f in resolved for g in _included_files(f, paths, seen)]
    try:
        with _gin_file_lookup(paths):
            gin.parse_config_files_and_bindings(
                [str(f) for f in resolved], list(bindings), finalize_config=False
            )
    except (ValueError, ImportError, AttributeError, SyntaxError) as e:
        raise GinConfigError(_explain_parse_error(e)) from e
    check_unknown_parameters(all_files, bindings)
    check_unknown_macros(all_files, bindings)
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


def model_from_gin(gin_files: Sequence[str], bindings: Sequence[str] = ()):
    """The ``MODEL`` of model gin files (gin is cleared first; the config is not finalized)."""
    gin.clear_config()
    parse(gin_files, bindings, finalize=False)
    ref = gin.query_parameter("%MODEL")
    return ref.scoped_configurable_fn() if hasattr(ref, "scoped_configurable_fn") else ref
