"""logger=tensorboard writes the same scalars as metrics.jsonl."""

import json

import pytest

from kdtrain.run import run

pytest.importorskip("tensorboard")


def test_tensorboard_scalars_match_the_metrics(compose, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(compose("logger=tensorboard"), tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    val = events.Scalars("student/val_acc")
    assert [e.step for e in val] == [r["epoch"] for r in rows]
    assert [e.value for e in val] == pytest.approx([r["val_acc"] for r in rows])
    assert "student/kd" in events.Tags()["scalars"]
    baseline = EventAccumulator(str(tmp_path / "baseline" / "tensorboard"))
    baseline.Reload()
    assert len(baseline.Scalars("baseline/val_acc")) == len(rows)
