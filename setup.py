"""Packages of the distribution: `graphspace*`, plus the example configs `experiments/*.yaml`
installed as `graphspace/configs/*.yaml` (found by `graphspace configs` and `--config NAME`).
Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["graphspace", "graphspace.*"]), "graphspace.configs"],
    package_dir={"graphspace.configs": "experiments"},
    package_data={"graphspace.configs": ["*.yaml"]},
)
