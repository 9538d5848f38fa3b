"""Detection studies' analysis (`analysis.detection`): the tables on frames of known values, the AUROC figure, and
`study report` on a detect experiment written the way Tune writes one (no Ray started)."""
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.container import ErrorbarContainer

from analysis import detection, frames, load

PLANTED_METRICS = ("auroc", "average_precision", "precision_at_n", "recall_at_n", "precision_at_1pct",
                   "worst_planted_rank", "best_planted_rank", "planted_score_min", "planted_score_median",
                   "planted_score_max")


def row(method: str, pattern: str, n: int, seed: int, auroc: float = math.nan, **extra) -> dict:
    """Return one finished detect row: AUROC `auroc`, AP = AUROC / 2, precision = recall at n = AUROC − 0.1,
    precision at 1 % 0.2, worst rank 100 + 10·seed, planted scores 2 + seed, top-1 score 3, score at 1 % 1 + seed
    (the planted metrics NaN at n = 0)."""
    planted = {"auroc": auroc, "average_precision": auroc / 2, "precision_at_n": auroc - 0.1,
               "recall_at_n": auroc - 0.1, "precision_at_1pct": 0.2, "worst_planted_rank": 100.0 + 10 * seed,
               "planted_score_median": 2.0 + seed}
    return {"kind": "detect", "status": "TERMINATED", "method": method, "pattern": pattern, "n_spurious": n,
            "data_seed": seed, "seed": seed, "model": "large_mlp", "scope": "class",
            **{k: (math.nan if n == 0 else v) for k, v in planted.items()}, "score_top1": 3.0,
            "score_at_1pct": 1.0 + seed, "source_spurious_score": 0.1 * n + 0.01 * seed,
            "control_patterns": "s3,r3" if n == 0 else math.nan, **extra}


@pytest.fixture
def frame() -> pd.DataFrame:
    """Methods loss and tracin, patterns s3 and r3 at n = 3, 10 with seeds 0 and 1 (AUROC 0.8 + 0.1·seed for s3,
    0.6 for r3), one shared n = 0 control per method and seed, and an errored trial of each kind of failure."""
    rows = [row(m, p, n, s, (0.8 + 0.1 * s) if p == "s3" else 0.6) for m in ("tracin", "loss")
            for p in ("s3", "r3") for n in (3, 10) for s in (0, 1)]
    rows += [row(m, "s3", 0, s) for m in ("tracin", "loss") for s in (0, 1)]
    rows.append({**row("loss", "s3", 3, 2), "status": "ERROR", "auroc": math.nan, "error": "boom"})
    rows.append({"kind": "detect", "status": "ERROR", "method": "loss", "error": "before any report"})
    return pd.DataFrame(rows)


def test_detection_table_is_mean_and_se_over_replicates_per_method_pattern_and_n(frame):
    table = detection.detection_table(frame)
    assert list(table.columns[:4]) == ["method", "pattern", "n_spurious", "replicates"]  # nothing else varies
    assert list(dict.fromkeys(table["method"])) == ["loss", "tracin"]  # METHODS order
    assert list(table["pattern"].unique()) == ["S3", "R3"]  # the paper's labels, in canonical-name order
    cell = table.set_index(["method", "pattern", "n_spurious"]).loc[("loss", "S3", 3)]
    assert cell["replicates"] == 2  # the errored trials are not replicates
    assert cell["auroc_mean"] == pytest.approx(0.85)
    assert cell["auroc_se"] == pytest.approx(np.std([0.8, 0.9], ddof=1) / np.sqrt(2))
    assert cell["average_precision_mean"] == pytest.approx(0.425)
    assert cell["precision_at_n_mean"] == pytest.approx(0.75) and cell["recall_at_n_mean"] == pytest.approx(0.75)
    assert cell["precision_at_1pct_se"] == pytest.approx(0.0)
    assert cell["worst_planted_rank_median"] == pytest.approx(105.0)
    assert cell["planted_score_median_mean"] == pytest.approx(2.5)
    assert cell["source_spurious_score_mean"] == pytest.approx(0.305)
    assert (table["n_spurious"] > 0).all() and len(table) == 2 * 2 * 2


def test_a_varying_config_column_or_setting_splits_the_rows_and_a_method_missing_a_value_is_left_out(frame):
    frame.loc[frame["seed"] == 1, "model"] = "small_cnn"
    frame.loc[(frame["method"] == "tracin") & (frame["n_spurious"] == 3), "auroc"] = math.nan  # cannot score
    table = detection.detection_table(frame)
    assert list(table.columns[:5]) == ["method", "model", "pattern", "n_spurious", "replicates"]
    cell = table.set_index(["method", "model", "pattern", "n_spurious"]).loc[("loss", "large_mlp", "S3", 3)]
    assert cell["replicates"] == 1 and cell["auroc_mean"] == pytest.approx(0.8) and math.isnan(cell["auroc_se"])
    tracin = table[(table["method"] == "tracin") & (table["n_spurious"] == 3)]
    assert tracin["auroc_mean"].isna().all() and (tracin["replicates"] == 1).all()
    frame["scope"] = np.where(frame["data_seed"] == 0, "class", "all")
    assert "scope" in detection.detection_table(frame).columns


def test_control_table_sets_clean_models_scores_beside_the_planted_scores_of_each_pattern(frame):
    table = detection.control_table(frame).set_index(["method", "pattern"])
    assert sorted(table.index) == [("loss", "R3"), ("loss", "S3"), ("tracin", "R3"), ("tracin", "S3")]
    cell = table.loc[("loss", "R3")]  # the n = 0 models count for every pattern of control_patterns
    assert cell["controls"] == 2 and cell["score_top1_mean"] == 3.0 and cell["score_top1_se"] == 0.0
    assert cell["score_at_1pct_mean"] == pytest.approx(1.5) and cell["score_at_1pct_se"] == pytest.approx(0.5)
    # beside them the same statistics of the planted models (n = 3 and 10, seeds 0 and 1): top-1 3, at 1 % 1 + seed
    assert cell["planted_trials"] == 4 and cell["planted_top1_mean"] == 3.0
    assert cell["planted_at_1pct_mean"] == pytest.approx(1.5)
    frame.loc[(frame["n_spurious"] == 10) & (frame["data_seed"] == 1), "score_top1"] = 7.0
    cell = detection.control_table(frame).set_index(["method", "pattern"]).loc[("loss", "S3")]
    assert cell["planted_top1_mean"] == pytest.approx(4.0) and cell["score_top1_mean"] == 3.0


def test_a_control_without_control_patterns_counts_for_its_own_pattern(frame):
    frame["control_patterns"] = math.nan
    table = detection.control_table(frame)
    assert sorted(set(table["pattern"])) == ["S3"] and (table["controls"] == 2).all()


def test_frames_without_planted_trials_without_controls_or_empty_give_empty_tables_and_figures(frame):
    controls_only = frame[frame["n_spurious"] == 0]
    assert detection.detection_table(controls_only).empty
    assert len(detection.control_table(controls_only)) == 4
    assert detection.control_table(controls_only)["planted_trials"].eq(0).all()
    assert detection.control_table(frame[frame["n_spurious"] != 0]).empty
    errored = frame[frame["status"] == "ERROR"]
    for df in (controls_only, errored, frame.iloc[0:0], pd.DataFrame({"status": ["ERROR"], "kind": ["detect"]})):
        assert detection.detection_table(df).empty and detection.detection_table(df, compact=True).empty
        assert len(detection.detection_figure(df).axes) == 1
        assert "no finished detection trials with planted examples" in detection.detection_text(df)
    assert "no finished n = 0 control trials" in detection.detection_text(errored)


def test_compact_tables_print_within_100_columns(frame):
    frame["method"] = frame["method"].replace("tracin", "activation_clustering")  # the longest name
    text = detection.detection_text(frame)
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "0.85 ± 0.05" in text and "AUROC" in text and "top-1" in text
    compact = detection.detection_table(frame, compact=True)
    assert compact.index.names == ["method", "pattern", "n"]
    assert compact.loc[("loss", "S3", 3), "worst"] == "105"  # the median of 100 and 110
    assert compact.loc[("loss", "S3", 3), "AP/ch."] == "-"  # the frame has no n_candidates: no chance level


def test_auroc_is_tested_against_chance_with_holm_and_marks_need_three_source_models(frame):
    rows = [row("loss", "s3", n, s, auroc) for n, aurocs in ((3, (0.9, 0.95, 0.92)), (10, (0.4, 0.6, 0.5)))
            for s, auroc in enumerate(aurocs)]
    table = detection.detection_table(pd.DataFrame(rows)).set_index("n_spurious")
    from scipy import stats as scipy_stats
    raw = [scipy_stats.ttest_1samp(v, 0.5, alternative="greater").pvalue for v in ((0.9, 0.95, 0.92), (0.4, 0.6, 0.5))]
    assert list(table["auroc_p"]) == pytest.approx(raw)
    assert list(table["auroc_p_holm"]) == pytest.approx([min(1.0, 2 * raw[0]), max(2 * raw[0], raw[1])])
    assert (table["auroc_mark_suppressed"] == "").all()
    compact = detection.detection_table(pd.DataFrame(rows), compact=True)
    assert compact.loc[("loss", "S3", 3), "AUROC"].endswith("*") and not compact.loc[("loss", "S3", 10),
                                                                                      "AUROC"].endswith("*")
    two = detection.detection_table(pd.DataFrame(rows[:2]))  # two source models: no mark
    assert two["auroc_mark_suppressed"].iloc[0] == "2 source models < 3"
    assert detection.detection_table(pd.DataFrame(rows[:2]), compact=True)["AUROC"].iloc[0].endswith("†")


def test_detection_figure_has_a_panel_per_pattern_and_a_curve_per_method(frame):
    frame = pd.concat([frame, pd.DataFrame([row("loss", "s3", 100, s, 0.99) for s in (0, 1)])])
    fig = detection.detection_figure(frame)
    assert [ax.get_title() for ax in fig.axes] == ["S3", "R3"]
    ax = fig.axes[0]
    curves = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert [c.get_label() for c in curves] == ["loss", "tracin"]
    x, y = curves[0].lines[0].get_data()
    assert list(x) == [3, 10, 100] and list(y) == pytest.approx([0.85, 0.85, 0.99])
    chance = [line for line in ax.lines if line.get_label() == "chance"]
    assert chance and chance[0].get_linestyle() == "--" and list(chance[0].get_ydata()) == [0.5, 0.5]
    assert ax.get_ylim() == (0, 1) and ax.get_xscale() == "symlog"
    assert "n (planted" in ax.get_xlabel() and "AUROC" in fig.axes[0].get_ylabel()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["3", "10", "100"]


# ---------------------------------------------------------------- a detect experiment on disk and `study report`


def write_trial(exp: Path, name: str, params: dict, results: list[dict], error: str | None = None) -> Path:
    """Write a Tune trial folder: params.json, one result.json line per report, error.txt."""
    trial = exp / name
    trial.mkdir(parents=True)
    (trial / "params.json").write_text(json.dumps(params))
    if results:
        (trial / "result.json").write_text("".join(json.dumps(r) + "\n" for r in results))
    if error:
        (trial / "error.txt").write_text(f"Traceback (most recent call last):\n  File x\n{error}\n")
    return trial


SOURCE_MODELS = [(0, 0), (0, 1), (3, 0), (3, 1), (10, 0), (10, 1)]  # (n_spurious, data_seed) of the source trials


def training_study(tmp_path: Path) -> Path:
    """A finished training study: pattern s3, n ∈ {0, 3, 10}, data seeds 0 and 1, one epoch each, and a
    bundle trial of two members (n = 3 and n = 10)."""
    exp = tmp_path / "train"
    for k, (n, seed) in enumerate(SOURCE_MODELS):
        params = {"dataset": "fashion", "pattern": "s3", "n_spurious": n, "data_seed": seed, "epochs": 1}
        write_trial(exp, f"train_classifier_abcde_{k:05d}_{k}", params,
                    [{"epoch": 1, "trial_id": f"abcde_{k:05d}", "spurious_score": 0.1 * n, "test_acc": 0.8}])
    members = [{"dataset": "fashion", "pattern": "s3", "n_spurious": n, "data_seed": 5, "epochs": 1} for n in (3, 10)]
    write_trial(exp, "train_bundle_bbbbb_00000_0", {"bundle": members},
                [{"trial_id": "bbbbb_00000", "members": {str(m): {"epoch": 1, "spurious_score": 0.5, "test_acc": 0.8}
                                                          for m in range(2)}}])
    return exp


def detect_result(trial_id: str, method: str, source: int, n: int, seed: int, auroc: float) -> dict:
    """Return a detect trial's final report as the contract has it (the source model's config included)."""
    planted = n > 0
    value = (lambda v: v if planted else math.nan)
    return {"trial_id": trial_id, "method": method, "source_trial_id": f"abcde_{source:05d}", "source_member": 0,
            "scope": "class", "dataset": "fashion", "model": "large_mlp", "pattern": "corner_square_5",
            "n_spurious": n, "target": 0, "targets": [], "data_seed": seed, "seed": 0, "split": "standard",
            "subset": 0, "val_size": 0, "optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "l2": 0.0, "grad_clip": 0.0,
            "noise_sigma": 0.0, "augmentation": "none", "epochs": 1, "batch_size": 128, "tau": 0.1,
            "source_spurious_score": 0.1 * n, "control_patterns": "" if planted else "s3,r3",
            "n_candidates": 6000.0, "n_planted": float(n), "auroc": value(auroc), "average_precision": value(0.5),
            "k_n": value(float(n)), "precision_at_n": value(0.4), "recall_at_n": value(0.4), "k_1pct": 60.0,
            "precision_at_1pct": value(0.05), "recall_at_1pct": value(1.0), "worst_planted_rank": value(40.0 + seed),
            "best_planted_rank": value(1.0), "score_top1": 5.0, "score_at_1pct": 2.0 + seed, "score_median": 0.1,
            "planted_score_min": value(2.5), "planted_score_median": value(3.0), "planted_score_max": value(4.0),
            "checkpoints": 1, "checkpoint_epochs": "1", "detect_wall_s": 0.5, "loss_mean": 0.3,
            "time_total_s": 0.6}


def detect_study(tmp_path: Path, source: Path) -> Path:
    """A detect study of `source` with methods loss and spectral: one finished trial per source model and
    method (AUROC 0.9 + 0.05·seed for loss, 0.5 for spectral), and two errored trials without a report, one
    naming a plain source trial and one a bundle member (`source_member`)."""
    exp = tmp_path / "train-detect"
    k = 0
    for method in ("loss", "spectral"):
        for source_index, (n, seed) in enumerate(SOURCE_MODELS):
            trial_id = f"ddddd_{k:05d}"
            auroc = 0.9 + 0.05 * seed if method == "loss" else 0.5
            params = {"method": method, "source_trial_id": f"abcde_{source_index:05d}"}
            write_trial(exp, f"detect_{trial_id}_{k}_method={method}", params,
                        [detect_result(trial_id, method, source_index, n, seed, auroc)])
            k += 1
    write_trial(exp, "detect_ddddd_00098_98", {"method": "loss", "source_trial_id": "abcde_00004"}, [],
                error="spurious.errors.SpuriousError: checkpoint cannot be read")
    write_trial(exp, "detect_ddddd_00099_99", {"method": "loss", "source_trial_id": "bbbbb_00000", "source_member": 1},
                [], error="RuntimeError: out of memory")
    (exp / "study.json").write_text(json.dumps({"kind": "detect", "source": str(source),
                                                "methods": ["loss", "spectral"]}))
    return exp


def test_load_reads_a_detect_study_and_fills_errored_trials_from_the_source(tmp_path):
    exp = detect_study(tmp_path, training_study(tmp_path))
    df = load(exp)
    assert len(df) == 14 and set(df["kind"]) == {"detect"} and df["status"].value_counts()["ERROR"] == 2
    done = frames.finished(df)
    assert (done["epochs_done"].isna()).all() and set(done["method"]) == {"loss", "spectral"}
    assert set(done["pattern"]) == {"corner_square_5"} and "loss_mean" in df  # a method's diagnostic column
    errored = df[df["status"] == "ERROR"].set_index("trial_id")
    assert errored.loc["ddddd_00098", "n_spurious"] == 10 and errored.loc["ddddd_00098", "pattern"] == "s3"
    assert errored.loc["ddddd_00099", "n_spurious"] == 10 and errored.loc["ddddd_00099", "data_seed"] == 5
    assert "checkpoint cannot be read" in errored.loc["ddddd_00098", "error"]


def test_study_report_writes_the_detection_section_files_and_figure(tmp_path, capsys):
    from study import cli

    source = training_study(tmp_path)
    exp = detect_study(tmp_path, source)
    out = tmp_path / "report"
    assert cli.main(["report", str(exp), "--out", str(out)]) == 0
    assert f"report: {out / 'index.html'}" in capsys.readouterr().out
    summary = (out / "summary.md").read_text()
    assert "## Detection: finding the planted training examples without knowing the pattern" in summary
    assert "0.93 ± 0.03" in summary and " 40.5 " in summary  # loss, S3: AUROC 0.9, 0.95; worst rank 40, 41
    assert "ddddd_00099: RuntimeError: out of memory" in summary
    table = pd.read_csv(out / "detection.csv")
    assert len(table) == 4 and set(table["n_spurious"]) == {3, 10} and set(table["pattern"]) == {"S3"}
    loss = table[(table["method"] == "loss") & (table["n_spurious"] == 3)].iloc[0]
    assert loss["replicates"] == 2 and loss["auroc_mean"] == pytest.approx(0.925)
    assert loss["auroc_se"] == pytest.approx(0.025) and loss["worst_planted_rank_median"] == pytest.approx(40.5)
    assert pd.read_parquet(out / "detection.parquet")["auroc_mean"].tolist() == pytest.approx(table["auroc_mean"])
    controls = pd.read_csv(out / "detection_controls.csv").set_index(["method", "pattern"])
    assert sorted(controls.index) == [("loss", "R3"), ("loss", "S3"), ("spectral", "R3"), ("spectral", "S3")]
    assert controls.loc[("loss", "S3"), "controls"] == 2 and controls.loc[("loss", "S3"), "score_at_1pct_mean"] == 2.5
    assert controls.loc[("loss", "S3"), "planted_trials"] == 4 and controls.loc[("loss", "R3"), "planted_trials"] == 0
    assert (out / "figures" / "detection_auroc.png").stat().st_size > 0
    index = (out / "index.html").read_text()
    assert 'src="figures/detection_auroc.png"' in index and 'href="detection_controls.parquet"' in index
    assert "Detection: finding the planted" in index


def test_study_report_on_a_training_study_and_its_detect_study(tmp_path):
    from study import cli

    source = training_study(tmp_path)
    exp = detect_study(tmp_path, source)
    out = tmp_path / "both"
    assert cli.main(["report", str(source), str(exp), "--out", str(out)]) == 0
    assert (out / "summary_spurious_score.csv").exists() and (out / "detection.csv").exists()
    assert len(pd.read_csv(out / "trials.csv")) == 8 + 14
    pngs = {p.name for p in (out / "figures").glob("*.png")}
    assert {"spurious_score_vs_n.png", "detection_auroc.png"} <= pngs


def test_directed_methods_read_with_their_direction_in_tables_and_figure():
    rows = [row("loss", "r3", n, s, auroc, direction=d) for n in (3, 100) for s in (0, 1)
            for d, auroc in (("high", 0.9 if n == 3 else 0.2), ("low", 0.1 if n == 3 else 0.8))]
    rows += [row("spectral", "r3", n, s, 0.5, direction="") for n in (3, 100) for s in (0, 1)]
    frame = pd.DataFrame(rows)
    table = detection.detection_table(frame)
    assert list(dict.fromkeys(table["method"])) == ["loss (high)", "loss (low)", "spectral"]
    cells = table.set_index(["method", "n_spurious"])["auroc_mean"]
    assert cells[("loss (high)", 3)] == pytest.approx(0.9) and cells[("loss (low)", 100)] == pytest.approx(0.8)
    fig = detection.detection_figure(frame)
    curves = {c.get_label(): c.lines[0] for c in fig.axes[0].containers if isinstance(c, ErrorbarContainer)}
    assert list(curves) == ["loss (high)", "loss (low)", "spectral"]
    assert curves["loss (high)"].get_color() == curves["loss (low)"].get_color() != curves["spectral"].get_color()
    assert curves["loss (high)"].get_linestyle() == "-" and curves["loss (low)"].get_linestyle() == "--"
