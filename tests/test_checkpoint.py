"""Atomic writes and checked loads of checkpoints."""

from __future__ import annotations

import pytest
import torch

from kdtrain.checkpoint import atomic_write, config_differences, load_checkpoint, save_checkpoint
from kdtrain.errors import UserError


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1}, path)
    before = path.read_bytes()

    def crash(p):
        p.write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt  # e.g. a second Ctrl-C in the middle of torch.save

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crash)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    assert load_checkpoint(path, "resume")["epoch"] == 1


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "is truncated or corrupt"),
        (b"\x00" * 64, "is not a PyTorch checkpoint"),
    ],
)
def test_unreadable_files_give_one_line(tmp_path, content, reason):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=reason) as err:
        load_checkpoint(path, "resume")
    assert "\n" not in str(err.value)


def test_a_tensor_is_not_a_checkpoint(tmp_path):
    torch.save(torch.zeros(2), tmp_path / "t.pt")
    with pytest.raises(UserError, match="holds a Tensor, not a checkpoint dictionary"):
        load_checkpoint(tmp_path / "t.pt", "resume")


def test_config_differences_name_dotted_keys_in_order():
    old = {"student": {"name": "mlp", "hidden": 32}, "lr": 0.05, "resume": None}
    new = {"student": {"name": "mlp", "hidden": 64, "depth": 2}, "lr": 0.05, "resume": "auto"}
    assert [k for k, _, _ in config_differences(old, new)] == ["student.hidden", "student.depth", "resume"]
