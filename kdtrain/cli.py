"""`kdtrain` entry point: check the command line, then hand it to Hydra, which calls `task`.

Hydra reports a bad override as a multi-line block; users get one sentence instead, because the
overrides are composed and checked here first (every value of every swept key too), before Hydra
creates a run dir or any work starts.
"""

from __future__ import annotations

import difflib
import importlib.resources
import logging
import os
import re
import shlex
import sys
from datetime import datetime
from pathlib import Path

import hydra
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from kdtrain import distributed, runlock
from kdtrain.checkpoint import find_resume, load_training_checkpoint, refuse_another_run, run_dir_of
from kdtrain.config import register_schema, validate
from kdtrain.errors import UserError, WriteError

CONFIG_MODULE = "kdtrain.conf"
# Flags after which Hydra prints something instead of running (no need to check overrides).
PRINT_ONLY = {"--help", "-h", "--hydra-help", "--version", "--info", "-i", "--shell-completion", "-sc"}
# Flags that change where configs come from: let Hydra report on those itself.
OWN_CONFIG = {"--config-dir", "-cd", "--config-path", "-cp", "--experimental-rerun"}
FLAGS_WITH_VALUE = {
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--config-path",
    "-cp",
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--info",
    "-i",
    "--experimental-rerun",
    "--shell-completion",
    "-sc",
}

# What a run writes into its run dir; a folder that holds one of these without Hydra's .hydra/ is
# someone else's.
KDTRAIN_OUTPUTS = ("metrics.jsonl", "metrics.csv", "summary.json", "student.safetensors", "checkpoints", "baseline")

log = logging.getLogger("kdtrain")
register_schema()


def _split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(flags with their values, overrides)."""
    flags, overrides = [], []
    it = iter(argv)
    for arg in it:
        if arg.startswith("-"):
            flags.append(arg)
            if arg in FLAGS_WITH_VALUE and "=" not in arg:
                value = next(it, None)
                if value is not None:
                    flags.append(value)
        else:
            overrides.append(arg)
    return flags, overrides


def _normalise(overrides: list[str]) -> list[str]:
    # `experiment: null` is in the root defaults list, so `experiment=NAME` is the form; the `+experiment=NAME`
    # that older command lines used would now fail in Hydra ("an item is already at 'experiment'").
    return [o[1:] if o.startswith("+experiment=") else o for o in overrides]


def _group_options(group: str) -> list[str]:
    loader = GlobalHydra.instance().config_loader()
    return sorted(loader.get_group_options(group))


def _one_line(e: Exception, override: str | None) -> str:
    """Turn a Hydra / OmegaConf composition error into one sentence naming the key and the fix."""
    text = str(e)
    missing = re.search(r"Could not find '([\w/]+)/([^']+)'", text)
    if missing:
        group, option = missing.groups()
        options = _group_options(group)
        close = difflib.get_close_matches(option, options, n=2)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        return f"{group}={option} is not a known option{hint}; choose one of: {', '.join(options)}"
    unknown = re.search(r"Could not override '([^']+)'", text)
    if unknown:
        key = unknown.group(1)
        close = difflib.get_close_matches(key, _known_keys(), n=2)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        return (
            f"{key} is not a kdtrain setting{hint}; `kdtrain --cfg job` lists every key "
            f"(to add an option to a custom model, write +{key}=VALUE)"
        )
    cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else e
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and "not in struct" in str(cause):
        key = getattr(cause, "full_key", None) or (override or "").split("=")[0].lstrip("+~")
        return (
            f"{key} is not a kdtrain setting; check the spelling (`kdtrain --cfg job` lists every key), "
            f"or add a model option with +{key}=VALUE"
        )
    if isinstance(cause, ValidationError):
        key = getattr(cause, "full_key", None) or "?"
        value = override.split("=", 1)[1] if override and "=" in override else "?"
        reason = str(cause).splitlines()[0]
        return f"{key}={value} is not accepted: {reason}"
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)
    return first


def _known_keys() -> list[str]:
    cfg = hydra.compose(config_name="config")
    keys: list[str] = []

    def walk(node: DictConfig, prefix: str) -> None:
        for k in node:
            value = node._get_node(k)
            keys.append(prefix + str(k))
            if isinstance(value, DictConfig):
                walk(value, f"{prefix}{k}.")

    walk(cfg, "")
    return keys


def _sweep_variants(overrides: list[str]) -> list[list[str]]:
    """Override lists that cover every value of every swept key (not the full product)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as e:
        raise UserError(f"cannot parse the command line: {str(e).splitlines()[0]}") from None
    base: list[str] = []
    sweeps: list[tuple[int, list[str]]] = []  # (position in base, every value of that key)
    for text, o in zip(overrides, parsed):
        if not o.is_sweep_override():
            base.append(text)
            continue
        try:
            values = [str(v) for v in o.sweep_string_iterator()]
        except Exception:  # interval sweeps (for optimisers) have no finite list: checked at run time
            continue
        key = text.split("=", 1)[0]
        sweeps.append((len(base), [f"{key}={v}" for v in values]))
        base.append(sweeps[-1][1][0])
    variants = [base]
    for pos, values in sweeps:
        for v in values[1:]:
            variant = list(base)
            variant[pos] = v
            variants.append(variant)
    return variants


def check_command_line(argv: list[str]) -> list[str]:
    """Compose and validate the config each run would get; raise UserError on the first problem.

    Returns the command line to hand to Hydra: `argv`, plus `hydra.run.dir=RUN_DIR` when a run is
    resumed from RUN_DIR/checkpoints/ without a hydra.run.dir (it continues in its own run dir).
    """
    argv = _normalise(argv)
    flags, overrides = _split_argv(argv)
    if PRINT_ONLY & set(flags) or OWN_CONFIG & set(flags):
        return argv
    config_name = "config"
    for i, f in enumerate(flags):
        if f in ("--config-name", "-cn") and i + 1 < len(flags):
            config_name = flags[i + 1]
        elif f.startswith("--config-name="):
            config_name = f.split("=", 1)[1]
    multirun = "-m" in flags or "--multirun" in flags
    _check_syntax(overrides, multirun)
    user = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    variants = _sweep_variants(user) if multirun else [user]
    extra: list[str] = []
    with hydra.initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        for variant in variants:
            try:
                cfg = hydra.compose(config_name=config_name, overrides=variant)
            except (HydraException, OmegaConfBaseException) as e:
                culprit = _culprit(e, variant)
                raise UserError(_one_line(e, culprit)) from None
            validate(cfg)
            _check_machine(cfg)
            if multirun and cfg.resume not in (None, "auto"):
                raise UserError(
                    f"resume={cfg.resume} continues one run; a sweep (--multirun) continues its jobs "
                    "with resume=auto and the same hydra.sweep.dir"
                )
            if not multirun:
                extra = _check_outputs(cfg, overrides)
    return argv + extra


def _check_syntax(overrides: list[str], multirun: bool) -> None:
    """Each override parses (Hydra's own ones too, which are not composed here), lists several values
    only in a sweep, and no output folder has a control character (a newline breaks logs and commands)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for text in overrides:
        key, _, value = text.partition("=")
        name = key.lstrip("+~")
        if name in ("hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir") and not value.isprintable():
            raise UserError(f"{name}={value!r} holds a control character (a newline?); choose a folder name without")
        try:
            override = parser.parse_overrides([text])[0]
        except OverrideParseException:
            raise UserError(
                f"cannot parse {text!r}: Hydra needs quotes around a value with characters such as non-ASCII "
                f"letters, commas or brackets, e.g. {_shell_override(key, value)}"
            ) from None
        if override.is_sweep_override() and not multirun:
            raise UserError(
                f"{text!r} lists several values (a comma separates values to sweep over): add --multirun to sweep, "
                f"or quote the value, e.g. {_shell_override(key, value)}"
            )


def _check_machine(cfg: DictConfig) -> None:
    """The device and precision exist here (before Hydra creates a run dir)."""
    from kdtrain.run import resolve_amp, resolve_device

    resolve_amp(cfg.amp, resolve_device(cfg.device))


def _check_writable(folder: Path, key: str) -> None:
    """`folder` exists as a writable directory, or can be created."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{key}={folder} cannot be created: {existing} is a file, not a folder; choose another {key}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(
            f"{key}={folder} cannot be written: {existing} is not writable for this user; choose another {key}"
        )


def _check_outputs(cfg: DictConfig, overrides: list[str]) -> list[str]:
    """Where a single run writes: the run dir (not another run's, unless resuming it) and the teacher
    store can be written, and a checkpoint to resume from fits this config. Returns overrides to add."""
    run_dir = next((Path(_value_of(o)).expanduser() for o in overrides if o.startswith("hydra.run.dir=")), None)
    extra = []
    checkpoint = find_resume(cfg.resume, run_dir)
    if checkpoint is not None and run_dir is None:
        run_dir = run_dir_of(checkpoint)  # continue in the run's own dir
        if run_dir is not None:
            extra.append(f"hydra.run.dir={_hydra_value(str(run_dir))}")
    if run_dir is not None:
        _check_writable(run_dir, "hydra.run.dir")
        refuse_another_run(run_dir, checkpoint)
        resumes_it = checkpoint is not None and run_dir_of(checkpoint) == run_dir.resolve()
        ours = [name for name in KDTRAIN_OUTPUTS if (run_dir / name).exists()]
        if ours and not resumes_it and not (run_dir / ".hydra").is_dir():
            raise UserError(
                f"{run_dir} holds {ours[0]} but is not a kdtrain run dir (it has no .hydra/), and kdtrain would "
                "overwrite it; choose another hydra.run.dir"
            )
    if checkpoint is not None:
        load_training_checkpoint(checkpoint, OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    if not cfg.teacher.get("checkpoint"):
        from kdtrain.run import resolve_amp, resolve_device
        from kdtrain.teacher import WEIGHTS, precision, teacher_key

        store = Path(str(cfg.teacher_store)).expanduser()
        key = teacher_key(cfg, precision(resolve_amp(cfg.amp, resolve_device(cfg.device))))
        if not (store / key / WEIGHTS).is_file():  # reading a stored teacher needs no write access
            _check_writable(store, "teacher_store")
    if run_dir is not None and distributed.is_main():
        # One run per run dir, held until this process ends: taken before Hydra writes anything there,
        # after the checks (a refused command creates nothing); the run dir is checked again under the
        # lock, as another process may have finished a run there since.
        runlock.hold(run_dir)
        refuse_another_run(run_dir, checkpoint)
    return extra


def _value_of(override: str) -> str:
    """The value Hydra reads from `key=value` (quotes removed)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return str(OverridesParser.create().parse_overrides([override])[0].value())


def _hydra_value(text: str) -> str:
    """`text` as a Hydra override value (quoted unless it is plain path characters)."""
    if re.fullmatch(r"[A-Za-z0-9_./~-]+", text):
        return text
    if '"' not in text and "\\" not in text:
        return f'"{text}"'
    # Hydra unescapes backslashes only before a quote (and before the closing one): double those, escape the quote.
    return "'" + re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), text) + "'"


def _shell_override(key: str, value: str) -> str:
    """`key=value` quoted for Hydra, then for the shell: pasted into a terminal, Hydra gets `value` as it is."""
    return shlex.quote(f"{key}={_hydra_value(value)}")


def _culprit(e: Exception, overrides: list[str]) -> str | None:
    text = str(e)
    named = [o for o in overrides if o in text]
    if named:  # the longest: `epochs=1` is in a message about `epochs=1.5` too
        return max(named, key=len)
    key = getattr(e.__cause__, "full_key", None)
    return next((o for o in overrides if key and o.lstrip("+~").split("=")[0] == key), None)


def _full_error() -> bool:
    """HYDRA_FULL_ERROR=1: show the traceback of a user error too (for debugging kdtrain itself)."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def _resume_command(run_dir: Path, task_overrides: list[str]) -> str:
    """The command that continues the run in `run_dir`, quoted to work when pasted into a shell (the run
    dir quoted for Hydra too: a comma would make it a sweep)."""
    args = [o for o in task_overrides if o.lstrip("+~").split("=", 1)[0] != "resume"]
    return " ".join(["kdtrain", _shell_override("resume", str(run_dir)), *map(shlex.quote, args)])


def _interrupted_message(e: Exception, run_dir: Path, task_overrides: list[str]) -> str:
    """What an interrupted run says: what was saved (only what this interruption saved, or what an earlier
    phase left) and the command that continues it."""
    from kdtrain.engine import Interrupted

    last = run_dir / "checkpoints" / "last.pt"
    if isinstance(e, Interrupted) and e.checkpoint is not None and e.checkpoint.is_file():
        then = f"checkpoints/last.pt saved; continue with: {_resume_command(run_dir, task_overrides)}"
    elif last.is_file():  # e.g. during the baseline: the student's training is done, the baseline restarts
        then = (
            "nothing saved for the current phase (checkpoints/last.pt holds the student's last epoch); continue "
            f"with: {_resume_command(run_dir, task_overrides)}"
        )
    else:  # stopped before the student's first checkpoint (e.g. while the teacher trained)
        args = [shlex.quote(o) for o in task_overrides if not o.startswith("resume=")]
        then = f"nothing to resume yet; start again with: {' '.join(['kdtrain', *args])} " + _shell_override(
            "hydra.run.dir", str(run_dir)
        )
    return f"{e}; {then}"


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name="config")
def task(cfg: DictConfig) -> float:
    """Hydra's task function: returns the best validation accuracy (what sweepers optimise)."""
    from kdtrain.engine import Interrupted, stop_on_signals
    from kdtrain.run import run

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    locked_here = False
    try:
        # A single run with hydra.run.dir holds its lock since the command-line check; a sweep's job or
        # a run in the default dir takes it here (after Hydra's .hydra/, before any output of kdtrain).
        locked_here = distributed.is_main() and runlock.hold(run_dir)
        with stop_on_signals():  # SIGINT / SIGTERM: finish the step, save, raise Interrupted
            return run(cfg, run_dir)
    except UserError as e:
        message = str(e)
        if isinstance(e, WriteError) and (run_dir / "checkpoints" / "last.pt").is_file():
            message += f"; then continue with: {_resume_command(run_dir, list(hc.overrides.task))}"
        log.error("%s", message)
        if hc.mode == RunMode.MULTIRUN or _full_error():
            raise  # the sweep records the failed job
        print(f"kdtrain: error: {message}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        message = _interrupted_message(e, run_dir, list(hc.overrides.task))
        log.warning("%s", message)
        print(f"kdtrain: {message}", file=sys.stderr)
        sys.exit(128 + e.signum)  # 130 for SIGINT, 143 for SIGTERM, as a shell reports a killed job
    finally:
        if locked_here:  # the next job of a sweep in this process
            runlock.release(run_dir)


def default_run_dir(now: datetime) -> str:
    """conf/config.yaml's hydra.run.dir (its one home) with its ${now:FORMAT} parts filled in from `now`."""
    text = (importlib.resources.files(CONFIG_MODULE) / "config.yaml").read_text()
    pattern = OmegaConf.create(text).hydra.run._get_node("dir")._value()  # unresolved: ${now:...} kept
    return re.sub(r"\$\{now:([^}]*)\}", lambda m: now.strftime(m.group(1)), pattern)


def _distributed_argv(argv: list[str]) -> list[str]:
    """Under torchrun: one run dir for all ranks (rank 0's clock decides), and only rank 0 writes
    Hydra's files and logs."""
    flags, overrides = _split_argv(argv)
    if not any(o.startswith("hydra.run.dir=") for o in overrides) and not ({"-m", "--multirun"} & set(flags)):
        # conf/config.yaml's hydra.run.dir resolved with rank 0's clock: each rank resolving ${now:...}
        # itself could land a second apart.
        stamp = distributed.broadcast_object(default_run_dir(datetime.now()))
        argv = [*argv, f"hydra.run.dir={stamp}"]
    if not distributed.is_main():
        argv = [*argv, "hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    return argv


def main() -> None:
    # A log file that cannot be written (a full disk) must not add "--- Logging error ---" tracebacks
    # to the one line that says so.
    logging.raiseExceptions = False
    distributed.init()  # under torchrun: join the process group first (a no-op otherwise)
    try:
        argv = check_command_line(sys.argv[1:])
    except UserError as e:
        if _full_error():
            raise
        if distributed.is_main():
            print(f"kdtrain: error: {e}", file=sys.stderr)
        sys.exit(2)
    if distributed.enabled():
        argv = _distributed_argv(argv)
    sys.argv = [sys.argv[0], *argv]
    try:
        task()
    finally:
        distributed.finish()
