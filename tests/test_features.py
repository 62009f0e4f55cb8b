"""Feature distillation between any pair of models: module paths, automatic adapters, losses, two stages."""

import json

import pytest
import torch

from kdtrain.errors import UserError
from kdtrain.features import FeatureDistiller, Pair, parse_pairs
from kdtrain.models import build_model
from kdtrain.run import run


def _models(teacher: str, student: str, in_shape, teacher_kw=None, student_kw=None):
    torch.manual_seed(0)
    t = build_model({"name": teacher, **(teacher_kw or {})}, 10, in_shape, "teacher").eval().requires_grad_(False)
    s = build_model({"name": student, **(student_kw or {})}, 10, in_shape, "student")
    return t, s


def _train_steps(student, teacher, distiller, in_shape, steps=5):
    """A few optimizer steps on the feature loss alone, on one fixed batch: returns the losses."""
    x = torch.randn(8, *in_shape)
    params = list(student.parameters()) + list(distiller.parameters())
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    student.train()
    losses = []
    for _ in range(steps):
        student(x)
        with torch.no_grad():
            teacher(x)
        loss = distiller.compute()
        opt.zero_grad()
        loss.backward()
        losses.append(loss.item())
        opt.step()
    return losses


PAIRS = [
    # (teacher, student, in_shape, teacher layer, student layer, adapter kind)
    ("cnn", "mlp", (1, 8, 8), "features.3", "body.1", "Linear"),  # map -> vector: pooled, then linear
    ("resnet32x4", "resnet8x4", (3, 32, 32), "layer3", "layer3", "Identity"),
    ("resnet56", "mobilenetv2", (3, 32, 32), "layer3", "blocks.3", "Sequential"),  # 1x1 conv + BN
    ("torchvision", "torchvision", (3, 32, 32), "net.layer3", "net.features.8", "Sequential"),
]


@pytest.mark.parametrize(
    "teacher, student, in_shape, t_path, s_path, kind", PAIRS, ids=[f"{p[0]}->{p[1]}" for p in PAIRS]
)
def test_heterogeneous_pairs_train(teacher, student, in_shape, t_path, s_path, kind):
    t_kw = {"arch": "resnet18"} if teacher == "torchvision" else None
    s_kw = {"arch": "mobilenet_v3_small"} if student == "torchvision" else None
    t, s = _models(teacher, student, in_shape, t_kw, s_kw)
    distiller = FeatureDistiller(s, t, [Pair(s_path, t_path)], in_shape, torch.device("cpu"))
    assert type(distiller.adapters[0].proj).__name__ == kind
    losses = _train_steps(s, t, distiller, in_shape)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    # Gradients reached the student's guided layer and the adapter.
    s_layer = s.get_submodule(s_path)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in s_layer.parameters())
    if kind != "Identity":
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.adapters[0].parameters())
    distiller.remove()


@pytest.mark.parametrize("loss", ["mse", "smooth_l1", "cosine", "at"])
@pytest.mark.parametrize("align", ["pool", "interpolate"])
def test_every_loss_and_alignment(loss, align):
    t, s = _models("resnet20", "resnet8", (3, 16, 16))
    # layer1 of the student (16 ch, 16x16) against layer2 of the teacher (32 ch, 8x8): channels and size differ.
    distiller = FeatureDistiller(
        s, t, [Pair("layer1", "layer2")], (3, 16, 16), torch.device("cpu"), loss=loss, align=align
    )
    assert (len(list(distiller.parameters())) == 0) == (loss == "at")  # attention transfer needs no adapter
    losses = _train_steps(s, t, distiller, (3, 16, 16), steps=4)
    assert losses[-1] < losses[0]


def test_unknown_layer_names_nearest_and_inspect():
    t, s = _models("cnn", "mlp", (1, 8, 8))
    with pytest.raises(UserError, match=r"feature\.teacher=feature\.3 .*nearest: features\.3.*kdtrain-inspect"):
        FeatureDistiller(s, t, [Pair("auto", "feature.3")], (1, 8, 8), torch.device("cpu"))


def test_parse_pairs_forms():
    from omegaconf import OmegaConf

    assert parse_pairs(OmegaConf.create({"pairs": [], "student": None, "teacher": None})) == [Pair("auto", "auto")]
    assert parse_pairs(OmegaConf.create({"pairs": [], "student": "layer3", "teacher": "layer2"})) == [
        Pair("layer3", "layer2")
    ]
    many = OmegaConf.create(
        {"pairs": [{"student": "a", "teacher": "b", "weight": 2}, {"student": "c", "teacher": "d"}]}
    )
    assert parse_pairs(many) == [Pair("a", "b", 2.0), Pair("c", "d", 1.0)]
    with pytest.raises(UserError):
        parse_pairs(OmegaConf.create({"pairs": [{"student": "a"}]}))


def test_hooks_keep_nothing_after_the_step():
    t, s = _models("cnn", "mlp", (1, 8, 8))
    distiller = FeatureDistiller(s, t, [Pair("auto", "features.3")], (1, 8, 8), torch.device("cpu"))
    _train_steps(s, t, distiller, (1, 8, 8), steps=2)
    assert distiller._student_capture.values == [None] and distiller._teacher_capture.values == [None]
    s(torch.randn(4, 1, 8, 8))  # an evaluation-like forward
    distiller.clear()
    assert distiller._student_capture.values == [None]


def test_run_with_layer_pairs_and_two_stages(compose, tmp_path):
    cfg = compose(
        "mode=feature",
        "epochs=3",
        "feature.hint_epochs=1",
        "baseline=false",
        "student=cnn",
        "feature.student=features.3",
        "feature.teacher=features.3",
    )
    run(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # Stage 1: the loss is the hint term alone; from epoch 2 the mode's loss (CE + alpha * FEAT).
    assert rows[0]["loss"] == pytest.approx(rows[0]["feat"], rel=1e-5)
    assert rows[1]["loss"] == pytest.approx(rows[1]["ce"] + rows[1]["feat"], rel=1e-5)
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert any(k.startswith("adapters.0.") for k in state["adapter"])  # adapters are checkpointed
    from safetensors.torch import load_file

    assert not any(k.startswith("adapters") for k in load_file(tmp_path / "student.safetensors"))


def test_hint_stage_leaves_the_classifier_alone(compose):
    from kdtrain.data import build_dataset
    from kdtrain.engine import FitSpec, fit
    from kdtrain.terms import LossTerms, Setup, resolve

    cfg = compose(
        "optimizer.weight_decay=0.01",
        "mode=feature",
        "feature.hint_epochs=1",
        "feature.student=features.3",
        "feature.teacher=features.3",
    )
    splits = build_dataset(cfg.dataset)
    t, s = _models("cnn", "cnn", (1, 8, 8), student_kw={"width": 8, "hidden": 32})
    terms = LossTerms(resolve(cfg), Setup(s, t, splits.train, 10, (1, 8, 8), torch.device("cpu"), cfg))
    assert [spec.start_epoch for spec in terms.specs] == [2, 1]  # ce after the hint stage, feat from epoch 1
    spec = FitSpec(
        epochs=2,
        batch_size=64,
        lr=0.05,
        seed=0,
        optimizer=cfg.optimizer,
        scheduler=cfg.scheduler,
        progress="off",
    )
    before = s.fc.weight.detach().clone()
    after: list[torch.Tensor] = []
    fit(
        s,
        splits.train,
        splits.val,
        spec,
        torch.device("cpu"),
        None,
        terms=terms,
        teacher=t,
        on_epoch=lambda row: after.append(s.fc.weight.detach().clone()),
    )
    assert torch.equal(after[0], before)  # stage 1: no gradient and no weight decay past the guided layer
    assert not torch.equal(after[1], before)  # stage 2: the mode's loss trains the classifier


def test_bad_feature_settings(compose):
    from kdtrain.config import validate

    with pytest.raises(UserError, match="feature.loss"):
        validate(compose("mode=feature", "feature.loss=l3"))
    with pytest.raises(UserError, match="feature.hint_epochs"):
        validate(compose("mode=feature", "feature.hint_epochs=5", "epochs=2"))
    with pytest.raises(UserError, match="needs the feature term"):
        validate(compose("mode=soft", "feature.hint_epochs=1"))
