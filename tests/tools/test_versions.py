"""pyproject.toml's supported ranges against requirements.txt's pins and the installed packages
(reval_jax/tools/versions.py)."""

from pathlib import Path

from packaging.requirements import Requirement

from reval_jax.tools import versions

ROOT = Path(__file__).resolve().parents[2]


def pins() -> dict[str, str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    reqs = [Requirement(line.split("#")[0]) for line in lines if line.split("#")[0].strip()]
    return {r.name.lower(): next(iter(r.specifier)).version for r in reqs}


def test_every_pin_is_a_declared_lower_bound_and_inside_its_range():
    declared = {r.name.lower(): r for r in versions.declared()}
    assert set(declared) == set(pins())  # one declared range per pinned runtime dependency
    for name, pin in pins().items():
        assert declared[name].specifier.contains(pin), (name, pin)
        assert f">={pin}" in str(declared[name].specifier), (name, pin)  # the tested version is the floor


def test_installed_versions_are_in_range_and_a_bad_one_is_flagged(capsys, tmp_path):
    assert versions.main(["versions"]) == 0  # CI's venv is the pins
    toml = tmp_path / "pyproject.toml"
    toml.write_text('[project]\ndependencies = ["jax>=99", "no-such-package-reval>=1"]\n')
    assert versions.main(["versions", str(toml)]) == 1
    out = capsys.readouterr().out
    assert "OUTSIDE the declared range" in out and "MISSING" in out
    assert "not within pyproject.toml's ranges: jax, no-such-package-reval" in out
