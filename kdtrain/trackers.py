"""Experiment trackers (`logger=NAME` or `logger=[NAME,...]`): TensorBoard, Weights & Biases, MLflow.

Each gets what the run dir's files hold: the config, one row of scalars per epoch (the student's as
`student/COLUMN`, the student-alone baseline's as `baseline/COLUMN`, at step = epoch), the summary
and, for W&B and MLflow, the run's files (curves.png; MLflow also summary.json, the metrics files and
student.safetensors). The jobs of a multirun sweep are grouped: one W&B group, one MLflow parent run
per sweep dir. Only rank 0 logs.

* wandb: project/entity/name from `wandb.*`; `wandb.mode` (or WANDB_MODE) picks online or offline;
  `offline=true` forces offline (the run stays in RUN_DIR/wandb; `wandb sync` uploads it later).
* mlflow: the tracking URI is `mlflow.tracking_uri`, else MLFLOW_TRACKING_URI, else a local SQLite
  store `outputs/mlflow.db` (artifacts in `outputs/mlartifacts`), MLflow's recommended local backend
  (its plain `mlruns/` file store is in maintenance mode). `mlflow ui --backend-store-uri
  sqlite:///outputs/mlflow.db` shows it.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from kdtrain.config import loggers
from kdtrain.errors import UserError
from kdtrain.models.hub import is_offline

Row = dict[str, Any]
# The run's files a tracker keeps (when they exist), beside its scalars.
ARTIFACTS = ("summary.json", "metrics.jsonl", "metrics.csv", "curves.png", "student.safetensors")


def _scalars(row: Row, prefix: str) -> dict[str, float]:
    """The finite numbers of a metrics row or summary as {prefix/key: value} (nested keys joined by `/`)."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if isinstance(value, dict):
            out.update(_scalars(value, f"{prefix}/{key}"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[f"{prefix}/{key}"] = float(value)
    return out


def _flat(config: Any, prefix: str = "") -> dict[str, str]:
    """A config as {dotted.key: value as text}, for trackers that take flat parameters."""
    if isinstance(config, dict):
        out: dict[str, str] = {}
        for key, value in config.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): str(config)}


def sweep_name(run_dir: Path) -> str | None:
    """The sweep a job belongs to, as `multirun/DATE/TIME` (None: not a multirun job)."""
    from kdtrain.sweep import _sweep_dir_of

    sweep_dir = _sweep_dir_of(Path(run_dir))
    return None if sweep_dir is None else "/".join(sweep_dir.resolve().parts[-3:])


class TensorBoard:
    """Scalars as TensorBoard events in FOLDER/tensorboard (the student's run dir, baseline/ for the baseline)."""

    def __init__(self) -> None:
        self.writers: list[Any] = []

    def start(self, config: dict[str, Any]) -> None:
        pass

    def sink(self, folder: Path, label: str) -> Callable[[Row], None]:
        from kdtrain.report import TensorBoardWriter

        self.writers.append(TensorBoardWriter(folder / "tensorboard"))
        return self.writers[-1].sink(label)

    def finish(self, summary: dict[str, Any], run_dir: Path) -> None:
        self.close(False)

    def close(self, failed: bool) -> None:
        for writer in self.writers:
            writer.close()
        self.writers = []


class Wandb:
    """One W&B run per kdtrain run; per-epoch scalars keyed by their own epoch (student/epoch, baseline/epoch)."""

    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.cfg = cfg.wandb
        self.run_dir = run_dir
        self.run: Any = None

    def start(self, config: dict[str, Any]) -> None:
        import wandb

        mode = "offline" if is_offline() else self.cfg.mode
        try:
            self.run = wandb.init(
                project=self.cfg.project,
                entity=self.cfg.entity,
                name=self.cfg.name or self.run_dir.name,
                group=sweep_name(self.run_dir),
                mode=mode,
                dir=str(self.run_dir),
                config=config,
                reinit="finish_previous",
            )
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UserError(
                f"logger=wandb could not start a run ({type(e).__name__}: {first}); log in with `wandb login`, "
                "or log offline with wandb.mode=offline (or offline=true) and upload later with `wandb sync`"
            ) from None

    def sink(self, folder: Path, label: str) -> Callable[[Row], None]:
        self.run.define_metric(f"{label}/epoch")
        self.run.define_metric(f"{label}/*", step_metric=f"{label}/epoch")

        def write(row: Row) -> None:
            self.run.log(_scalars(row, label))

        return write

    def finish(self, summary: dict[str, Any], run_dir: Path) -> None:
        import wandb

        self.run.summary.update(_scalars(summary, "summary"))
        curves = run_dir / "curves.png"
        if curves.is_file():
            self.run.log({"curves": wandb.Image(str(curves))})
        self.close(False)

    def close(self, failed: bool) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None


class Mlflow:
    """One MLflow run per kdtrain run (a child of the sweep's parent run in a multirun)."""

    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.cfg = cfg.mlflow
        self.run_dir = run_dir
        self.client: Any = None
        self.run_id: str | None = None
        self.parent_id: str | None = None

    def tracking_uri(self) -> tuple[str, bool]:
        """(URI, whether it is kdtrain's default local store)."""
        uri = self.cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri:
            return str(uri), False
        return f"sqlite:///{Path('outputs/mlflow.db').resolve()}", True

    def start(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri, default = self.tracking_uri()
        if is_offline() and uri.startswith(("http://", "https://", "databricks")):
            raise UserError(
                f"offline=true but the MLflow tracking URI is a server ({uri}); unset MLFLOW_TRACKING_URI / "
                "mlflow.tracking_uri to log into the local store outputs/mlflow.db, or set offline=false"
            )
        if default:
            Path("outputs").mkdir(exist_ok=True)
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(self.cfg.experiment)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            artifacts = Path("outputs/mlartifacts").resolve().as_uri() if default else None
            experiment_id = self.client.create_experiment(self.cfg.experiment, artifact_location=artifacts)
        tags = {}
        sweep = sweep_name(self.run_dir)
        if sweep is not None:
            self.parent_id = self._parent(experiment_id, sweep)
            tags["mlflow.parentRunId"] = self.parent_id
        run = self.client.create_run(experiment_id, run_name=self.cfg.run_name or self.run_dir.name, tags=tags)
        self.run_id = run.info.run_id
        params = [Param(k, v[:6000]) for k, v in _flat(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def _parent(self, experiment_id: str, sweep: str) -> str:
        """The sweep's parent run (tagged kdtrain.sweep=SWEEP), created by its first job."""
        found = self.client.search_runs([experiment_id], filter_string=f"tags.`kdtrain.sweep` = '{sweep}'")
        if found:
            return found[0].info.run_id
        return self.client.create_run(experiment_id, run_name=sweep, tags={"kdtrain.sweep": sweep}).info.run_id

    def sink(self, folder: Path, label: str) -> Callable[[Row], None]:
        from mlflow.entities import Metric

        def write(row: Row) -> None:
            now = int(time.time() * 1000)
            metrics = [Metric(k, v, now, int(row["epoch"])) for k, v in _scalars(row, label).items()]
            self.client.log_batch(self.run_id, metrics=metrics)

        return write

    def finish(self, summary: dict[str, Any], run_dir: Path) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, v, now, 0) for k, v in _scalars(summary, "summary").items()]
        )
        for name in ARTIFACTS:
            if (run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / name))
        self.close(False)

    def close(self, failed: bool) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")
            if self.parent_id is not None:  # the parent ends with its latest job (a sweep has no end hook here)
                self.client.set_terminated(self.parent_id, "FINISHED")
            self.run_id = None


class Trackers:
    """The trackers `cfg.logger` names, for one run (see `tracking`)."""

    def __init__(self, cfg: DictConfig, run_dir: Path):
        kinds = {"tensorboard": TensorBoard, "wandb": Wandb, "mlflow": Mlflow}
        self.trackers = [kinds[name]() if name == "tensorboard" else kinds[name](cfg, run_dir) for name in loggers(cfg)]
        self.started = False

    def start(self, config: dict[str, Any]) -> None:
        self.started = True  # before: when one fails to start, close() still ends the others
        for tracker in self.trackers:
            tracker.start(config)

    def sinks(self, folder: Path, label: str) -> list[Callable[[Row], None]]:
        return [tracker.sink(folder, label) for tracker in self.trackers] if self.started else []

    def finish(self, summary: dict[str, Any], run_dir: Path) -> None:
        for tracker in self.trackers:
            tracker.finish(summary, run_dir)
        self.started = False

    def close(self, failed: bool) -> None:
        if self.started:
            for tracker in self.trackers:
                tracker.close(failed)
        self.started = False


_current: Trackers | None = None


def current() -> Trackers | None:
    """The trackers of the run in progress: every metrics sink of the run (the student's, the
    baseline's) reaches them without being handed them."""
    return _current


@contextmanager
def tracking(cfg: DictConfig, run_dir: Path) -> Iterator[Trackers]:
    """The run's trackers, in force while the run lasts; an error marks their runs failed."""
    global _current
    _current = Trackers(cfg, run_dir)
    try:
        yield _current
    except BaseException:
        _current.close(failed=True)
        raise
    finally:
        _current.close(failed=False)  # a no-op after finish() or a failure
        _current = None
