"""The installed versions of reval_jax's dependencies against the ranges pyproject.toml declares.

    python -m reval_jax.tools.versions [PYPROJECT]

Prints the Python version and, for every `[project] dependencies` entry of PYPROJECT (default: the
repository's pyproject.toml), the installed version, the declared range and whether it lies inside.
Exits 1 when a dependency is missing or outside its range: a release that the registry or an
accelerator machine's preinstalled image brings and that nobody has checked yet (docs/compat.md says
how a range is widened). `make test-compat` runs it after its tests; on an accelerator machine it
says at once what the image differs in. It imports none of the packages it reports (no jax start-up).
"""

from __future__ import annotations

import dataclasses
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    declared: str  # the specifier, e.g. ">=0.10.2,<0.12"
    installed: str | None  # None: not installed

    @property
    def ok(self) -> bool:
        return self.installed is not None and Requirement(f"{self.name}{self.declared}").specifier.contains(
            self.installed, prereleases=True
        )

    @property
    def verdict(self) -> str:
        if self.installed is None:
            return "MISSING"
        return "ok" if self.ok else "OUTSIDE the declared range"


def declared(pyproject: Path = PYPROJECT) -> list[Requirement]:
    """The `[project] dependencies` of a pyproject.toml, parsed."""
    with open(pyproject, "rb") as f:
        return [Requirement(line) for line in tomllib.load(f)["project"]["dependencies"]]


def check(requirements: list[Requirement]) -> list[Check]:
    """Each requirement against the version installed in this interpreter's environment."""
    out = []
    for req in requirements:
        try:
            installed = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            installed = None
        out.append(Check(req.name, str(req.specifier), installed))
    return out


def report(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"python {sys.version.split()[0]}"]
    lines += [f"{c.name:<{width}}  {c.installed or '-':<12} {c.declared:<18} {c.verdict}" for c in checks]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    pyproject = Path(argv[1]) if len(argv) > 1 else PYPROJECT
    checks = check(declared(pyproject))
    print(report(checks))
    bad = [c.name for c in checks if not c.ok]
    if bad:
        print(f"not within pyproject.toml's ranges: {', '.join(bad)} (docs/compat.md)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
