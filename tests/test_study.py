"""Catalog, search spaces and CLI input checking (no trial starts; Ray is not started)."""
import subprocess
import sys

import pytest

import search_spaces as ss
from spurious.errors import SpuriousError
from study import catalog, cli, runner, space as space_lib
from tests.conftest import requires_fashion


@pytest.mark.parametrize("name", catalog.names())
def test_every_catalog_study_resolves_and_documents_itself(name):
    spec = catalog.get(name)
    assert "Command:" in spec.description and spec.trial_count() >= 1
    smoke = spec.trial_count(smoke=True)
    # online LiRA needs its 32 online shadows even in a smoke run (one epoch; 6 trials with --bundle 8)
    assert 1 <= smoke <= (35 if name == "mia-online" else 6), "smoke variants must stay tiny"
    for point in space_lib.points(spec.resolved(smoke=True)):
        runner.config_lib.from_tune(point)


def test_trial_counts_match_the_paper_grids():
    assert catalog.get("demo").trial_count() == 16
    assert catalog.get("paper-mlp").trial_count() == 2 * 2 * 6 * 7 * 8 * 2 * 5
    assert catalog.get("paper-cifar10").trial_count() == 4 * 7 * 7 * 2 * 5
    assert catalog.get("regularization").trial_count() == 19 * 7 * 5


def test_spaces_compose_and_clash():
    space = ss.merge(ss.rarity_grid(["s3"], [0, 3]), ss.mitigation_space())
    assert space_lib.count(space) == 2 * 2 * 5
    with pytest.raises(SpuriousError, match="both set pattern"):
        ss.merge(ss.rarity_grid(), {"pattern": "s1"})
    with pytest.raises(SpuriousError, match="l2 bounds"):
        ss.mitigation_space(l2=(-1.0, 1.0))


def test_overrides_make_grids_and_replace_keys_inside_variants():
    spec = catalog.get("paper-mlp")
    space = spec.resolved(smoke=True, overrides={"n_spurious": [0, 3, 10], "lr": 0.05})
    assert space["n_spurious"] == {"grid_search": [0, 3, 10]}
    assert all("lr" not in v for v in space["optim"]["grid_search"]) and space["lr"] == 0.05


def test_parse_set_values():
    assert cli.parse_set(["n_spurious=[0,3,10]", "lr=0.1", "pattern=s3"]) == {
        "n_spurious": [0, 3, 10], "lr": 0.1, "pattern": "s3"}
    with pytest.raises(SpuriousError, match="not a config key"):
        cli.parse_set(["learning_rate=0.1"])
    with pytest.raises(SpuriousError, match="key=value"):
        cli.parse_set(["lr"])


def test_yaml_study_files(tmp_path):
    good = tmp_path / "mine.yaml"
    good.write_text("name: mine\nbase: demo\nspace:\n  n_spurious: [0, 5]\n  l2: {loguniform: [1.0e-5, 1.0e-2]}\n"
                    "num_samples: 2\n")
    spec = catalog.get(str(good))
    assert spec.name == "mine" and spec.trial_count() == 2 * 2 * 2 * 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("space: [unclosed\n")
    with pytest.raises(SpuriousError, match="not valid YAML"):
        catalog.get(str(bad))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("spaces: {}\n")
    with pytest.raises(SpuriousError, match="unknown key"):
        catalog.get(str(unknown))


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@requires_fashion
@pytest.mark.parametrize("argv,message", [
    (["run", "nosuchstudy"], "unknown study 'nosuchstudy'"),
    (["run", "demo", "--set", "pattern=v99"], "unknown pattern 'v99'"),
    (["run", "demo", "--set", "dataset=svhn"], "unknown dataset 'svhn'"),
    (["run", "demo", "--set", "model=resnet9000"], "unknown model 'resnet9000'"),
    (["run", "demo", "--set", "learning_rate=1"], "'learning_rate' is not a config key"),
    (["run", "demo", "--set", "n_spurious=7000"], "7000"),
    (["run", "demo", "--set", "noise_sigma=-0.5"], "noise_sigma must be >= 0"),
    (["run", "demo", "--set", "l2=-1e-4"], "l2 must be >= 0"),
    (["run", "demo", "--set", "l2={uniform: [-1, 1]}"], "l2 range starts at -1"),
    (["run", "demo", "--set", "target=12"], "12"),
    (["run", "demo", "--address", "127.0.0.1:1"], "cannot reach Ray cluster"),
    (["run", "demo", "--gpus-per-trial", "-1"], "--gpus-per-trial must be >= 0"),
    (["run", "demo", "--max-failures", "-1"], "--max-failures must be >= 0"),
    (["run", "paper-mlp"], "pass --yes"),
    (["resume", "/nonexistent/exp"], "does not exist (expected a study experiment directory)"),
])
def test_bad_inputs_fail_before_any_trial_with_one_line(capsys, argv, message, tmp_path):
    code, out, err = run_cli(capsys, *argv, *(["--storage-path", str(tmp_path)] if argv[0] == "run" else []))
    assert code == 2
    assert message in err and err.count("\n") == 1, err
    assert not any(tmp_path.iterdir()), "nothing may be written for a rejected study"


@requires_fashion
def test_existing_experiment_name_is_refused(capsys, tmp_path):
    (tmp_path / "taken").mkdir()
    code, _, err = run_cli(capsys, "run", "demo", "--storage-path", str(tmp_path), "--name", "taken")
    assert code == 2 and "already exists" in err and "study resume" in err


def test_malformed_yaml_through_the_cli(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("space: {n_spurious: [0, 3\n")
    code, _, err = run_cli(capsys, "show", str(bad))
    assert code == 2 and "not valid YAML" in err


def test_show_prints_resolved_space_and_count(capsys):
    code, out, _ = run_cli(capsys, "show", "demo", "--smoke", "--set", "n_spurious=[0,3,10]")
    assert code == 0 and "3 cells, 3 trainings" in out and "n_spurious" in out and "seed policy: replicate" in out


def test_show_counts_cells_and_trainings_under_each_seed_policy(capsys):
    """demo: 2 patterns × n ∈ {0, 3, 10, 100} × 2 data seeds. Its four n = 0 cells train one model per training
    seed: 2 under `replicate` (seed = data seed), 1 under `reference` (seed 0 everywhere)."""
    code, out, _ = run_cli(capsys, "show", "demo")
    assert code == 0 and "16 cells, 14 trainings" in out
    code, out, _ = run_cli(capsys, "show", "demo", "--seed-policy", "reference")
    assert code == 0 and "16 cells, 13 trainings" in out and "seed policy: reference" in out
    code, out, _ = run_cli(capsys, "show", "paper-mlp")  # the paper's grids keep its seed 0
    assert code == 0 and "seed policy: reference" in out and "13440 cells, 11784 trainings" in out


def test_console_script_exit_code_and_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "study.cli", "run", "demo", "--set", "pattern=v99"],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "unknown pattern 'v99'" in proc.stderr


def test_smoke_of_a_yaml_study_keeps_the_files_own_space(tmp_path):
    """`--smoke` shrinks a file's study (the base's smoke settings for keys the file leaves alone); it never
    swaps the file's pattern or counts for the base study's."""
    path = tmp_path / "r3.yaml"
    path.write_text("name: r3\nbase: demo\nspace:\n  pattern: r3\n  n_spurious: [0, 1, 3]\n")
    space = catalog.get(str(path)).resolved(smoke=True)
    assert space["pattern"] == "r3" and space["n_spurious"] == {"grid_search": [0, 1, 3]}
    assert space["epochs"] == 1 and space["data_seed"] == 0  # from demo's smoke variant


@pytest.mark.parametrize("argv,message", [
    (["run", "demo", "--name", "../escape"], "--name '../escape' must be one folder name"),
    (["run", "demo", "--name", "a/b"], "--name 'a/b' must be one folder name"),
    (["run", "demo", "--data-dir", "/nonexistent/data"], "--data-dir '/nonexistent/data' is not a directory"),
    (["run", "demo", "--storage-path", "{file}"], "cannot hold experiments"),
    (["delete", "--from", "{tmp}", "--method", "nosuch"], "invalid choice: 'nosuch'"),
    (["bench", "--only", "nosuch"], "invalid choice: 'nosuch'"),
    pytest.param(["run", "demo", "--cpus-per-trial", "4096"], "--cpus-per-trial 4096 is more than any node's CPUs",
                 marks=requires_fashion),
])
def test_bad_paths_names_choices_and_resources_are_one_line_before_ray_starts(capsys, tmp_path, argv, message):
    import ray

    file = tmp_path / "a-file"
    file.write_text("not a directory")
    argv = [a.format(file=file, tmp=tmp_path) for a in argv]
    extra = ["--storage-path", str(tmp_path / "results")] if argv[0] == "run" and "--storage-path" not in argv else []
    try:
        code = cli.main([*argv, *extra])
    except SystemExit as done:  # argparse's own checks (choices) exit from the parser
        code = done.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"], "nothing written"
    assert not ray.is_initialized(), "nothing started"
