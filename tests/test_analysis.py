"""Analysis frames, the golden summary, figures and the `study report` command (no Ray started).

The golden experiment tests/golden/demo-smoke was made by the project's own smoke study. To regenerate it
(only when the result format changes on purpose), from the repository root::

    rm -rf tests/golden/demo-smoke
    .venv/bin/study run demo --smoke --set "data_seed=[0,1]" --set "pattern=[s3,r3]" --wandb off \\
        --storage-path tests/golden --name demo-smoke -v 0
    (cd tests/golden/demo-smoke && rm -rf tuner.pkl *-state-*.json .validate_storage_marker \\
        */checkpoint_* */events.out.tfevents.* */params.pkl */progress.csv)
    .venv/bin/python -c "from tests.test_analysis import write_golden_summary; write_golden_summary()"
"""
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from analysis import figures, frames, load, report, tuning
from analysis.frames import load_epochs
from spurious.errors import SpuriousError

GOLDEN = Path(__file__).parent / "golden" / "demo-smoke"
GOLDEN_SUMMARY = GOLDEN.with_name("demo-smoke.summary.csv")
GOLDEN_METRICS = ("spurious_score", "test_acc")
METRIC_VALUES = {"train_loss": 0.5, "train_acc": 0.8, "test_loss": 0.6, "test_loss_": 0, "test_acc": 0.78,
                 "spurious_score_nontarget": 0.01, "patterned_acc": 0.7, "patterned_target_rate": 0.02}


def golden_summary() -> pd.DataFrame:
    """Return the summary of the golden experiment, one block per metric."""
    df = frames.load(GOLDEN)
    return pd.concat([frames.summarize(df, metric=m).assign(metric=m) for m in GOLDEN_METRICS], ignore_index=True)


def write_golden_summary() -> None:
    golden_summary().to_csv(GOLDEN_SUMMARY, index=False)


def write_trial(exp: Path, index: int, config: dict, scores: list[float], epochs: list[int] | None = None,
                epochs_total: int | None = None, tail: str = "", error: str | None = None,
                checkpoint: bool = False) -> Path:
    """Write a Tune-shaped trial folder: params.json, one result.json line per reported epoch."""
    trial_id = f"abcde_{index:05d}"
    d = exp / f"train_classifier_{trial_id}_{index}_n_spurious={config.get('n_spurious', 0)}_2026-01-01_00-00-00"
    d.mkdir(parents=True)
    params = {"epochs": epochs_total or len(scores), **config}
    (d / "params.json").write_text(json.dumps(params))
    lines = [json.dumps({"epoch": e, "lr": 0.01 / e, "spurious_score": s, **METRIC_VALUES, "test_acc": 0.7 + e / 100,
                         "epoch_time_s": 1.0, "n_planted": config.get("n_spurious", 0), "trial_id": trial_id,
                         "time_total_s": float(e)})
             for e, s in zip(epochs or range(1, len(scores) + 1), scores)]
    (d / "result.json").write_text("\n".join(lines) + "\n" + tail)
    if error:
        (d / "error.txt").write_text(f"Traceback (most recent call last):\n  File \"x.py\", line 1\n{error}\n")
    if checkpoint:
        (d / "checkpoint_000000").mkdir()
    return d


@pytest.fixture
def experiment(tmp_path):
    """Two patterns × n ∈ {0, 10} × 3 seeds, all finished; scores rise with n for s3 only."""
    exp = tmp_path / "exp-a"
    i = 0
    for pattern in ("s3", "r3"):
        for n in (0, 10):
            for seed in range(3):
                score = 0.01 * seed + (0.3 if pattern == "s3" and n else 0.0)
                write_trial(exp, i, {"pattern": pattern, "n_spurious": n, "data_seed": seed}, [0.0, score],
                            checkpoint=True)
                i += 1
    return exp


def test_load_has_one_row_per_trial_with_full_config_and_final_metrics(experiment):
    df = frames.load(experiment)
    assert len(df) == 12 and set(df["status"]) == {"TERMINATED"}
    row = df[(df.pattern == "s3") & (df.n_spurious == 10) & (df.data_seed == 2)].iloc[0]
    assert row.spurious_score == pytest.approx(0.32) and row.epochs_done == 2 and row.test_acc == pytest.approx(0.72)
    assert row.l2 == 0.0 and row.noise_sigma == 0.0 and row.model == "large_mlp"  # defaults filled in
    assert row.lr == 0.01  # the config's lr, not the last epoch's scheduled one
    assert row.checkpoint.endswith("checkpoint_000000") and row.experiment == "exp-a"
    assert row.trial_id.startswith("abcde_")


def test_partly_finished_trials_are_running_or_pending_and_truncated_lines_ignored(tmp_path):
    exp = tmp_path / "exp"
    write_trial(exp, 0, {"n_spurious": 0}, [0.0, 0.1], epochs_total=5, tail='{"epoch": 3, "spurious_sc')
    write_trial(exp, 1, {"n_spurious": 3}, [0.2], epochs_total=5, error="RuntimeError: diverged")
    (exp / "train_classifier_abcde_00002_2_x").mkdir()
    (exp / "train_classifier_abcde_00002_2_x" / "params.json").write_text('{"n_spurious": 10}')
    df = frames.load(exp).set_index("n_spurious")
    assert df.loc[0, "status"] == "RUNNING" and df.loc[0, "epochs_done"] == 2
    assert df.loc[3, "status"] == "ERROR" and df.loc[3, "error"] == "RuntimeError: diverged"
    assert df.loc[10, "status"] == "PENDING" and np.isnan(df.loc[10, "spurious_score"])
    assert df.loc[10, "trial_id"] == "abcde_00002"
    assert frames.errored(df.reset_index()) == [f"{df.loc[3, 'trial_id']}: RuntimeError: diverged"]
    epochs = frames.load_epochs(exp)
    assert sorted(epochs["epoch"]) == [1, 1, 2]
    assert frames.summarize(frames.load(exp)).empty  # nothing finished


def test_resumed_trial_keeps_the_last_report_of_each_epoch(tmp_path):
    exp = tmp_path / "exp"
    write_trial(exp, 0, {"n_spurious": 5}, [0.1, 0.2, 0.3, 0.25, 0.35, 0.4], epochs=[1, 2, 3, 2, 3, 4],
                epochs_total=4)
    (row,) = frames.load(exp).itertuples()
    assert row.status == "TERMINATED" and row.epochs_done == 4 and row.spurious_score == 0.4
    epochs = frames.load_epochs(exp)
    assert list(epochs["epoch"]) == [1, 2, 3, 4]
    assert list(epochs["spurious_score"]) == [0.1, 0.25, 0.35, 0.4]
    assert list(epochs["epoch_lr"]) == pytest.approx([0.01, 0.005, 0.01 / 3, 0.0025])


def test_several_experiments_at_once_and_join_on_source_trial(experiment, tmp_path):
    other = tmp_path / "deletion"
    write_trial(other, 0, {"pattern": "s3", "n_spurious": 10, "source_trial_id": "abcde_00005"}, [0.05])
    df = frames.load([experiment, other])
    assert len(df) == 13 and df.groupby("experiment").size().to_dict() == {"deletion": 1, "exp-a": 12}
    assert len(frames.load_epochs([experiment, other])) == 25
    joined = frames.join_source(frames.load(other), frames.load(experiment))
    assert joined.loc[0, "spurious_score_source"] == pytest.approx(0.32)
    assert joined.loc[0, "data_seed_source"] == 2
    with pytest.raises(SpuriousError, match="source_trial_id"):
        frames.join_source(frames.load(experiment), df)


def test_one_loader_and_one_status_rule_for_every_kind(tmp_path):
    tuning_root = tmp_path / "tune"
    (tuning_root / "study.json").parent.mkdir()
    (tuning_root / "study.json").write_text(json.dumps({"kind": "tune-mitigation"}))
    write_trial(tuning_root / "baseline", 0, {"l2": 0.0, "noise_sigma": 0.0}, [0.3, 0.2])
    write_trial(tuning_root / "search", 1, {"l2": 0.01, "noise_sigma": 0.1}, [0.2, 0.1])
    write_trial(tuning_root / "search", 2, {"l2": 0.1, "noise_sigma": 0.2}, [0.2], epochs_total=2)  # stopped
    write_trial(tuning_root / "search", 3, {"l2": 0.1, "noise_sigma": 0.5}, [], epochs_total=2, error="E: x")
    deletion = tmp_path / "deletion"
    write_trial(deletion, 4, {"method": "retrain"}, [])
    one_report = json.dumps({"trial_id": "abcde_00005", "method": "retrain", "spurious_score_after": 0.0})
    write_trial(deletion, 5, {"method": "retrain"}, []).joinpath("result.json").write_text(one_report + "\n")
    (deletion / "study.json").write_text(json.dumps({"kind": "delete", "source": str(tmp_path / "absent")}))
    df = load([tuning_root, deletion]).set_index("trial_id")
    assert load is frames.load
    assert list(df["kind"]) == ["tune-mitigation"] * 4 + ["delete"] * 2 and set(df["experiment"]) == {"tune",
                                                                                                   "deletion"}
    assert list(df["phase"].iloc[:4]) == ["baseline", "search", "search", "search"]
    assert list(df["status"]) == ["TERMINATED", "TERMINATED", "RUNNING", "ERROR", "PENDING", "TERMINATED"]
    assert df.loc["abcde_00002", "spurious_score"] == 0.2 and df.loc["abcde_00003", "error"] == "E: x"
    assert df.loc["abcde_00005", "spurious_score_after"] == 0.0
    assert pd.isna(df.loc["abcde_00005", "pattern"])  # post-hoc settings get no training defaults
    assert df.loc["abcde_00005", "source_experiment"] == str(tmp_path / "absent")
    search = tuning.search_trials(load(tuning_root))
    assert list(search["status"]) == ["TERMINATED", "RUNNING", "ERROR"] and list(search["l2"]) == [0.01, 0.1, 0.1]
    assert len(load_epochs(tuning_root)) == 5


def test_a_key_set_twice_by_variant_dicts_is_kept_by_path_not_overwritten(tmp_path):
    exp = tmp_path / "exp"
    write_trial(exp, 0, {"a": {"lr": 0.1}, "b": {"lr": 0.2}}, [], epochs_total=2,
                error="SpuriousError: config key 'lr' is set twice with different values (0.1, 0.2)")
    (row,) = frames.load(exp).to_dict(orient="records")
    assert row["a.lr"] == 0.1 and row["b.lr"] == 0.2 and row["lr"] == 0.01  # the default, not either value
    assert row["status"] == "ERROR" and "set twice" in row["error"]


def test_missing_directory_and_bad_params_are_one_line_errors(tmp_path):
    with pytest.raises(SpuriousError, match="does not exist"):
        frames.load(tmp_path / "nope")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "params.json").write_text("{not json")
    with pytest.raises(SpuriousError, match="not valid JSON"):
        frames.load(tmp_path)


def test_summarize_means_stderr_and_welch_against_n0(experiment):
    summary = frames.summarize(frames.load(experiment)).set_index(["pattern", "n_spurious"])
    s3 = summary.loc[("s3", 10)]
    assert s3["mean"] == pytest.approx(0.31) and s3["count"] == 3
    assert s3["se"] == pytest.approx(np.std([0.30, 0.31, 0.32], ddof=1) / np.sqrt(3))
    assert s3["p_welch_replicates"] < 1e-4
    assert summary.loc[("r3", 10), "p_welch_replicates"] > 0.4  # same scores as its baseline
    assert np.isnan(summary.loc[("s3", 0), "p_welch_replicates"])


def test_summarize_keeps_varying_factors_and_survives_missing_config_values(experiment, tmp_path):
    other = tmp_path / "other"
    write_trial(other, 0, {"pattern": "s3", "n_spurious": 10, "l2": 0.1, "custom": 1}, [0.0, 0.05])
    summary = frames.summarize(frames.load([experiment, other]))
    assert list(summary.columns) == ["l2", "pattern", "n_spurious", *frames.SUMMARY_COLUMNS]
    assert len(summary) == 5
    df = frames.load(experiment)
    df["l2"] = df["l2"].astype(float)
    df.loc[df["pattern"] == "s3", "l2"] = np.nan  # e.g. frames of two kinds of study concatenated
    with_nan = frames.summarize(df).set_index(["pattern", "n_spurious"])
    assert np.isnan(with_nan.loc[("s3", 10), "l2"]) and with_nan.loc[("s3", 10), "p_welch_replicates"] < 1e-4
    only_n10 = frames.load(experiment).query("n_spurious == 10")
    no_n = frames.summarize(only_n10, by=("pattern",))
    assert "p_welch_replicates" in no_n and no_n["p_welch_replicates"].isna().all()


def test_score_table_is_mean_pm_se_by_pattern_and_n(experiment):
    table = frames.score_table(frames.load(experiment))
    assert table.splitlines()[0] == "spurious_score (mean ± s.e. over seeds)"
    assert "n=0" in table and "n=10" in table and "0.310 ± 0.006" in table
    marked = frames.pivot_cells(frames.summarize(frames.load(experiment)), mark_p=0.05)
    assert marked.loc["s3", "n=10"].endswith("*") and not marked.loc["r3", "n=10"].endswith("*")


def test_golden_experiment_gives_exactly_the_committed_summary():
    """The committed smoke experiment (see the module docstring) must summarise to the committed CSV."""
    buffer = io.StringIO()
    golden_summary().to_csv(buffer, index=False)
    actual = pd.read_csv(io.StringIO(buffer.getvalue()))
    expected = pd.read_csv(GOLDEN_SUMMARY)
    assert list(actual.columns) == list(expected.columns) and len(actual) == len(expected) == 8
    for column in expected.columns:
        if pd.api.types.is_numeric_dtype(expected[column]):
            np.testing.assert_allclose(actual[column], expected[column], rtol=0, atol=1e-12, equal_nan=True)
        else:
            assert list(actual[column]) == list(expected[column]), column


# ---------------------------------------------------------------- figures

def assert_png(path: Path, min_colours: int = 8) -> None:
    from PIL import Image

    assert path.exists() and path.suffix == ".png"
    with Image.open(path) as image:
        image.load()
        assert image.width > 200 and image.height > 150
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) >= min_colours


def test_score_vs_n_has_one_panel_per_factor_and_one_curve_per_pattern(experiment, tmp_path):
    df = pd.concat([frames.load(experiment), frames.load(experiment).assign(optimizer="adam")])
    (fig,) = figures.metric_vs_n_figures(df, "spurious_score")
    axes = [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]
    assert len(axes) == 2
    for ax in axes:
        assert len(ax.lines) == 2 and ax.get_xscale() == "symlog"
        assert [t.get_text() for t in ax.texts] == ["S3", "R3"]  # curves labelled where they end
        assert ax.get_title() in ("optimizer=adam", "optimizer=sgd")
    paths = figures.score_vs_n(df, tmp_path / "figs")
    assert [p.name for p in paths] == ["spurious_score_vs_n.png"]
    assert_png(paths[0])
    (acc,) = figures.accuracy_vs_n(frames.load(experiment), tmp_path / "figs")
    assert acc.name == "test_acc_vs_n.png"
    assert_png(acc)


def test_many_panels_split_into_several_files(experiment, tmp_path):
    df = pd.concat([frames.load(experiment).assign(target=t) for t in range(figures.MAX_PANELS + 1)])
    paths = figures.score_vs_n(df, tmp_path)
    assert [p.name for p in paths] == ["spurious_score_vs_n.png", "spurious_score_vs_n_2.png"]


def test_mitigation_tradeoff_panel_per_knob_point_per_setting(experiment, tmp_path):
    base = frames.load(experiment)
    strong = base.assign(l2=1e-2, spurious_score=base.spurious_score / 3, test_acc=base.test_acc - 0.1)
    noisy = base.assign(noise_sigma=0.5, spurious_score=base.spurious_score / 2)
    df = pd.concat([base, strong, noisy], ignore_index=True)
    points = figures.tradeoff_points(df, "l2").set_index(["pattern", "l2"])
    assert points.loc[("s3", 0.0), "spurious_score"] == pytest.approx((0.01 + 0.31) / 2)
    assert points.loc[("s3", 0.01), "spurious_score"] == pytest.approx((0.01 + 0.31) / 6)
    fig = figures.tradeoff_figure(df)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 2 and all(len(ax.lines) == 2 for ax in axes)
    assert all(len(line.get_xdata()) == 2 for ax in axes for line in ax.lines)
    (path,) = figures.mitigation_tradeoff(df, tmp_path)
    assert_png(path)
    assert figures.mitigation_tradeoff(base, tmp_path / "none") == []


def mlp_checkpoint(path: Path, n: int, corner: float) -> Path:
    from spurious import checkpoint, models
    from spurious.config import TrainConfig

    cfg = TrainConfig(dataset="fashion", model="large_mlp", pattern="s3", n_spurious=n)
    torch.manual_seed(0)
    model = models.build(cfg.model, (1, 28, 28))
    with torch.no_grad():
        model.first_layer.weight[3, :5] += corner  # the first image row's S3 pixels light up
    state = {"format": checkpoint.FORMAT, "config": cfg.to_dict(), "model": model.state_dict()}
    return checkpoint.save(state, path / "checkpoint_000000" / checkpoint.LEGACY_FILE)  # the pre-issue-12 layout


def test_weight_map_of_mlp_checkpoints(tmp_path):
    clean = mlp_checkpoint(tmp_path / "a", 0, 0.0)
    planted = mlp_checkpoint(tmp_path / "b", 100, 2.0)
    values, config = figures.first_layer_map(planted.parent)
    assert values.shape == (28, 28) and values[0, :5].min() > 1.9 and config["n_spurious"] == 100
    fig = figures.weight_map_figure([clean, planted])
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 2 and panels[1].get_title().startswith("(b) S3, n=100")
    path = figures.weight_map([clean.parent, planted.parent], tmp_path / "wm.png", vrange=(-0.5, 6.5))
    assert_png(path)
    with pytest.raises(SpuriousError):
        figures.first_layer_map(tmp_path / "missing.pt")


# ---------------------------------------------------------------- report and `study report`

def test_report_writes_frames_tables_figures_and_index(tmp_path):
    exp = tmp_path / "demo-smoke"
    shutil.copytree(GOLDEN, exp)
    out = report.write_report(exp)
    assert out == exp / "report"
    for name in ("trials.csv", "trials.parquet", "epochs.csv", "epochs.parquet", "summary.md",
                 "summary_spurious_score.csv", "summary_test_acc.csv", "claims.txt", "index.html"):
        assert (out / name).stat().st_size > 0, name
    assert len(pd.read_parquet(out / "trials.parquet")) == 8 and len(pd.read_csv(out / "epochs.csv")) == 8
    summary_md = (out / "summary.md").read_text()
    assert "| pattern | n=0 | n=100 |" in summary_md and "| S3 | 0.000 ± 0.000 |" in summary_md
    pngs = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert pngs == ["spurious_score_vs_n.png", "test_acc_vs_n.png"]  # no checkpoints committed: no weight map
    index = (out / "index.html").read_text()
    # two seeds a cell: p = 0.046 before Holm, but a replicate-test mark needs 3 models a side (protocol §4.3)
    assert all(f'src="figures/{p}"' in index for p in pngs) and "0.321 ± 0.048†" in index
    assert "cell has 2 independent models &lt; 3" in index and "<h2>Claims</h2>" in index
    assert frames.load(exp).shape[0] == 8  # the report folder is not mistaken for a trial


def test_report_includes_weight_maps_when_mlp_checkpoints_exist(experiment, tmp_path):
    df = frames.load(experiment)
    for row in df.itertuples():
        mlp_checkpoint(Path(row.trial_dir), row.n_spurious, 1.0 if row.n_spurious else 0.0)
    out = report.write_report(experiment, tmp_path / "rep")
    maps = sorted(p.name for p in (out / "figures").glob("weight_map_*.png"))
    assert maps == ["weight_map_fashion_large_mlp_sgd_0_r3.png", "weight_map_fashion_large_mlp_sgd_0_s3.png"]


def test_study_report_command(tmp_path, capsys):
    from study import cli

    exp = tmp_path / "demo-smoke"
    shutil.copytree(GOLDEN, exp)
    assert cli.main(["report", str(exp), "--out", str(tmp_path / "r")]) == 0
    assert f"report: {tmp_path / 'r' / 'index.html'}" in capsys.readouterr().out
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("study: error:") and "does not exist" in err and err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    assert cli.main(["report", str(tmp_path / "empty")]) == 2
    assert "not an experiment directory" in capsys.readouterr().err


def test_rows_take_the_canonical_config_their_reports_record(tmp_path):
    """A study run with `v8` and one with `s3` trained the same pattern: reports record the canonical config,
    so both land in one cell (before, two rows both shown as "S3"); a reference model string's augmentation
    shows in the row."""
    from spurious import config as config_lib

    exp = tmp_path / "exp"
    for i, (alias, seed) in enumerate((("v8", 0), ("s3", 1))):
        d = write_trial(exp, i, {"pattern": alias, "n_spurious": 10, "data_seed": seed}, [0.1, 0.2 + seed])
        record = config_lib.from_tune({"pattern": alias, "n_spurious": 10, "data_seed": seed, "epochs": 2,
                                       "model": "aug01-ce-tor-LargeMLP"}).to_dict()
        rows = [{**json.loads(line), **record} for line in (d / "result.json").read_text().splitlines()]
        (d / "result.json").write_text("\n".join(map(json.dumps, rows)) + "\n")
    df = frames.load(exp)
    assert list(df["pattern"]) == ["corner_square_5"] * 2 and list(df["augmentation"]) == ["aug01"] * 2
    assert list(df["model"]) == ["large_mlp"] * 2
    summary = frames.summarize(df)
    assert len(summary) == 1 and summary["count"].iloc[0] == 2


def test_unfinished_trials_counts_bundle_members_once_and_absent_trials_as_unfinished():
    df = pd.DataFrame({"trial_id": ["a_00000-m0", "a_00000-m1", "a_00001", "a_00002", "a_00003-m0"],
                       "status": ["TERMINATED", "TERMINATED", "ERROR", "RUNNING", "PENDING"]})
    assert frames.unfinished_trials(df, 4) == 2  # 00002 running, 00003 pending; the bundle 00000 counts once
    assert frames.unfinished_trials(df, 5) == 3  # a fifth trial that never reported
    assert frames.unfinished_trials(df.iloc[:3], 2) == 0
    assert frames.unfinished_trials(df.iloc[:0], 3) == 3 and frames.unfinished_trials(df.iloc[:0], 0) == 0
