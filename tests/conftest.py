"""Shared fixtures: bundled scenarios are loaded once per session (they are immutable)."""

import pytest

from simulator.scenario import load_scenario


@pytest.fixture(scope="session")
def paise():
    return load_scenario("dfaas-paise25")


@pytest.fixture(scope="session")
def mesh():
    return load_scenario("mesh-10x3")
