"""The decision latency benchmark: a tiny run prints the JSON it promises, with real
decisions timed (not fall-backs) on a mesh that fits the bundled checkpoint."""

from benchmark_runner import run_benchmark


def test_a_tiny_run_times_decisions_and_prints_one_json_object():
    report = run_benchmark("decision", "--agents", "6", "12", "--trials", "3", "--horizon", "2")
    assert [r["agents"] for r in report["results"]] == [6, 12]
    for result in report["results"]:
        assert result["horizon"] == 2 and result["trials"] == 3
        assert result["fallbacks_not_timed"] < 3  # something was timed
        assert result["timed"] + result["fallbacks_not_timed"] == 3
        assert 0 < result["decision_ms_p50"] <= result["decision_ms_p95"]
        assert result["decision_ms_p95"] <= result["decision_ms_max"]
        assert 0 <= result["agents_changed_mean"] <= result["agents"]
    assert report["peak_rss_mb"] > 0
