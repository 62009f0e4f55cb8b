"""`feat`: features compared at module paths through automatic adapters (FitNets-style hints, AT, ...);
options under `feature.*` (see kdtrain.features), weight `alpha`. `feature.hint_epochs=N` is FitNets'
hint stage: this term alone for the first N epochs (the other terms start at epoch N + 1)."""

from __future__ import annotations

from torch import Tensor, nn

from kdtrain.config import FeatureConfig
from kdtrain.features import Adapter, describe_pairs, pairs_loss, parse_pairs
from kdtrain.terms import Batch, Setup, Term, register


@register("feat", FeatureConfig, key="feature", weight_key="alpha")
class Feat(Term):
    def __init__(self, cfg: FeatureConfig, setup: Setup):
        super().__init__(cfg, setup)
        self.pairs, self.loss_name = parse_pairs(cfg), str(cfg.loss)
        self.student_layers, self.teacher_layers = self.layer_paths(cfg)
        self.shapes = list(
            zip(setup.shapes("student", self.student_layers), setup.shapes("teacher", self.teacher_layers))
        )
        # The adapters (student side, as in FitNets) are this term's parameters: state-dict keys adapters.N.*
        self.adapters = nn.ModuleList(Adapter(s, t, self.loss_name, str(cfg.align)) for s, t in self.shapes)

    @classmethod
    def layer_paths(cls, cfg: FeatureConfig) -> tuple[list[str], list[str]]:
        pairs = parse_pairs(cfg)
        return [p.student for p in pairs], [p.teacher for p in pairs]

    def forward(self, batch: Batch) -> Tensor:
        s_feats = [batch.student_features[p] for p in self.student_layers]
        t_feats = [batch.teacher_features[p] for p in self.teacher_layers]
        return pairs_loss(self.pairs, self.adapters, self.loss_name, s_feats, t_feats)

    def describe(self) -> list[str]:
        return describe_pairs(self.pairs, self.shapes, self.adapters, self.loss_name)
