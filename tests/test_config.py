"""Every config option composes and validates; bad command lines fail before any work with one line."""

from pathlib import Path

import hydra
import pytest
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from kdtrain.cli import check_command_line
from kdtrain.config import Mode, effective_weights, validate
from kdtrain.errors import UserError
from tests.conftest import run_cli

CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["teacher", "student", "dataset", "optimizer", "scheduler", "mode"])
def test_every_group_option_composes(compose, group):
    for option in options(group):
        extra = [f"{group}._target_=torch.nn.Identity"] if option == "custom" else []
        cfg = compose(f"{group}={option}", *extra)
        if group in ("teacher", "student", "dataset"):
            assert cfg[group].name == option
        if group != "dataset":  # datasets with files need dataset.root at run time, not to compose
            validate(cfg)


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes(compose, experiment):
    validate(compose(f"experiment={experiment}"))


@pytest.mark.parametrize(
    "mode, weights",
    [("soft", (0.1, 0.9, 0.0)), ("feature", (1.0, 0.0, 1.0)), ("combined", (0.1, 0.9, 1.0)), ("none", (1.0, 0.0, 0.0))],
)
def test_mode_presets_set_the_fields_default_weights(compose, mode, weights):
    cfg = compose(f"mode={mode}")
    assert cfg.mode == Mode(mode)
    w = effective_weights(cfg)
    assert (w["ce"], w["kd"], w["feat"]) == weights


def test_weights_are_overridable_after_the_mode(compose):
    w = effective_weights(compose("mode=combined", "ce_weight=0.5", "kd_weight=0.5", "alpha=3"))
    assert (w["ce"], w["kd"], w["feat"]) == (0.5, 0.5, 3.0)


BAD = [
    (["temperature=abc"], "temperature=abc"),
    (["mode=foo"], "mode=foo"),
    (["temperature=0"], "temperature"),
    (["alpha=-1"], "alpha"),
    (["epochs=0"], "epochs"),
    (["device=tpu"], "device=tpu"),
    (["amp=xyz"], "amp=xyz"),
    (["teacher=nonexistent"], "teacher=nonexistent"),
    (["student=resnet21"], "resnet20"),  # suggests the close match
    (["tempurature=3"], "did you mean temperature"),
    (["student.hidden=abc"], "student.hidden"),
    (["+student.widht=3"], "student.widht"),
    (["optimizer.name=adam"], "optimizer.name"),
    (["dataset.labelled_per_class=0"], "dataset.labelled_per_class"),
    (["student=custom"], "student._target_"),
    (["--multirun", "temperature=1,abc"], "temperature=abc"),
    (["--multirun", "mode=soft,bogus"], "mode=bogus"),
]


@pytest.mark.parametrize("argv, needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_command_lines_name_the_key(argv, needle):
    with pytest.raises(UserError) as err:
        check_command_line(argv)
    message = str(err.value)
    assert needle in message
    assert "\n" not in message
    assert not GlobalHydra.instance().is_initialized()


def test_good_command_lines_pass():
    check_command_line(["mode=combined", "temperature=4"])
    check_command_line(["--multirun", "temperature=1,4,8", "mode=soft,combined"])
    check_command_line(["experiment=digits_missing_class"])
    check_command_line(["+experiment=digits_missing_class"])  # the older spelling keeps working


def test_every_default_has_one_home():
    # A key whose value sits both in the schema (kdtrain/config.py) and in conf/config.yaml can drift (it did:
    # teacher_train.batch_size was 64 in one and 32 in the other). The YAML is the home of root values.
    from omegaconf import OmegaConf

    from kdtrain.config import KDConfig

    schema = OmegaConf.structured(KDConfig)
    root = OmegaConf.load(CONF / "config.yaml")
    both = []

    def walk(yaml_node, schema_node, prefix=""):
        for key in yaml_node:
            if (not prefix and key in ("defaults", "hydra")) or key not in schema_node:
                continue
            if OmegaConf.is_dict(yaml_node._get_node(key)) and OmegaConf.is_dict(schema_node._get_node(key)):
                walk(yaml_node[key], schema_node[key], f"{prefix}{key}.")
            elif not OmegaConf.is_missing(schema_node, key):
                both.append(f"{prefix}{key}")

    walk(root, schema)
    assert not both, f"these keys have a value in both kdtrain/config.py and conf/config.yaml: {both}"
    mode = OmegaConf.load(CONF / "mode" / "soft.yaml")
    assert all(OmegaConf.is_missing(schema, k) for k in mode if k in schema)


def test_the_run_dir_pattern_has_one_home():
    from datetime import datetime

    from kdtrain.cli import default_run_dir

    # Under torchrun the CLI fills conf/config.yaml's hydra.run.dir with rank 0's clock; it reads the pattern there.
    assert default_run_dir(datetime(2026, 1, 2, 3, 4, 5)) == "outputs/runs/2026-01-02/03-04-05"


def test_experiment_values_win_over_the_root_config():
    # `experiment: null` sits after _self_ in the root defaults, so an experiment's keys override the root's.
    with hydra.initialize_config_module(config_module="kdtrain.conf", version_base="1.3"):
        cfg = hydra.compose("config", overrides=["experiment=cifar100_resnet56_resnet20_kd"])
        plain = hydra.compose("config")
    assert (cfg.epochs, cfg.teacher_train.epochs, cfg.scheduler.name) == (240, 240, "multistep")
    assert (plain.epochs, plain.scheduler.name) == (30, "cosine")


def test_the_cifar_recipe_is_written_once():
    # Every CIFAR-100 experiment composes conf/recipe/cifar100.yaml and holds only what differs.
    for path in sorted((CONF / "experiment").glob("cifar100_*.yaml")):
        text = path.read_text()
        assert "- /recipe: cifar100" in text, path.name
        recipe_keys = ("epochs:", "teacher_train:", "scheduler:", "lr:")
        assert not any(line.startswith(recipe_keys) for line in text.splitlines()), path.name


@pytest.mark.parametrize("argv", [["temperature=abc"], ["epochs=0"], ["device=tpu"], ["amp=fp16", "device=cpu"]])
def test_cli_bad_input_exits_nonzero_with_one_line(tmp_path, argv):
    run_dir = tmp_path / "run"
    result = run_cli("epochs=1", *argv, f"hydra.run.dir={run_dir}", f"teacher_store={tmp_path / 'store'}")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kdtrain: error:"), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "store").exists()  # nothing was trained or written


def test_the_mode_enum_and_the_mode_files_agree():
    # `Mode` types the `mode` key (so a typo gets Hydra's one-line error); conf/mode/ holds the presets.
    from kdtrain.config import Mode

    assert {m.value for m in Mode} == set(options("mode"))
    for name in options("mode"):
        assert OmegaConf.load(CONF / "mode" / f"{name}.yaml").mode == name
