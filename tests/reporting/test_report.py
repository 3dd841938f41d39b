"""report.py on hand-made results directories: summary numbers, written files, bad input."""

import json
import math

import numpy as np
import pytest

from fgrpo.errors import ConfigError, DataError
from fgrpo.reporting.report import (
    accuracy_curve,
    accuracy_drop,
    aggregation_weight_curves,
    bytes_communicated,
    client_curves,
    curve_from_series,
    final_accuracy,
    format_bytes,
    format_mean_std,
    load_runs,
    rounds_to_target,
    stability,
    start_accuracy,
    summarize,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Hand-chosen global held-out accuracy per method, seed, round 0..3.
ACC = {
    "fgrpo": {0: [0.20, 0.40, 0.50, 0.70], 1: [0.20, 0.30, 0.60, 0.50]},
    "fedavg": {0: [0.20, 0.25, 0.30, 0.40], 1: [0.20, 0.30, 0.25, 0.40]},
}
# Bytes (up, down) per round 1..3; round 0 is the initial model and sends nothing.
BYTES = {"fgrpo": (2048, 1024), "fedavg": (512 * 1024, 512 * 1024)}
# FGRPO aggregation weights of (client 0, client 1) per seed and round.
WEIGHTS = {"fgrpo": {0: (0.7, 0.3), 1: (0.6, 0.4)}, "fedavg": {0: (0.5, 0.5), 1: (0.5, 0.5)}}
WALL_S = {("fgrpo", 0): 120.0, ("fgrpo", 1): 180.0}


def _write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _federated_records(method, seed):
    records = []
    for t, acc in enumerate(ACC[method][seed]):
        up, down = BYTES[method] if t > 0 else (0, 0)
        base = {"method": method, "seed": seed, "round": t}
        records.append(
            {"kind": "round", **base, "global/acc_heldout": acc, "comm/bytes_up": up, "comm/bytes_down": down}
        )
        if t == 0:
            continue
        for client in (0, 1):
            records.append(
                {
                    "kind": "client", **base, "client": client,
                    # client 0 rewards in [0, 1], client 1 on a -5..5 scale.
                    "client/reward_mean": acc if client == 0 else 10 * acc - 5,
                    "client/acc_heldout": acc + (0.1 if client == 0 else -0.1),
                    "agg/weight": WEIGHTS[method][seed][client],
                }
            )
    return records


@pytest.fixture
def compare_dir(tmp_path):
    root = tmp_path / "cmp"
    for method in ACC:
        for seed in (0, 1):
            run_dir = root / method / f"seed{seed}"
            _write_jsonl(run_dir / "metrics.jsonl", _federated_records(method, seed))
            if (method, seed) in WALL_S:
                summary = {"method": method, "seed": seed, "wall_s": WALL_S[(method, seed)]}
                (run_dir / "summary.json").write_text(json.dumps(summary))
    (root / "compare.json").write_text(json.dumps({"methods": list(ACC), "seeds": [0, 1], "scenario": "two-scales"}))
    return root


@pytest.fixture
def train_dir(tmp_path):
    run_dir = tmp_path / "train"
    base = {"method": "fgrpo", "seed": 7}
    steps = [{"kind": "step", **base, "step": s, "train/reward_mean": 0.1 * s} for s in range(5)]
    evals = [{"kind": "eval", **base, "step": s, "eval/acc_heldout": a} for s, a in [(0, 0.1), (2, 0.3), (4, 0.25)]]
    _write_jsonl(run_dir / "metrics.jsonl", steps + evals)
    return run_dir


def _runs(compare_dir, method):
    return [r for r in load_runs(compare_dir) if r.method == method]


# ------------------------------------------------------------------------------------ loading


def test_load_runs_reads_compare_dir(compare_dir):
    runs = load_runs(compare_dir)
    assert [(r.method, r.seed) for r in runs] == [("fgrpo", 0), ("fgrpo", 1), ("fedavg", 0), ("fedavg", 1)]
    fgrpo0 = runs[0]
    assert fgrpo0.dir == compare_dir / "fgrpo" / "seed0"
    assert len(fgrpo0.records["round"]) == 4 and len(fgrpo0.records["client"]) == 6
    assert fgrpo0.summary == {"method": "fgrpo", "seed": 0, "wall_s": 120.0}
    assert runs[2].summary is None


def test_load_runs_reads_single_run_dir(compare_dir):
    (run,) = load_runs(compare_dir / "fedavg" / "seed1")
    assert (run.method, run.seed, run.is_train) == ("fedavg", 1, False)


# ---------------------------------------------------------------------------------- summaries


def test_accuracy_curve_mean_and_sample_std_over_seeds(compare_dir):
    curve = accuracy_curve(_runs(compare_dir, "fgrpo"))
    np.testing.assert_array_equal(curve.x, [0, 1, 2, 3])
    np.testing.assert_allclose(curve.mean, [0.20, 0.35, 0.55, 0.60])
    # two seeds a and b: sample std = |a - b| / sqrt(2)
    np.testing.assert_allclose(curve.std, [0.0, 0.1 / math.sqrt(2), 0.1 / math.sqrt(2), 0.2 / math.sqrt(2)])
    np.testing.assert_array_equal(curve.n, [2, 2, 2, 2])


def test_curve_from_series_averages_only_seeds_that_logged_a_point():
    curve = curve_from_series([{0: 1.0, 1: 3.0}, {0: 2.0}])
    np.testing.assert_allclose(curve.mean, [1.5, 3.0])
    np.testing.assert_allclose(curve.std, [math.sqrt(0.5), 0.0])
    np.testing.assert_array_equal(curve.n, [2, 1])


def test_final_accuracy(compare_dir):
    mean, std = final_accuracy(_runs(compare_dir, "fgrpo"))
    assert mean == pytest.approx(0.60) and std == pytest.approx(0.2 / math.sqrt(2))
    assert final_accuracy(_runs(compare_dir, "fedavg")) == pytest.approx((0.40, 0.0))
    assert final_accuracy([]) is None


def test_rounds_to_target(compare_dir):
    fgrpo = accuracy_curve(_runs(compare_dir, "fgrpo"))  # means 0.20 0.35 0.55 0.60
    assert rounds_to_target(fgrpo, 0.54) == 2
    assert rounds_to_target(fgrpo, 0.55) == 2  # ≥, not >
    assert rounds_to_target(fgrpo, 0.20) == 0
    assert rounds_to_target(fgrpo, 0.61) is None


def test_bytes_communicated(compare_dir):
    assert [bytes_communicated(r) for r in _runs(compare_dir, "fgrpo")] == [3 * 3072, 3 * 3072]
    assert bytes_communicated(_runs(compare_dir, "fedavg")[0]) == 3 * 1024 * 1024


def test_stability_is_mean_total_accuracy_drop(compare_dir):
    assert accuracy_drop({0: 0.2, 1: 0.5, 2: 0.3, 3: 0.4, 4: 0.1}) == pytest.approx(0.2 + 0.3)
    assert accuracy_drop({0: 0.1, 1: 0.2}) == 0.0
    assert stability(_runs(compare_dir, "fgrpo")) == pytest.approx((0.0 + 0.1) / 2)
    assert stability(_runs(compare_dir, "fedavg")) == pytest.approx((0.0 + 0.05) / 2)


def test_client_curves_mean_over_seeds(compare_dir):
    curves = client_curves(_runs(compare_dir, "fgrpo"), "client/reward_mean")
    assert sorted(curves) == [0, 1]
    np.testing.assert_allclose(curves[0].mean, [0.35, 0.55, 0.60])
    np.testing.assert_allclose(curves[1].mean, [10 * 0.35 - 5, 10 * 0.55 - 5, 10 * 0.60 - 5])


def test_aggregation_weights_count_unsampled_client_as_zero(compare_dir):
    runs = _runs(compare_dir, "fgrpo")
    curves = aggregation_weight_curves(runs)
    np.testing.assert_allclose(curves[0].mean, [0.65] * 3)
    np.testing.assert_allclose(curves[1].mean, [0.35] * 3)
    # seed 1 samples only client 0 in round 1 (weight 1.0): client 1's mean there is (0.3 + 0) / 2
    runs[1].records["client"] = [
        r for r in runs[1].records["client"] if not (r["round"] == 1 and r["client"] == 1)
    ]
    for r in runs[1].records["client"]:
        if r["round"] == 1:
            r["agg/weight"] = 1.0
    curves = aggregation_weight_curves(runs)
    assert curves[1].mean[0] == pytest.approx(0.15)
    assert curves[0].mean[0] == pytest.approx(0.85)


def test_summarize_default_target_is_90_percent_of_the_way_to_the_best_final(compare_dir):
    summaries, target = summarize(load_runs(compare_dir))
    assert target == pytest.approx(0.20 + 0.9 * (0.60 - 0.20))  # start 20%, best final mean 60%
    by_method = {s.method: s for s in summaries}
    assert by_method["fgrpo"].to_target == 3 and by_method["fedavg"].to_target is None
    assert by_method["fgrpo"].bytes_total == 9216 and by_method["fedavg"].bytes_total == 3 * 1024**2
    assert by_method["fgrpo"].wall_s == 150.0 and by_method["fedavg"].wall_s is None
    _, given = summarize(load_runs(compare_dir), target=0.3)
    assert given == 0.3


def test_summarize_rejects_target_given_in_percent(compare_dir):
    with pytest.raises(ConfigError, match="target=54"):
        summarize(load_runs(compare_dir), target=54)


def test_formatting():
    assert format_bytes(512) == "512 B"
    assert format_bytes(9216) == "9.0 KiB"
    assert format_bytes(3 * 1024**2) == "3.0 MiB"
    assert format_mean_std((0.6, 0.1414), 2) == "60.0% ± 14.1 pp"
    assert format_mean_std((0.6, 0.0), 1) == "60.0%"


# ------------------------------------------------------------------------------------- report


def _assert_png(path):
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_write_report_compare_dir(compare_dir):
    md_path = write_report(compare_dir)
    out = compare_dir / "report"
    assert md_path == out / "report.md"
    for name in ("accuracy.png", "client_accuracy.png", "aggregation_weights.png", "client_rewards.png"):
        _assert_png(out / name)
    assert not (out / "train_reward.png").exists()
    md = md_path.read_text()
    assert "| fgrpo | 2 | 20.0% ± 0.0 pp | 60.0% ± 14.1 pp | 3 | 9.0 KiB | 5.0 pp | 2.5 min |" in md
    assert "| fedavg | 2 | 20.0% ± 0.0 pp | 40.0% ± 0.0 pp | not reached | 3.0 MiB | 2.5 pp | – |" in md
    assert "56.0%" in md and "two-scales" in md
    assert "![Client rewards (each on its own scale)](client_rewards.png)" in md
    assert "How to read this" in md
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and '<img src="accuracy.png"' in page
    assert "<td>60.0% ± 14.1 pp</td>" in page


def test_write_report_given_target_and_out_dir(compare_dir, tmp_path):
    md_path = write_report(compare_dir, target=0.3, out_dir=tmp_path / "elsewhere")
    assert md_path == tmp_path / "elsewhere" / "report.md"
    md = md_path.read_text()
    assert "30.0% (given)" in md
    assert "| fedavg | 2 | 20.0% ± 0.0 pp | 40.0% ± 0.0 pp | 3 |" in md  # means 0.20 0.275 0.275 0.40
    assert "| fgrpo | 2 | 20.0% ± 0.0 pp | 60.0% ± 14.1 pp | 1 |" in md


def test_write_report_skips_plots_without_data(compare_dir):
    # fedavg alone (a folder of seed<k>/ runs): it has agg/weight but only FGRPO/reward_weighted get a plot.
    md_path = write_report(compare_dir / "fedavg", out_dir=compare_dir / "fedavg_report")
    out = md_path.parent
    assert not (out / "aggregation_weights.png").exists()
    assert "aggregation_weights.png" not in md_path.read_text()
    _assert_png(out / "accuracy.png")


def test_write_report_train_run(train_dir):
    md_path = write_report(train_dir)
    out = train_dir / "report"
    _assert_png(out / "accuracy.png")
    _assert_png(out / "train_reward.png")
    for name in ("client_accuracy.png", "aggregation_weights.png", "client_rewards.png"):
        assert not (out / name).exists()
    md = md_path.read_text()
    # start 10%, final 25%; default target 10% + 0.9 * 15% = 23.5%, first reached at step 2
    assert "| fgrpo | 1 | 10.0% | 25.0% | 2 |" in md
    assert "23.5%" in md
    assert "Rounds to target" not in md
    (run,) = load_runs(train_dir)
    assert run.is_train and start_accuracy([run]) == (0.1, 0.0)


# ---------------------------------------------------------------------------------- bad input


def test_missing_dir_raises(tmp_path):
    with pytest.raises(DataError, match="nope"):
        load_runs(tmp_path / "nope")


def test_dir_without_runs_raises(tmp_path):
    with pytest.raises(DataError, match="no runs found"):
        write_report(tmp_path)


def test_seed_dir_without_metrics_raises(compare_dir):
    (compare_dir / "fedavg" / "seed2").mkdir()
    with pytest.raises(DataError, match=r"seed2: expected a metrics\.jsonl"):
        load_runs(compare_dir)


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        ('{"kind": "round", "round": 1, "global/acc', "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"round": 1, "global/acc_heldout": 0.5}', 'missing "kind"'),
        ('{"kind": "round", "round": 1, "global/acc_heldout": "0.5"}', '"global/acc_heldout" must be a number'),
        ('{"kind": "round", "round": 1.5}', '"round" must be an integer'),
    ],
)
def test_bad_metrics_line_names_file_and_line(compare_dir, bad_line, expected):
    metrics = compare_dir / "fgrpo" / "seed1" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines.insert(2, bad_line)
    metrics.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        load_runs(compare_dir)
    assert f"{metrics}:3:" in str(info.value)
    assert expected in str(info.value)


def test_empty_metrics_file_raises(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("\n")
    with pytest.raises(DataError, match="metrics.jsonl: empty"):
        load_runs(tmp_path)


def test_null_metric_counts_as_not_measured(tmp_path):
    # results.MetricsWriter writes NaN/Inf as null.
    records = [{"kind": "round", "method": "fedavg", "seed": 0, "round": t, "global/acc_heldout": a}
               for t, a in enumerate([0.2, None, 0.4])]
    _write_jsonl(tmp_path / "metrics.jsonl", records)
    np.testing.assert_array_equal(accuracy_curve(load_runs(tmp_path)).x, [0, 2])


def test_bad_summary_json_raises(compare_dir):
    summary = compare_dir / "fgrpo" / "seed0" / "summary.json"
    summary.write_text("{not json")
    with pytest.raises(DataError, match=r"summary\.json:1"):
        load_runs(compare_dir)


def test_per_owner_table_shows_global_personalized_and_local_only_models(tmp_path):
    """Each owner's last client/acc_heldout per method, mean ± std over seeds; only when two kinds of model ran."""
    from fgrpo.reporting.report import write_report
    from fgrpo.reporting.runs import final_client_accuracy

    own = {"fedavg": (0.40, 0.20), "fedsa": (0.60, 0.50), "local": (0.70, 0.30)}  # client 0, client 1 at seed 0
    root = tmp_path / "cmp"
    for method, (acc0, acc1) in own.items():
        for seed in (0, 1):
            records = [{"kind": "round", "method": method, "seed": seed, "round": 0, "global/acc_heldout": 0.1}]
            for t in (1, 2):  # round 1's value is not the final one
                for client, acc in ((0, acc0), (1, acc1)):
                    value = acc + 0.1 * seed if t == 2 else 0.0
                    records.append({"kind": "client", "method": method, "seed": seed, "round": t, "client": client,
                                    "client/reward_mean": 0.5, "client/acc_heldout": value})
                records.append({"kind": "round", "method": method, "seed": seed, "round": t, "global/acc_heldout": 0.3})
            _write_jsonl(root / method / f"seed{seed}" / "metrics.jsonl", records)
    (root / "compare.json").write_text(json.dumps({"methods": list(own), "seeds": [0, 1], "scenario": "owners"}))
    finals = final_client_accuracy([r for r in load_runs(root) if r.method == "fedsa"])
    assert finals[0][0] == pytest.approx(0.65) and finals[1][0] == pytest.approx(0.55)  # mean of seeds 0 and 1
    assert finals[0][1] == pytest.approx(np.std([0.6, 0.7], ddof=1))
    text = write_report(root).read_text()
    assert "Per owner: global, personalized and local-only models" in text
    assert "| Owner | fedavg (global) | fedsa (personalized) | local (local-only) |" in text
    assert "| client 0 | 45.0% ± 7.1 pp | 65.0% ± 7.1 pp | 75.0% ± 7.1 pp |" in text


def test_no_per_owner_table_when_every_method_shares_one_global_model(compare_dir):
    from fgrpo.reporting.report import write_report

    assert "Per owner" not in write_report(compare_dir).read_text()


def test_the_words_say_which_test_stood_in_the_way_of_a_claim():
    from fgrpo.reporting.report import why_no_difference
    from fgrpo.reporting.stats import paired_comparison

    narrow = paired_comparison({0: 0.603, 1: 0.627, 2: 0.663}, {0: 0.60, 1: 0.62, 2: 0.64})
    assert "t-test does not reject" in why_no_difference(narrow)
    covering = paired_comparison({0: 0.61, 1: 0.61, 2: 0.65}, {0: 0.60, 1: 0.62, 2: 0.64})
    assert why_no_difference(covering) == "the 95% interval covers 0"


# ------------------------------------------------------------------ the user's files (issue 24)


def test_report_out_dir_keeps_the_users_report_md(compare_dir, tmp_path):
    out = tmp_path / "docs"
    out.mkdir()
    (out / "report.md").write_text("my own report")
    with pytest.raises(ConfigError, match="already holds report.md; pass --overwrite"):
        write_report(compare_dir, out_dir=out)
    with pytest.raises(ConfigError, match="refusing to overwrite report.md"):
        write_report(compare_dir, out_dir=out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["report.md"] and (out / "report.md").read_text() == "my own report"


def test_report_out_dir_replaces_its_own_report_only_with_overwrite(compare_dir, tmp_path):
    out = tmp_path / "elsewhere"
    write_report(compare_dir, out_dir=out)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="pass --overwrite"):
        write_report(compare_dir, out_dir=out, target=0.3)
    assert "30.0% (given)" in write_report(compare_dir, out_dir=out, target=0.3, overwrite=True).read_text()
    assert (out / "notes.txt").read_text() == "mine"


def test_report_in_its_default_folder_is_regenerated(compare_dir):
    write_report(compare_dir)
    assert "30.0% (given)" in write_report(compare_dir, target=0.3).read_text()


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_report_out_dir_naming_a_file_is_one_clear_error(compare_dir, tmp_path, where):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        write_report(compare_dir, out_dir=tmp_path / "f" if where == "file" else tmp_path / "f" / "sub")
    assert (tmp_path / "f").read_text() == "x"


def test_binary_metrics_file_names_its_line(compare_dir):
    run = compare_dir / "fedavg" / "seed0" / "metrics.jsonl"
    run.write_bytes(run.read_bytes() + b"\x89PNG\xff\xfe\x00\n")
    with pytest.raises(DataError, match=r"seed0/metrics\.jsonl:\d+: not UTF-8 text"):
        write_report(compare_dir)


def test_cli_report_errors_are_one_line(compare_dir, tmp_path):
    from typer.testing import CliRunner

    from fgrpo.cli import app

    (tmp_path / "f").write_text("x")
    result = CliRunner().invoke(app, ["report", str(compare_dir), "--out-dir", str(tmp_path / "f")])
    assert result.exit_code == 2 and "Traceback" not in result.output and "not a folder" in result.output
    ok = CliRunner().invoke(app, ["report", str(compare_dir), "--out-dir", str(tmp_path / "r")])
    again = CliRunner().invoke(app, ["report", str(compare_dir), "--out-dir", str(tmp_path / "r"), "--overwrite"])
    assert ok.exit_code == 0 and again.exit_code == 0, again.output
