"""Which policy governs a service that several name: the oldest, then the first by name."""

from __future__ import annotations

from marl_operator.claims import claims_of, conflict, governors
from marl_operator.report import Outcome
from marl_operator.runtime import Runtime
from operator_fakes import FakeKube, Reader, example, example_mesh, example_policy_body


def index_of(*policies: tuple[str, str, list[str]]) -> dict:
    """The kopf index of ``(name, created, services)`` policies in namespace ``edge``."""
    index: dict = {}
    for name, created, services in policies:
        claims = claims_of("edge", name, {"services": services}, {"creationTimestamp": created})
        for key, claim in claims.items():
            index.setdefault(key, []).append(claim)
    return index


def test_the_oldest_policy_governs_and_a_tie_goes_to_the_first_name():
    index = index_of(
        ("b", "2026-01-01T00:00:05Z", ["fn", "img"]),
        ("a", "2026-01-01T00:00:09Z", ["fn"]),
        ("c", "2026-01-01T00:00:05Z", ["img", "db"]),
    )
    assert governors(index, "edge", ["fn", "img", "db", "other"]) == {
        "fn": "b",
        "img": "b",
        "db": "c",
    }
    assert governors(index, "elsewhere", ["fn"]) == {}
    assert governors(index, "edge") == {"fn": "b", "img": "b", "db": "c"}
    assert governors(index, "elsewhere") == {}
    assert conflict("b", "edge", governors(index, "edge", ["fn", "img"])) is None
    why = conflict("c", "edge", governors(index, "edge", ["img", "db"]))
    assert why is not None and "img (by edge/b)" in why and "db" not in why


def test_a_policy_governing_nothing_it_names_writes_nothing():
    """(Its deletion restoring nothing is tested against kopf and the emulated API server.)"""
    mesh = example_mesh()
    runtime = Runtime(
        FakeKube(example("edgenodes.yaml"), example("edgeservice.yaml")),
        mesh=mesh,
        reader_for=lambda url: Reader(mesh),
    )
    body = example_policy_body()
    report = runtime.cycle("edge/p", body, {"fn": "older"})
    assert report.outcome == Outcome.INVALID and report.reason.startswith("spec.services:")
    assert "fn (by edge/older)" in report.reason and mesh.writes == 0
    assert runtime.cycle("edge/p", body, {"fn": "p"}).outcome == Outcome.APPLIED
