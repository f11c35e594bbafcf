"""Who may read the operator's HTTP API: the answers the API server gives (TokenReview,
SubjectAccessReview) asked through the operator's client of the emulated server, kept for a
while and no longer, and what the API serves, refuses and says with and without a login."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from marl_operator.access import Access, AccessUnavailable, Caller, Permission
from marl_operator.api import create_app
from marl_operator.instruments import Instruments
from marl_operator.kube import Kube, TimedApiClient, client_configuration
from marl_operator.store import ReportStore
from test_api import make_report, publish

ALICE = Caller("alice", ("system:authenticated", "team-edge"), "alice")
GET_EDGE = Permission("get", "marl.dev", "routingpolicies", "edge", "balanced")


class CountingReviewer:
    """Answers from two tables, counting the questions; ``down`` makes it fail as an
    unreachable API server does."""

    def __init__(self, tokens: dict[str, Caller], granted: set[tuple[str, Permission]]):
        self.tokens, self.granted = tokens, granted
        self.asked: list[object] = []
        self.down = False

    def review_token(self, token: str, audience: str) -> Caller | None:
        assert audience == "marl-operator"  # the default
        self.asked.append(token)
        if self.down:
            raise AccessUnavailable("the TokenReview could not be sent: MaxRetryError")
        return self.tokens.get(token)

    def review_access(self, caller: Caller, permission: Permission) -> bool:
        self.asked.append((caller.user, permission))
        if self.down:
            raise AccessUnavailable("the SubjectAccessReview could not be sent: MaxRetryError")
        return (caller.user, permission) in self.granted


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def reviewer() -> CountingReviewer:
    return CountingReviewer({"tok-alice": ALICE}, {("alice", GET_EDGE)})


# --- the cache ----------------------------------------------------------------------------


def test_answers_are_kept_for_the_ttl_then_asked_again(reviewer) -> None:
    clock = Clock()
    access = Access(reviewer, ttl_s=60.0, clock=clock)
    for _ in range(5):
        assert access.caller("tok-alice") == ALICE
        assert access.allows(ALICE, GET_EDGE)
    assert len(reviewer.asked) == 2
    clock.now += 59.0
    assert access.caller("tok-alice") == ALICE and len(reviewer.asked) == 2
    clock.now += 2.0  # past the minute: a revoked token or grant stops working now
    reviewer.tokens.clear()
    reviewer.granted.clear()
    assert access.caller("tok-alice") is None
    assert not access.allows(ALICE, GET_EDGE)
    assert len(reviewer.asked) == 4


def test_a_refused_token_is_remembered_but_a_failure_to_ask_is_not(reviewer) -> None:
    access = Access(reviewer)
    for _ in range(3):
        assert access.caller("guessed") is None
    assert reviewer.asked == ["guessed"]
    reviewer.down = True
    with pytest.raises(AccessUnavailable):
        access.caller("tok-alice")
    reviewer.down = False
    assert access.caller("tok-alice") == ALICE  # asked again, not answered from a failure


def test_each_permission_is_its_own_question(reviewer) -> None:
    access = Access(reviewer)
    other = Permission("get", "marl.dev", "routingpolicies", "other", "balanced")
    assert access.allows(ALICE, GET_EDGE) and not access.allows(ALICE, other)
    assert not access.allows(Caller("bob"), GET_EDGE)
    assert len(reviewer.asked) == 3


def test_tokens_are_kept_only_as_digests_and_the_cache_is_bounded(reviewer) -> None:
    reviewer.tokens |= {"second": Caller("bob"), "third": Caller("carol")}
    access = Access(reviewer, max_entries=2)
    for token in ("tok-alice", "second", "third"):
        access.caller(token)
    kept = repr(access._callers._entries)
    assert "tok-alice" not in kept and "third" not in kept
    assert len(access._callers) == 2
    access.caller("tok-alice")  # the oldest went first: asked again
    assert reviewer.asked.count("tok-alice") == 2


def test_junk_tokens_neither_push_out_known_callers_nor_stay_long(reviewer) -> None:
    clock = Clock()
    access = Access(reviewer, max_entries=8, clock=clock)
    access.caller("tok-alice")
    for i in range(100):
        assert access.caller(f"junk-{i}") is None
    assert access.caller("tok-alice") == ALICE and reviewer.asked.count("tok-alice") == 1
    assert len(access._refused) == 2  # a quarter of the known callers' room
    clock.now += 11.0  # a refusal is kept ten seconds: an authenticator may have failed
    access.caller("junk-99")
    assert reviewer.asked.count("junk-99") == 2


def test_a_token_is_not_trusted_past_its_own_expiry(reviewer) -> None:
    import base64
    import json

    def jwt(exp: float) -> str:
        payload = base64.urlsafe_b64encode(json.dumps({"exp": exp}).encode()).rstrip(b"=")
        return f"eyJhbGciOiJSUzI1NiJ9.{payload.decode()}.c2ln"

    clock, wall = Clock(), 1_800_000_000.0
    soon, later = jwt(wall + 5), jwt(wall + 3600)
    reviewer.tokens |= {soon: ALICE, later: ALICE}
    access = Access(reviewer, clock=clock, wall_clock=lambda: wall)
    access.caller(soon), access.caller(later)
    clock.now += 6.0
    access.caller(soon), access.caller(later)
    assert reviewer.asked.count(soon) == 2 and reviewer.asked.count(later) == 1


def test_questions_beyond_the_limit_in_flight_are_turned_away_not_queued(reviewer) -> None:
    import threading

    gate, waiting = threading.Event(), threading.Semaphore(0)

    class Slow(CountingReviewer):
        def review_token(self, token: str, audience: str) -> Caller | None:
            waiting.release()
            gate.wait(10)
            return super().review_token(token, audience)

    access = Access(Slow({"tok-alice": ALICE}, set()), max_in_flight=2)
    threads = [threading.Thread(target=access.caller, args=(f"t{i}",)) for i in range(2)]
    for thread in threads:
        thread.start()
    assert waiting.acquire(timeout=10) and waiting.acquire(timeout=10)
    with pytest.raises(AccessUnavailable, match="too many questions"):
        access.caller("tok-alice")
    gate.set()
    for thread in threads:
        thread.join(10)
    assert access.caller("tok-alice") == ALICE  # room again


def test_permissions_read_as_rbac_says_them() -> None:
    assert str(GET_EDGE) == 'get routingpolicies.marl.dev "balanced" in the namespace "edge"'
    every = Permission("list", "marl.dev", "routingpolicies")
    assert str(every) == "list routingpolicies.marl.dev in every namespace"
    assert str(Permission("get", path="/metrics")) == "get the URL /metrics"


# --- the API server's answers, through the operator's client ------------------------------


@pytest.fixture
def kube(apiserver) -> Kube:
    return Kube(TimedApiClient(client_configuration(apiserver.kubeconfig)))


def test_the_reviews_ask_the_api_server(apiserver, kube) -> None:
    apiserver.api.add_token("tok-alice", "alice", ("team-edge",), audiences=("marl-operator",))
    apiserver.api.permit("team-edge", "get", "routingpolicies.marl.dev", "edge")
    apiserver.api.permit("alice", "get", "/metrics")
    caller = kube.review_token("tok-alice", "marl-operator")
    assert caller is not None and caller.user == "alice" and "team-edge" in caller.groups
    assert kube.review_token("tok-mallory", "marl-operator") is None
    assert kube.review_access(caller, GET_EDGE)
    assert not kube.review_access(caller, Permission("get", "marl.dev", "routingpolicies", "x"))
    assert not kube.review_access(caller, Permission("list", "marl.dev", "routingpolicies", "edge"))
    assert kube.review_access(caller, Permission("get", path="/metrics"))
    assert not kube.review_access(Caller("bob"), Permission("get", path="/metrics"))


def test_a_token_for_another_audience_is_not_one_for_this_api(apiserver, kube) -> None:
    """A token the API server takes for itself, overheard on its way to this API (plain
    HTTP), would open the cluster to whoever heard it: only the API's own are taken."""
    apiserver.api.add_token("tok-kube", "alice")  # the API server's audience
    apiserver.api.add_token("tok-both", "bob", audiences=("marl-operator", "vault"))
    assert kube.review_token("tok-kube", "marl-operator") is None
    assert kube.review_token("tok-kube", "") == Caller("alice", ("system:authenticated",), "alice")
    assert kube.review_token("tok-both", "marl-operator").user == "bob"


def test_a_grant_of_one_object_is_asked_for_by_name(apiserver, kube) -> None:
    apiserver.api.permit("alice", "get", "routingpolicies.marl.dev", "edge", name="balanced")
    alice = Caller("alice")
    assert kube.review_access(alice, GET_EDGE)
    other = Permission("get", "marl.dev", "routingpolicies", "edge", "other")
    assert not kube.review_access(alice, other)
    every = Permission("list", "marl.dev", "routingpolicies")
    assert not kube.review_access(alice, every)
    apiserver.api.permit("alice", "list", "routingpolicies.marl.dev")
    assert kube.review_access(alice, every)


def test_an_authorizer_that_failed_is_no_refusal(kube, monkeypatch) -> None:
    """A SubjectAccessReview that could not be evaluated (a webhook authorizer down) would
    otherwise be kept a minute as a refusal; an answer that is no review, a 500."""
    from types import SimpleNamespace

    def answer(data: bytes):
        def create(body, **_):
            return SimpleNamespace(data=data, release_conn=lambda: None)

        return create

    failed = b'{"status": {"allowed": false, "evaluationError": "webhook: timeout"}}'
    monkeypatch.setattr(kube.authorization, "create_subject_access_review", answer(failed))
    with pytest.raises(AccessUnavailable, match="could not be decided: webhook: timeout"):
        kube.review_access(ALICE, GET_EDGE)
    for garbage in (b"<html>", b'{"status": "yes"}'):
        monkeypatch.setattr(kube.authentication, "create_token_review", answer(garbage))
        with pytest.raises(AccessUnavailable, match="not a review"):
            kube.review_token("tok-alice", "marl-operator")


def test_an_operator_that_may_not_ask_is_told_what_to_grant(apiserver, kube) -> None:
    apiserver.api.deny("create", "tokenreviews.authentication.k8s.io")
    with pytest.raises(AccessUnavailable, match=r"needs create on tokenreviews.*api.auth"):
        kube.review_token("tok-alice", "marl-operator")


def test_an_unreachable_api_server_is_unavailable_not_a_refusal(tmp_path) -> None:
    from demo.apiserver import write_kubeconfig

    config = client_configuration(write_kubeconfig("http://127.0.0.1:9", tmp_path / "kc"))
    kube = Kube(TimedApiClient(config, timeout=(1.0, 1.0)))
    config.retries = 0
    with pytest.raises(AccessUnavailable, match="TokenReview could not be sent"):
        kube.review_token("tok-alice", "marl-operator")


# --- the HTTP API with a login ------------------------------------------------------------


def guarded(reviewer, **options) -> tuple[TestClient, ReportStore, Instruments]:
    store, instruments = ReportStore(), Instruments()
    app = create_app(store, instruments, ready=lambda: True, access=Access(reviewer), **options)
    for policy in ("edge/balanced", "other/balanced"):
        publish(store, instruments, make_report(policy))
    return TestClient(app), store, instruments


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_without_a_token_the_api_says_how_to_get_one(reviewer) -> None:
    client, _, _ = guarded(reviewer)
    for path in ("/api/v1/policies", "/api/v1/policies/edge/balanced", "/api/v1/replica"):
        answer = client.get(path)
        assert answer.status_code == 401, path
        assert answer.headers["www-authenticate"].startswith("Bearer")
        assert (
            "kubectl create token NAME -n NAMESPACE --audience marl-operator"
            in (answer.json()["detail"])
        )
    answer = client.get("/api/v1/policies", headers={"Authorization": "Basic YWxpY2U6eA=="})
    assert answer.status_code == 401
    answer = client.get("/api/v1/policies", headers=bearer("tok-mallory"))
    assert answer.status_code == 401 and "does not accept" in answer.json()["detail"]


def test_a_report_is_served_to_whoever_may_get_the_policy(reviewer) -> None:
    client, _, _ = guarded(reviewer)
    answer = client.get("/api/v1/policies/edge/balanced", headers=bearer("tok-alice"))
    assert answer.status_code == 200 and answer.json()["policy"] == "edge/balanced"
    refused = client.get("/api/v1/policies/other/balanced", headers=bearer("tok-alice"))
    assert refused.status_code == 403
    detail = refused.json()["detail"]
    assert 'user "alice" may not get routingpolicies.marl.dev "balanced"' in detail
    assert 'namespace "other"' in detail and "RBAC" in detail
    # A refusal does not tell whether the policy exists.
    missing = client.get("/api/v1/policies/other/absent", headers=bearer("tok-alice"))
    assert missing.status_code == 403


def test_the_list_holds_only_namespaces_the_caller_may_list(reviewer) -> None:
    reviewer.granted.add(("alice", Permission("list", "marl.dev", "routingpolicies", "other")))
    client, _, _ = guarded(reviewer)
    answer = client.get("/api/v1/policies", headers=bearer("tok-alice"))
    assert answer.status_code == 200
    assert [p["policy"] for p in answer.json()] == ["other/balanced"]
    # One who may list them everywhere is asked that once, not once per namespace.
    reviewer.granted.add(("alice", Permission("list", "marl.dev", "routingpolicies")))
    client, _, _ = guarded(reviewer)
    reviewer.asked.clear()
    answer = client.get("/api/v1/policies", headers=bearer("tok-alice"))
    assert sorted(p["policy"] for p in answer.json()) == ["edge/balanced", "other/balanced"]
    assert len(reviewer.asked) == 2  # the token, then the one question


def test_probes_and_the_schema_stay_open_and_metrics_too_unless_protected(reviewer) -> None:
    client, _, _ = guarded(reviewer)
    for path in ("/healthz", "/readyz", "/openapi.json", "/metrics"):
        assert client.get(path).status_code == 200, path
    client, _, _ = guarded(reviewer, protect_metrics=True)
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=bearer("tok-alice")).status_code == 403
    reviewer.granted.add(("alice", Permission("get", path="/metrics")))
    client, _, _ = guarded(reviewer, protect_metrics=True)
    scraped = client.get("/metrics", headers=bearer("tok-alice"))
    assert scraped.status_code == 200 and "marl_operator_cycles_total" in scraped.text


def test_metrics_cannot_be_protected_without_a_login() -> None:
    with pytest.raises(ValueError, match="needs access"):
        create_app(ReportStore(), Instruments(), ready=lambda: True, protect_metrics=True)


def test_when_the_api_server_cannot_be_asked_nothing_is_served(reviewer) -> None:
    client, _, _ = guarded(reviewer)
    reviewer.down = True
    answer = client.get("/api/v1/policies/edge/balanced", headers=bearer("tok-alice"))
    assert answer.status_code == 503 and answer.headers["retry-after"] == "10"
    assert "cannot be checked" in answer.json()["detail"]
    assert client.get("/healthz").status_code == 200
