"""The frozen training config rejects unknown keys, wrong types and out-of-range values in one line."""
import pytest

from spurious import config
from spurious.errors import SpuriousError


def test_defaults_are_the_papers_mlp_setting():
    cfg = config.TrainConfig()
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.batch_size, cfg.epochs, cfg.l2) == ("sgd", .01, .9, 128, 70, 0.)


def test_from_dict_coerces_ints_to_floats_and_round_trips():
    cfg = config.from_dict({"lr": 1, "n_spurious": 3.0, "l2": 0})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.n_spurious == 3
    assert config.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(seed=4).seed == 4


def test_unknown_key_names_it_and_the_allowed_keys():
    with pytest.raises(SpuriousError, match=r"unknown config key\(s\) 'learning_rate'.*allowed keys: dataset"):
        config.from_dict({"learning_rate": 0.1})


@pytest.mark.parametrize("key,value", [("lr", "fast"), ("n_spurious", 2.5), ("epochs", True), ("pattern", 8)])
def test_wrong_types_name_the_key(key, value):
    with pytest.raises(SpuriousError, match=f"config key '{key}' must be"):
        config.from_dict({key: value})


@pytest.mark.parametrize("key,value,msg", [
    ("l2", -1e-4, "l2 must be >= 0"), ("noise_sigma", -0.1, "noise_sigma must be >= 0"),
    ("lr", 0.0, "lr must be > 0"), ("optimizer", "rmsprop", "optimizer 'rmsprop'"),
    ("n_spurious", -3, "n_spurious must be >= 0"), ("tau", 1.5, "tau must be in"),
    ("epochs", 0, "epochs must be >= 1"), ("augmentation", "aug02", "augmentation 'aug02'"),
    ("lr", float("nan"), "lr must be finite"), ("device", "tpu", "device 'tpu'"),
    ("split", "half", "split 'half'"),
])
def test_bad_values_fail_with_one_line(key, value, msg):
    with pytest.raises(SpuriousError, match=msg) as err:
        config.from_dict({key: value})
    assert "\n" not in str(err.value)


def test_flatten_merges_variant_dicts_and_never_overwrites_silently():
    nested = {"optim": {"optimizer": "adam", "lr": 1e-3}, "pattern": "s3", "again": {"pattern": "s3"}}
    assert config.flatten(nested) == {"optimizer": "adam", "lr": 1e-3, "pattern": "s3"}
    clash = {"a": {"lr": 0.1}, "b": {"lr": 0.2}, "k": 1}
    with pytest.raises(SpuriousError, match="'lr' is set twice"):
        config.flatten(clash)
    assert config.flatten(clash, on_clash="path") == {"a.lr": 0.1, "b.lr": 0.2, "k": 1}


def test_from_tune_canonicalises_aliases_and_reference_model_strings():
    """Two configs that train the same model are equal once canonical: `v8` is S3, `fashion_mnist` is
    `fashion`, and `aug01-ce-tor-altResNet20Norm02` is an architecture trained with aug01 (protocol §5.2)."""
    s3 = config.from_tune({"pattern": "s3", "dataset": "fashion"})
    v8 = config.from_tune({"optim": {"optimizer": "sgd"}, "pattern": "v8", "dataset": "fashion_mnist"})
    assert s3 == v8 and s3.pattern == "corner_square_5" and s3.dataset == "fashion"
    ref = config.from_tune({"dataset": "cifar10", "model": "aug01-ce-tor-altResNet20Norm02"})
    plain = config.from_tune({"dataset": "cifar10", "model": ref.model, "augmentation": "aug01"})
    assert ref == plain and ref.augmentation == "aug01" and "tor" not in ref.model
    assert config.from_tune({"model": "ce-tor-LargeMLP"}).model == "large_mlp"
    # "none" is the default, so a model string's augmentation applies; an unknown one is refused
    assert config.from_tune({"model": "aug01-ce-tor-LargeMLP", "augmentation": "none"}).augmentation == "aug01"
    with pytest.raises(SpuriousError, match="augmentation 'aug02' in model name"):
        config.from_tune({"model": "aug02-ce-tor-LargeMLP"})
    with pytest.raises(SpuriousError, match="unknown pattern 'v99'"):
        config.from_tune({"pattern": "v99"})
    with pytest.raises(SpuriousError, match="set twice"):
        config.from_tune({"a": {"lr": 0.1}, "b": {"lr": 0.2}})


def test_every_settings_dataclass_is_built_and_checked_one_way():
    """TrainConfig, the deletion and attack settings and the tuning options share one builder (unknown keys,
    coercion, types) and one value check; every message names the bad value."""
    from study.mitigation import TuningOptions
    from trainables.delete import DeleteSettings
    from trainables.mia import MiaSettings

    assert config.from_values(DeleteSettings, {"depth": "50", "scale": 10, "solver": "lissa"},
                              "deletion setting").scale == 10.0
    with pytest.raises(SpuriousError, match=r"deletion setting 'depth' must be int or None, got 'x' \(str\)"):
        config.from_values(DeleteSettings, {"depth": "x"}, "deletion setting")
    with pytest.raises(SpuriousError, match="depth must be >= 1, got -5"):
        DeleteSettings(depth=-5, solver="lissa")
    with pytest.raises(SpuriousError, match=r"unknown membership-inference setting\(s\) 'depth'; allowed keys: attack"):
        config.from_values(MiaSettings, {"depth": 5}, "membership-inference setting")
    with pytest.raises(SpuriousError, match="tuning option 'trials' must be int, got 'many'"):
        TuningOptions(trials="many")
    with pytest.raises(SpuriousError, match="config key 'lr' must be float, got '0.1x'"):
        config.TrainConfig(lr="0.1x")
    assert config.from_dict({"lr": "1e-3"}).lr == 1e-3  # YAML 1.1 reads 1e-3 as text
