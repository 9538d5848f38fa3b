"""Honest numbers, the library side: the validation split, two-class plantings, the training key that decides which
cells share a model, the trial plan, the seed policy, and scoring one model as several cells (protocol §3.2,
protocol §3.4, protocol §6.4, protocol §7.3)."""
import numpy as np
import pytest
import torch

from spurious import bundle, cells, metrics, planted, train
from spurious.config import TrainConfig, canonical, count_trainings, from_dict, training_key
from spurious.errors import SpuriousError
from study import catalog
from tests.conftest import synthetic_dataset


@pytest.fixture(scope="module")
def data():
    return synthetic_dataset(n_train=600, n_test=200)


def test_validation_split_is_stratified_never_planted_and_keeps_the_reference_draw(data):
    y = data.y_train.numpy()
    idx = planted.choose_spurious(y, 0, 20, 3)
    val = planted.choose_validation(y, 100, 3, exclude=idx)
    assert len(val) == 100 and len(set(val)) == 100 and not set(val) & set(idx.tolist())
    expected = np.bincount(y) * 100 / len(y)
    assert np.all(np.abs(np.bincount(y[val], minlength=len(expected)) - expected) < 1), "stratified by class"
    rows = planted.plant_rows(data, "s3", 20, 0, 3, val_size=100)
    assert np.array_equal(rows.planted_idx, idx), "the planted draw is the reference's, validation or not"
    assert np.array_equal(rows.val_idx, val) and torch.equal(rows.x_val, data.x_train[torch.from_numpy(val)])
    full = rows.materialize()
    keep = np.setdiff1d(np.arange(len(y)), val)
    assert len(full.y_train) == len(y) - 100 and np.array_equal(keep[full.spurious_idx], idx)
    assert torch.equal(full.x_train[torch.from_numpy(full.spurious_idx)], rows.planted_x)
    # another data seed draws another split; the same one the same split
    assert not np.array_equal(planted.choose_validation(y, 100, 4), planted.choose_validation(y, 100, 3))
    assert np.array_equal(planted.choose_validation(y, 100, 3), planted.choose_validation(y, 100, 3))


def test_validation_split_that_empties_a_class_is_one_line(data):
    with pytest.raises(SpuriousError, match="val_size 599 holds out .* choose a smaller val_size"):
        planted.choose_validation(data.y_train, 599, 0)


def test_engine_and_bundle_report_identical_validation_metrics(data):
    cfgs = [TrainConfig(n_spurious=n, data_seed=s, seed=s, epochs=1, batch_size=64, val_size=60, device="cpu")
            for n, s in ((10, 0), (0, 1))]
    rows = bundle.BundleEngine(cfgs, bundle.plant_members(cfgs, data)).step()
    for cfg, row in zip(cfgs, rows):
        alone = train.Engine(cfg, planted.plant_config(data, cfg)).step()
        assert set(metrics.VAL_KEYS) <= set(alone)
        assert {k: row[k] for k in alone if k != "epoch_time_s"} == {k: alone[k] for k in alone if k != "epoch_time_s"}


def test_two_class_planting_draws_the_reference_indices(data):
    rows = planted.plant_rows(data, "s3", 7, 1, 5, targets=(0, 1))
    assert np.array_equal(rows.planted_idx, planted.choose_spurious_two_class(data.y_train, 0, 1, 7, 5))
    assert from_dict({"targets": [0, 1], "target": 1}).targets == (0, 1)
    for bad, message in (({"targets": [0, 0]}, "two different class numbers"),
                         ({"targets": [0, 1], "target": 2}, "must be one of the two planted classes")):
        with pytest.raises(SpuriousError, match=message):
            from_dict(bad)


def test_training_key_sets_aside_only_what_does_not_change_training():
    base = TrainConfig(pattern="s3", n_spurious=0, target=0, data_seed=0, tau=0.1)
    assert training_key(base) == training_key(base.replace(pattern="r3", target=4, data_seed=3, tau=0.3))
    assert training_key(base) != training_key(base.replace(seed=1)), "the training seed trains another model"
    assert training_key(base) != training_key(base.replace(data_seed=3, val_size=50)), "the split depends on it"
    assert training_key(base) != training_key(base.replace(data_seed=3, split="mia_target"))
    planted_cfg = base.replace(n_spurious=3)
    assert training_key(planted_cfg) != training_key(planted_cfg.replace(pattern="r3"))
    assert training_key(planted_cfg) != training_key(planted_cfg.replace(data_seed=1))
    assert training_key(planted_cfg) == training_key(planted_cfg.replace(tau=0.2))
    two = planted_cfg.replace(targets=(0, 1))
    assert training_key(two) == training_key(two.replace(target=1)), "both classes are planted either way"


def test_plan_trains_every_distinct_model_once_and_keeps_every_cell():
    cfgs = [canonical(TrainConfig(pattern=p, n_spurious=n, data_seed=d, seed=s)) for p in ("s3", "r3")
            for n in (0, 3) for d in (0, 1) for s in (0,)]
    trials = cells.plan(cfgs, 1)
    assert count_trainings(cfgs) == len(trials) == 5  # one clean model for the four n = 0 cells
    assert sorted(map(repr, (c for members, _ in trials for c in members))) == sorted(map(repr, cfgs))
    clean = next(members for members, _ in trials if len(members) > 1)
    assert len(clean) == 4 and all(c.n_spurious == 0 for c in clean)
    bundled = cells.plan(cfgs, 4)
    assert sum(max(models) + 1 for _, models in bundled) == 5 and len(bundled) == 2
    assert sorted(map(repr, (c for members, _ in bundled for c in members))) == sorted(map(repr, cfgs))


def test_seed_policy_sets_the_training_seed_of_replicates():
    demo = catalog.get("demo")
    seeds = {(c.data_seed, c.seed) for c in demo.cells()}
    assert seeds == {(0, 0), (1, 1)}, "replicate: the training seed is the data seed"
    assert {c.seed for c in demo.with_seed_policy("reference").cells()} == {0}
    mia = catalog.get("mia-train")  # the study sets `seed` itself: kept under either policy
    assert {c.seed for c in mia.cells() if c.split == "mia_shadow"} == {0, 1, 2, 3}
    assert {c.seed for c in mia.cells() if c.split == "mia_target"} == {0}
    assert catalog.get("paper-fashion").seed_policy == "reference" == catalog.get("paper-mlp").seed_policy
    with pytest.raises(SpuriousError, match="seed_policy 'sometimes' is not one of replicate, reference"):
        demo.with_seed_policy("sometimes")


def test_a_model_scored_as_another_cell_equals_that_cell_trained_on_its_own(data):
    """The n = 0 model trained as the S3 cell, scored as the R3 cell of another data seed and τ, gives what
    training the R3 cell itself gives: the training is identical (protocol §7.3)."""
    owner = TrainConfig(pattern="s3", n_spurious=0, epochs=1, batch_size=64, device="cpu", val_size=40)
    other = owner.replace(pattern="r3", target=2, tau=0.05)
    assert training_key(owner) == training_key(other)
    engine = train.Engine(owner, planted.plant_config(data, owner))
    engine.step()
    scored = cells.score(engine.model, cells.CellData.of(other, planted.plant_config_rows(data, other)))
    alone = train.Engine(other, planted.plant_config(data, other)).step()
    assert scored == {k: alone[k] for k in (*metrics.TEST_KEYS, *metrics.VAL_KEYS)}
    record = cells.final_record(engine.model, cells.CellData.of(other, planted.plant_config_rows(data, other)))
    bits = metrics.unpack_indicators(record[metrics.INDICATORS_KEY])
    assert len(bits) == len(data.y_test) and bits.mean() == pytest.approx(alone["spurious_score"])


def test_packed_indicators_round_trip():
    for n in (0, 1, 7, 8, 9, 10_000):
        bits = (np.random.default_rng(n).random(n) < 0.3).astype(np.uint8)
        assert np.array_equal(metrics.unpack_indicators(metrics.pack_indicators(bits)), bits)
    assert len(metrics.pack_indicators(np.zeros(10_000))) == 1_674
    with pytest.raises(SpuriousError, match="malformed packed indicators"):
        metrics.unpack_indicators("12:not base64!")
