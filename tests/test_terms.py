"""The loss-term registry (issue #15): every method trains end to end (CLI, default data; a CIFAR-zoo
pair; a torchvision pair), terms combine freely, weights follow their schedule, and bad settings get
one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdtrain.errors import UserError
from kdtrain.run import run
from kdtrain.terms import TERMS, Batch, LossTerms, Term, TermSpec, load_all, register, resolve
from tests.conftest import run_cli

METHOD_MODES = {"dkd": "dkd", "dist": "dist", "kd_std": "kd", "rkd": "rkd", "pkt": "pkt", "sp": "sp"}
EVERY_TERM = "loss=[ce,kd,feat,dkd,dist,rkd,pkt,sp]"


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", list(METHOD_MODES))
def test_every_method_trains_from_the_cli_on_the_default_data(mode, tmp_path, store):
    run_dir = tmp_path / "run"
    done = run_cli(
        f"mode={mode}",
        "epochs=2",
        "teacher_train.epochs=1",
        "progress=off",
        "baseline=false",
        f"teacher_store={store}",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    table = rows(run_dir)
    column = METHOD_MODES[mode]
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r[column] > 0 for r in table)
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:5] == ["epoch", "loss", "ce", "kd", "feat"] and column in header  # a column per term
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["mode"] == mode and summary["loss"][column] > 0


def _pair_run(compose, tmp_path, *overrides: str) -> list[dict]:
    cfg = compose(
        "dataset=fake",
        "epochs=1",
        "baseline=false",
        "teacher_train.batch_size=64",
        "feature.student=layer2",
        "feature.teacher=layer2",
        EVERY_TERM,
        *overrides,
    )
    run(cfg, tmp_path)
    return rows(tmp_path)


def test_every_term_at_once_on_a_cifar_zoo_pair(compose, tmp_path):
    (row,) = _pair_run(
        compose, tmp_path, "teacher=resnet20", "student=resnet8", "sp.student=layer3", "sp.teacher=layer3"
    )
    for term in ("ce", "kd", "feat", "dkd", "dist", "rkd", "pkt", "sp"):
        assert torch.isfinite(torch.tensor(row[term])) and row[term] > 0, term


def test_every_term_at_once_on_a_torchvision_pair(compose, tmp_path):
    (row,) = _pair_run(
        compose,
        tmp_path,
        "teacher=torchvision",
        "teacher.arch=resnet18",
        "student=torchvision",
        "student.arch=mobilenet_v3_small",
        "feature.student=net.features.3",
        "feature.teacher=net.layer2",
    )
    for term in ("ce", "kd", "feat", "dkd", "dist", "rkd", "pkt", "sp"):
        assert torch.isfinite(torch.tensor(row[term])) and row[term] > 0, term


def test_free_combination_dkd_with_a_fitnet_hint(compose, tmp_path):
    cfg = compose(
        "mode=dkd",
        "loss=[ce,dkd,feat]",
        "alpha=100",
        "student=cnn",
        "feature.student=features.3",
        "feature.teacher=features.3",
        "dkd.beta=2",
        "dkd.warmup_epochs=2",
        "baseline=false",
    )
    assert [(s.name, s.weight) for s in resolve(cfg)] == [("ce", 1.0), ("dkd", 1.0), ("feat", 100.0)]
    run(cfg, tmp_path)
    table = rows(tmp_path)
    # The loss is the weighted sum of the columns, DKD's weight ramping 1/2 then 1 over its warm-up.
    for row, ramp in zip(table, (0.5, 1.0)):
        assert row["loss"] == pytest.approx(row["ce"] + ramp * row["dkd"] + 100 * row["feat"], rel=1e-5)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["loss"] == {"ce": 1.0, "dkd": 1.0, "feat": 100.0}


def test_weight_schedule_warmup_and_start():
    load_all()
    spec = TermSpec(TERMS["dkd"], None, 2.0, warmup_epochs=20, start_epoch=1)
    assert [spec.weight_at(e) for e in (1, 10, 20, 30)] == [0.1, 1.0, 2.0, 2.0]  # min(epoch / 20, 1), as DKD
    later = TermSpec(TERMS["kd"], None, 0.9, warmup_epochs=0, start_epoch=3)
    assert [later.weight_at(e) for e in (1, 2, 3)] == [0.0, 0.0, 0.9]


def test_dkd_uses_the_teachers_top1_for_unlabelled_samples(compose):
    from kdtrain.losses import dkd_loss

    cfg = compose("mode=dkd")
    _, dkd = resolve(cfg)
    term = dkd.cls(dkd.cfg, None)
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    labels = torch.tensor([1, -1, 3, -1])
    stand_in = torch.where(labels >= 0, labels, t.argmax(1))
    got = term(Batch(s, labels, torch.arange(4), 1, t))
    assert got.item() == pytest.approx(dkd_loss(s, t, stand_in, 1.0, 8.0, 4.0).item(), rel=1e-6)


def test_a_term_with_state_is_checkpointed_and_resumed(compose, tmp_path):
    """A term's parameters and buffers go into checkpoints ('terms') and come back on resume."""

    @register("test_counter", weight_key="alpha")
    class Counter(Term):
        def __init__(self, cfg, setup):
            super().__init__(cfg, setup)
            self.register_buffer("steps", torch.zeros((), dtype=torch.long))
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, batch: Batch) -> torch.Tensor:
            self.steps += 1
            return self.scale * batch.student_logits.float().pow(2).mean()

    try:
        cfg = compose("loss=[ce,test_counter]", "baseline=false", "epochs=1")
        run(cfg, tmp_path / "a")
        state = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=True)
        assert int(state["terms"]["test_counter"]["steps"]) == 21  # 1297 samples / 64 a step
        assert state["adapter"] == {}
        run(compose("loss=[ce,test_counter]", "baseline=false", "epochs=2", f"resume={tmp_path / 'a'}"), tmp_path / "b")
        again = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=True)
        assert int(again["terms"]["test_counter"]["steps"]) == 42
    finally:
        del TERMS["test_counter"]


BAD = [
    (["loss=[ce,foo]"], "foo is not a loss term"),
    (["loss=[ce,kd,ce]"], "names a term twice"),
    (["mode=dkd", "dkd.beta=-1"], "dkd.beta=-1"),
    (["mode=dist", "dist.tau=0"], "dist.tau=0"),
    (["mode=dkd", "dkd.warmup_epochs=-2"], "dkd.warmup_epochs=-2"),
    (["mode=dkd", "dkd.start_epoch=5"], "dkd.start_epoch=5"),
    (["mode=rkd", "rkd.weight=-1"], "rkd.weight=-1"),
    (["loss=[dkd]", "dkd.start_epoch=2"], "no loss term is on at epoch 1"),
]


@pytest.mark.parametrize("overrides, message", BAD)
def test_bad_term_settings_get_one_line(compose, overrides, message):
    from kdtrain.config import validate

    with pytest.raises(UserError, match=message.replace("[", r"\[")) as err:
        validate(compose(*overrides))
    assert "\n" not in str(err.value)


def test_bad_term_keys_from_the_cli(tmp_path):
    done = run_cli("dkd.betta=2", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        (
            "kdtrain: error: dkd.betta is not a kdtrain setting (did you mean dkd.beta or dist.beta?); `kdtrain --cfg "
            "job` lists every key (to add an option to a custom model, write +dkd.betta=VALUE)"
        )
    ]
    done = run_cli("mode=dkd", "dkd.beta=abc", cwd=tmp_path)
    assert done.returncode == 2 and "dkd.beta=abc is not accepted" in done.stderr


def test_every_mode_preset_composes_with_its_published_weights(compose):
    from kdtrain.config import effective_weights

    expected = {
        "dkd": {"ce": 1.0, "dkd": 1.0},
        "dist": {"ce": 1.0, "dist": 2.0},
        "kd_std": {"ce": 0.1, "kd": 9.0},
        "rkd": {"ce": 1.0, "rkd": 1.0},
        "pkt": {"ce": 1.0, "pkt": 30000.0},
        "sp": {"ce": 1.0, "sp": 3000.0},
    }
    for mode, weights in expected.items():
        cfg = compose(f"mode={mode}")
        assert {k: v for k, v in effective_weights(cfg).items() if v} == weights, mode
    std = compose("mode=kd_std")
    assert std.temperature == 2.0 and std.kd.standardize is True
    dkd = compose("mode=dkd")
    assert (dkd.dkd.alpha, dkd.dkd.beta, dkd.dkd.temperature, dkd.dkd.warmup_epochs) == (1.0, 8.0, 4.0, 20)


def test_loss_terms_need_what_they_declare():
    load_all()
    terms = LossTerms([TermSpec(TERMS["ce"], None, 1.0)])
    assert not terms.needs_teacher and terms.columns == ["ce", "kd", "feat"] and terms.layers("student") == []


@pytest.mark.parametrize(
    "experiment",
    sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "experiment").glob("cifar100_*.yaml")),
)
def test_every_cifar_recipe_reads_layers_both_models_have(compose, experiment):
    """The module paths of every recipe's terms exist in its teacher and student (checked on the meta device)."""
    from types import SimpleNamespace

    from kdtrain.run import _check_layers

    cfg = compose(f"experiment={experiment}")
    _check_layers(cfg, resolve(cfg), SimpleNamespace(num_classes=100, in_shape=(3, 32, 32)))
