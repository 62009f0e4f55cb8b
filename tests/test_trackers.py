"""logger=wandb (offline) and logger=mlflow (local store) hold what the run dir's files hold."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from kdtrain.config import validate
from kdtrain.errors import UserError
from kdtrain.run import run
from kdtrain.trackers import sweep_name


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _sweep_job(tmp_path: Path, num: int) -> Path:
    """A job dir of a multirun sweep as Hydra lays it out (SWEEP/multirun.yaml, SWEEP/NUM/)."""
    (tmp_path / "sweep").mkdir(exist_ok=True)
    (tmp_path / "sweep" / "multirun.yaml").write_text("{}\n")
    return tmp_path / "sweep" / str(num)


def _wandb_records(run_dir: Path):
    """The records of an offline W&B run file (a LevelDB-style log of protobuf records; wandb no longer
    ships a Python reader for it)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, parts = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):  # the rest of a block is padding
            pos += left
            continue
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)  # wandb stores `a/b` keys nested


def test_wandb_offline_holds_the_metrics(compose, tmp_path, monkeypatch, no_network) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = _sweep_job(tmp_path, 0)
    run(compose("logger=wandb", "offline=true", "wandb.project=kdtest"), run_dir)
    import wandb

    wandb.teardown()  # wandb's service writes the run file in the background; it is complete when it stops
    history: dict[str, list[dict]] = {"student": [], "baseline": []}
    summary: dict[str, float] = {}
    config: dict = {}
    media: list[str] = []
    kinds = []
    for record in _wandb_records(run_dir):
        kind = record.WhichOneof("record_type")
        kinds.append(kind)
        if kind == "run":
            assert (record.run.project, record.run.display_name) == ("kdtest", "0")
            assert record.run.run_group == sweep_name(run_dir)  # the sweep's jobs form one group
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            items = {_key(item): json.loads(item.value_json) for item in record.history.item}
            for label, seen in history.items():
                if f"{label}/epoch" in items:
                    seen.append({k.split("/", 1)[1]: v for k, v in items.items() if k.startswith(label)})
            media += sorted({k.split("/")[0] for k in items if k.startswith("curves/")})
        elif kind == "summary":
            summary.update({_key(item): json.loads(item.value_json) for item in record.summary.update})
    assert "temperature" in config, (kinds, sorted(config))
    assert "summary/student/best_val_acc" in summary, (kinds, sorted(summary))
    assert config["temperature"] == 4.0 and config["logger"] == "wandb" and config["teacher"]["name"] == "cnn"
    for label, folder in (("student", run_dir), ("baseline", run_dir / "baseline")):
        rows = _rows(folder)
        assert [h["epoch"] for h in history[label]] == [r["epoch"] for r in rows]
        for key in ("val_acc", "loss", "ce", "lr", "train_acc"):
            assert [h[key] for h in history[label]] == pytest.approx([r[key] for r in rows]), (label, key)
    expected = json.loads((run_dir / "summary.json").read_text())
    assert summary["summary/student/best_val_acc"] == pytest.approx(expected["student"]["best_val_acc"])
    assert summary["summary/gain_vs_baseline"] == pytest.approx(expected["gain_vs_baseline"])
    assert media == ["curves"]  # curves.png
    assert no_network == []


def test_mlflow_local_store_and_tensorboard_at_once(compose, tmp_path, monkeypatch) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run(compose("logger=[tensorboard,mlflow]", "mlflow.experiment=kdtest"), tmp_path / "run")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")  # the default store
    (stored,) = client.search_runs([client.get_experiment_by_name("kdtest").experiment_id])
    assert stored.info.run_name == "run" and stored.info.status == "FINISHED"
    assert stored.data.params["temperature"] == "4.0" and stored.data.params["mode"] == "soft"
    for label, folder in (("student", tmp_path / "run"), ("baseline", tmp_path / "run" / "baseline")):
        rows = _rows(folder)
        for key in ("val_acc", "loss", "agreement"):
            history = client.get_metric_history(stored.info.run_id, f"{label}/{key}")
            expected = [
                r for r in rows if r[key] is not None
            ]  # null (e.g. the stored baseline's agreement): not logged
            assert [m.step for m in history] == [r["epoch"] for r in expected]
            assert [m.value for m in history] == pytest.approx([r[key] for r in expected]), (label, key)
        assert client.get_metric_history(stored.info.run_id, f"{label}/val_acc")  # never vacuous
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert stored.data.metrics["summary/student/best_val_acc"] == pytest.approx(summary["student"]["best_val_acc"])
    artifacts = {a.path for a in client.list_artifacts(stored.info.run_id)}
    assert {"student.safetensors", "summary.json", "metrics.jsonl", "curves.png"} <= artifacts
    assert (tmp_path / "outputs" / "mlartifacts").is_dir()
    assert any((tmp_path / "run" / "tensorboard").iterdir())  # the other logger of the list


@pytest.mark.slow  # two runs and a second MLflow store (its schema migrations take ~15 s on a busy CPU)
def test_mlflow_sweep_jobs_share_a_parent_run(compose, tmp_path, monkeypatch) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # honoured when set
    monkeypatch.chdir(tmp_path)
    for num, temperature in enumerate((2, 8)):
        run(
            compose("logger=mlflow", "baseline=false", "epochs=1", f"temperature={temperature}"),
            _sweep_job(tmp_path, num),
        )
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("kdtrain").experiment_id])
    (parent,) = [r for r in runs if "kdtrain.sweep" in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.data.tags["kdtrain.sweep"] == sweep_name(_sweep_job(tmp_path, 0))
    assert sorted(r.data.params["temperature"] for r in children) == ["2.0", "8.0"] and len(runs) == 3
    assert not (tmp_path / "outputs" / "mlflow.db").exists()


def test_logger_errors(compose, monkeypatch) -> None:
    with pytest.raises(UserError, match=r"logger=comet is not accepted: use one of none, tensorboard, wandb, mlflow"):
        validate(compose("logger=[tensorboard,comet]"))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(
        UserError,
        match=r"logger=mlflow needs the mlflow package, which is not installed: pip install 'kdtrain\[mlflow\]'",
    ):
        validate(compose("logger=mlflow"))


def test_mlflow_server_refused_offline(compose, tmp_path, monkeypatch) -> None:
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example.com:5000")
    with pytest.raises(UserError, match=r"offline=true but the MLflow tracking URI is a server"):
        run(compose("logger=mlflow", "offline=true", "baseline=false", "epochs=1"), tmp_path / "run")
