"""The checkpoint layout: one file per model, old one-file directories still readable."""
import pytest
import torch

from spurious import checkpoint
from spurious.errors import SpuriousError


def states(count):
    return [{"format": checkpoint.FORMAT, "member": k} for k in range(count)]


def test_members_are_written_and_read_one_file_each(tmp_path):
    paths = checkpoint.write_members(tmp_path, states(3))
    assert [p.name for p in paths] == ["member_000.pt", "member_001.pt", "member_002.pt"]
    assert [s["member"] for s in checkpoint.read_members(tmp_path, 3)] == [0, 1, 2]
    assert checkpoint.read_member(tmp_path, 2)["member"] == 2
    assert checkpoint.member_path(tmp_path, 1) == tmp_path / "member_001.pt"
    assert checkpoint.member_path(tmp_path, 3) is None and checkpoint.member_path(None, 0) is None
    with pytest.raises(SpuriousError, match="does not exist"):
        checkpoint.read_members(tmp_path, 4)


def test_old_one_file_directories_still_load(tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    checkpoint.save(states(1)[0], single / checkpoint.LEGACY_FILE)
    checkpoint.save({"members": states(2)}, multi / checkpoint.LEGACY_FILE)  # the old tune-mitigation layout
    assert checkpoint.read_member(single)["member"] == 0 and checkpoint.read_members(single, 1)[0]["member"] == 0
    assert checkpoint.member_path(single, 0) == single / checkpoint.LEGACY_FILE
    assert [s["member"] for s in checkpoint.read_members(multi, 2)] == [0, 1]
    assert checkpoint.read_member(multi, 1)["member"] == 1
    with pytest.raises(SpuriousError, match="holds 2 models, expected 3"):
        checkpoint.read_members(multi, 3)
    with pytest.raises(SpuriousError, match="not model 2"):
        checkpoint.read_member(multi, 2)


def test_format_check_names_the_format():
    checkpoint.check(states(1)[0])
    with pytest.raises(SpuriousError, match="checkpoint format 0 is not 1"):
        checkpoint.check({"format": 0})


def test_rng_state_round_trips(tmp_path):
    gen = torch.Generator().manual_seed(3)
    rng = checkpoint.rng_state(gen, torch.device("cpu"))
    expected = torch.rand(2)
    checkpoint.restore_global_rng(rng, torch.device("cpu"))
    assert torch.equal(torch.rand(2), expected)
