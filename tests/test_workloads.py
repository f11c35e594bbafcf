import csv

import numpy as np
import pytest

from simulator import workloads
from simulator.scenario import WorkloadSpec


def draw(kind, b=400, t=288, seed=0, **params):
    return workloads.generate(WorkloadSpec(kind, params), np.random.default_rng(seed), b, t)


def test_sinusoidal_matches_the_reference_statistics():
    x = draw("sinusoidal")
    assert x.dtype == np.int32 and x.min() >= 0 and x.max() <= 150
    assert x.mean() == pytest.approx(62.8, abs=1.0)  # measured on the original: 62.8 per step
    assert (x == 0).mean() == pytest.approx(0.32, abs=0.02)


def test_normal_truncates_and_clips():
    from scipy.stats import norm

    x = draw("normal")
    assert x.min() == 0 and x.max() <= 150
    # int() truncates toward zero, then clip to [0, 150]: value k has P(k <= X < k + 1) for
    # 1 <= k < 150, and 150 takes the whole upper tail.
    k = np.arange(1, 150)
    cdf = norm(61, 32).cdf
    expected = (k * (cdf(k + 1) - cdf(k))).sum() + 150 * (1 - cdf(150))
    assert x.mean() == pytest.approx(expected, abs=0.3)


def test_same_seed_same_trace_and_different_seed_different_trace():
    assert np.array_equal(draw("bursty", seed=3), draw("bursty", seed=3))
    assert not np.array_equal(draw("bursty", seed=3), draw("bursty", seed=4))


def test_bursty_spends_time_in_both_states():
    x = draw("bursty", calm_rate=10, burst_rate=100, p_burst=0.05, p_calm=0.25)
    assert 0.1 < (x > 55).mean() < 0.25  # stationary burst share 0.05 / 0.30 = 1/6


def test_step_levels():
    x = draw("step", b=2, t=10, levels=[[0, 5], [4, 50]], poisson=False)
    assert x[0].tolist() == [5, 5, 5, 5, 50, 50, 50, 50, 50, 50]


def test_replay_and_azure_formats(tmp_path):
    replay = tmp_path / "series.csv"
    replay.write_text("t,rate\n" + "".join(f"{i},{i * 10}\n" for i in range(5)))
    x = draw("replay", b=1, t=7, path=str(replay), column="rate")
    assert x[0].tolist() == [0, 10, 20, 30, 40, 0, 10]

    azure = tmp_path / "invocations_per_function_md.anon.d01.csv"
    minutes = np.arange(1440)
    rows = {
        "keep": 100 + 80 * np.sin(2 * np.pi * minutes / 1440),  # smooth daily cycle: passes filters
        "flat": np.full(1440, 7.0),  # std 0 after scaling: filtered out
        "timer": 100 + 80 * np.sin(2 * np.pi * minutes / 720),  # not http: filtered out
    }
    with open(azure, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["HashOwner", "HashApp", "HashFunction", "Trigger", *map(str, range(1, 1441))])
        for name, series in rows.items():
            w.writerow(
                [
                    "o",
                    "a",
                    name,
                    "timer" if name == "timer" else "http",
                    *series.round().astype(int),
                ]
            )
    kept = workloads.azure_functions(str(azure), "http", 288, 150.0, (30.0, 130.0), (10.0, 60.0))
    assert kept.shape == (1, 288) and kept.max() == 150 and kept.min() == 0
    x = draw("azure", b=3, t=288, path=str(azure))
    assert (x == kept[0]).all()
    # Episodes shorter or longer than a day replay their function from its start (wrapped).
    for t in (100, 300):
        x = draw("azure", b=3, t=t, path=str(azure))
        assert (x == kept[0][np.arange(t) % 288]).all()


def test_azure_rejects_other_formats(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(ValueError, match="Azure Functions 2019"):
        draw("azure", b=1, t=288, path=str(bad))


AZURE_HEADER = ",".join(
    ["HashOwner", "HashApp", "HashFunction", "Trigger"] + [str(m) for m in range(1, 1441)]
)
AZURE_ROW = ",".join(["o", "a", "f", "http"] + ["1"] * 1440)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty file"),
        (f"{AZURE_HEADER}\n{AZURE_ROW}\n\n{AZURE_ROW}\n", "line 3: 0 columns"),
        (f"{AZURE_HEADER}\n{AZURE_ROW}\no,a,f,http,1\n", "line 3: 5 columns"),
        (f"{AZURE_HEADER}\n{AZURE_ROW[:-1]}x\n", "line 2: minute 1440 holds 'x'"),
    ],
    ids=["empty", "blank line", "short row", "not a number"],
)
def test_a_damaged_azure_file_is_refused_naming_the_line(tmp_path, text, message):
    damaged = tmp_path / "damaged.csv"
    damaged.write_text(text)
    with pytest.raises(ValueError, match=message):
        draw("azure", b=1, t=288, path=str(damaged))


def test_a_trace_edited_after_it_was_read_is_read_again(tmp_path):
    """Traces were cached by path for the life of the process: a long session replayed the
    file as it first was."""
    series = tmp_path / "series.csv"
    series.write_text("rate\n5\n")
    assert draw("replay", b=1, t=2, path=str(series), column="rate").tolist() == [[5, 5]]
    series.write_text("rate\n99\n")
    assert draw("replay", b=1, t=2, path=str(series), column="rate").tolist() == [[99, 99]]


@pytest.mark.parametrize(
    ("kind", "params", "message"),
    [
        ("poisson", {"rate": -1.0}, "'rate' must be >= 0, got -1.0"),
        ("normal", {"std": -3.0}, "'std' must be >= 0"),
        ("diurnal", {"amplitude": -5.0}, "'amplitude' must be >= 0"),
        ("diurnal", {"period": -10}, "'period' must be >= 0"),
        ("sinusoidal", {"blocks": 0}, "'blocks' must be >= 1"),
        ("sinusoidal", {"period_min": 0.0}, "'period_min' must be > 0"),
        ("sinusoidal", {"period_min": 90.0, "period_max": 20.0}, "must not exceed 'period_max'"),
        ("bursty", {"p_burst": 1.5}, "'p_burst' must be <= 1"),
        ("bursty", {"p_burst": 0.0, "p_calm": 0.0}, "cannot both be 0"),
        ("step", {"levels": [[0, 5.0], [10, -2.0]]}, "rates >= 0"),
        ("step", {"levels": [[-1, 5.0]]}, "steps and rates >= 0"),
        ("replay", {"path": "x.csv", "column": "r", "scale": -1.0}, "'scale' must be >= 0"),
        ("azure", {"path": "x.csv", "bins": 7}, "'bins' must divide 1440"),
        ("azure", {"path": "x.csv", "mean_range": [90.0, 30.0]}, "low <= high"),
    ],
)
def test_out_of_range_parameters_are_refused_by_name(kind, params, message):
    with pytest.raises(ValueError, match=f"workload {kind!r}") as err:
        workloads.validate(kind, params)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("t,rate\n", "has no rows to replay"),
        ("t,rate\n0,5\n1,lots\n", "line 3: column 'rate' holds 'lots', not a rate"),
        ("t,rate\n0,inf\n", "line 2: column 'rate' holds 'inf'"),
        ("t,rate\n0,5\n1,5\n2,nan\n", "line 4: column 'rate' holds 'nan'"),
        ("t,rate\n0,-3\n", "holds '-3', not a rate"),
    ],
)
def test_replay_refuses_a_column_it_cannot_replay(tmp_path, text, message):
    series = tmp_path / "series.csv"
    series.write_text(text)
    with pytest.raises(ValueError, match=message):
        draw("replay", b=1, t=4, path=str(series), column="rate")


def test_more_sinusoidal_blocks_than_steps_is_refused_by_name():
    with pytest.raises(ValueError, match=r"'blocks' \(5\) exceeds the 4 steps"):
        draw("sinusoidal", b=1, t=4, blocks=5)
