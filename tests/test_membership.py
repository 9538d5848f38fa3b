"""The membership-inference data layout (protocol §9.1): target quarters, shadow halves, online halves.

Shadow models with subset k ≥ 1 and every `mia_online` model train on a random half of a membership pool,
so each pool example is IN for some of them and OUT for others; these tests pin what each model trains on,
that its planted examples are the target's, and that a bundle of such models trains exactly like
separate runs.
"""
import numpy as np
import pytest
import torch

from spurious import bundle, planted, train
from spurious.config import TrainConfig
from spurious.errors import SpuriousError
from tests.conftest import synthetic_dataset


@pytest.fixture
def data():
    return synthetic_dataset(n_train=600, n_test=200)  # pool of 800: four quarters of 200


def cfg(**kw):
    base = dict(dataset="fashion", model="large_mlp", pattern="r3", n_spurious=12, target=2, data_seed=4,
                epochs=2, lr=0.05, batch_size=32, device="cpu", split="mia_target")
    return TrainConfig(**{**base, **kw})


def test_online_models_train_on_halves_of_the_target_pool_with_its_planted_images(data):
    target = planted.plant_config(data, cfg())
    pool_x, pool_y = torch.cat([target.x_train, target.x_test]), torch.cat([target.y_train, target.y_test])
    pool, first = planted.membership_pool("mia_online", 800, 4)
    assert len(pool) == 400 and first == 200
    seen = np.zeros(400, int)
    for k in range(6):
        d = planted.plant_config(data, cfg(split="mia_online", subset=k, seed=k))
        rows = planted.training_rows("mia_online", k, 400, 4)
        assert len(rows) == 200 and len(d.y_train) == 200
        assert torch.equal(d.x_train, pool_x[torch.from_numpy(rows)])  # planted rows patterned, as the target's
        assert torch.equal(d.y_train, pool_y[torch.from_numpy(rows)])
        inside = np.sort(target.spurious_idx[np.isin(target.spurious_idx, rows)])
        assert np.array_equal(rows[d.spurious_idx], inside)
        seen[rows] += 1
    assert seen.mean() == 3  # halves
    assert ((seen > 0) & (seen < 6)).mean() > 0.9  # IN for some models, OUT for others (1 − 2/64 expected)


def test_shadow_subset_zero_is_the_reference_quarter_and_others_are_halves_of_the_shadow_pool(data):
    s0 = planted.plant_config(data, cfg(split="mia_shadow", subset=0))
    quarters = planted.membership_split(800, 4)
    x_all = torch.cat([data.x_train, data.x_test])
    assert torch.equal(s0.x_train, x_all[torch.from_numpy(quarters["shadow_train"])])
    assert torch.equal(s0.x_test, x_all[torch.from_numpy(quarters["shadow_test"])])
    assert len(s0.spurious_idx) == 0
    s1 = planted.plant_config(data, cfg(split="mia_shadow", subset=1))
    pool, _ = planted.membership_pool("mia_shadow", 800, 4)
    rows = planted.training_rows("mia_shadow", 1, 400, 4)
    assert torch.equal(s1.x_train, x_all[torch.from_numpy(pool[rows])])
    assert torch.equal(s1.x_test, x_all[torch.from_numpy(quarters["target_test"])])  # no shadow trains on it
    assert not np.isin(pool, quarters["target_train"]).any()


def test_halves_differ_between_subsets_and_splits_and_are_reproducible():
    a = planted.training_rows("mia_online", 1, 1000, 0)
    assert np.array_equal(a, planted.training_rows("mia_online", 1, 1000, 0))
    assert not np.array_equal(a, planted.training_rows("mia_online", 2, 1000, 0))
    assert not np.array_equal(a, planted.training_rows("mia_shadow", 1, 1000, 0))
    assert not np.array_equal(a, planted.training_rows("mia_online", 1, 1000, 1))
    assert planted.training_rows("mia_shadow", 0, 1000, 0) is None
    assert planted.training_rows("mia_target", 3, 1000, 0) is None


@pytest.mark.parametrize("bad, message", [
    (dict(split="full", subset=1), "subset 1 needs split mia_shadow or mia_online"),
    (dict(split="mia_online", subset=-1), "subset must be >= 0"),
    (dict(split="mia_online", subset=0, val_size=10), "val_size must be 0"),
    (dict(split="mia_other"), "split 'mia_other' is not one of"),
])
def test_bad_layouts_are_one_line_errors(bad, message):
    with pytest.raises(SpuriousError, match=message):
        cfg(**bad)


def test_a_bundle_of_online_models_equals_separate_runs(data):
    cfgs = [cfg(split="mia_online", subset=k, seed=k) for k in range(3)]
    separate = [train.train(c, planted.plant_config(data, c)) for c in cfgs]
    bundled = bundle.train_bundle(cfgs, bundle.plant_members(cfgs, data), vmap_chunk=1)
    for b, s in zip(bundled, separate):
        for name, value in s.model.state_dict().items():
            assert torch.equal(b.model.state_dict()[name], value), name
        assert [r["test_acc"] for r in b.history] == [r["test_acc"] for r in s.history]
