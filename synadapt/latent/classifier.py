"""Stage 3 of SynAdapt: a difficulty classifier over question + latent features, and its two baselines.

Features are the refiner's final-pass last-layer hidden states mean-pooled over the question tokens and over the
latent positions (2D). Label ``hard`` = the answer decoded from the latents is wrong. Loss: the pairwise
``L_diff = −log σ(s_hard − s_easy)`` over sampled (hard, easy) pairs plus BCE, so scores are calibrated
probabilities that the latent answer is wrong. Baselines: the same MLP on question features only, and the
perplexity of the latent answer.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn


@dataclass
class ClassifierConfig:
    """Stage-3 difficulty classifier (METHOD.md §1, stage 3)."""

    hidden: int = 256
    lr: float = 1e-3
    epochs: int = 200
    pairs_per_epoch: int = 512
    lambda_bce: float = 1.0
    """Weight of the BCE term that calibrates scores (the pairwise loss alone only ranks)."""
    weight_decay: float = 1e-4
    seed: int = 0


class DifficultyClassifier(nn.Module):
    """MLP (in → hidden → 1) with input standardisation; ``forward`` returns logits, ``score`` probabilities."""

    def __init__(self, in_dim: int, hidden: int = 256):
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x.float() - self.mean) / self.std).squeeze(-1)

    @torch.no_grad()
    def score(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self(x))

    def save(self, out_dir: str | Path, **meta) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  out / "classifier.safetensors")
        (out / "classifier.json").write_text(json.dumps({"in_dim": self.mean.numel(),
                                                         "hidden": self.net[0].out_features, **meta}, indent=2))

    @classmethod
    def load(cls, in_dir: str | Path) -> "DifficultyClassifier":
        meta = json.loads((Path(in_dir) / "classifier.json").read_text())
        clf = cls(meta["in_dim"], meta["hidden"])
        clf.load_state_dict(load_file(Path(in_dir) / "classifier.safetensors"))
        return clf.eval()


def train_classifier(features: torch.Tensor, hard: torch.Tensor, cfg: ClassifierConfig) -> DifficultyClassifier:
    """Fit the classifier with ``L_diff`` on random (hard, easy) pairs plus BCE."""
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    x, y = features.float(), hard.float()
    clf = DifficultyClassifier(x.shape[1], cfg.hidden)
    clf.mean.copy_(x.mean(0))
    clf.std.copy_(x.std(0).clamp(min=1e-6))
    opt = torch.optim.AdamW(clf.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    hard_idx, easy_idx = (y > 0.5).nonzero().squeeze(-1), (y < 0.5).nonzero().squeeze(-1)
    for _ in range(cfg.epochs):
        logits = clf(x)
        loss = cfg.lambda_bce * F.binary_cross_entropy_with_logits(logits, y)
        if len(hard_idx) and len(easy_idx):
            h = hard_idx[torch.randint(len(hard_idx), (cfg.pairs_per_epoch,), generator=g)]
            e = easy_idx[torch.randint(len(easy_idx), (cfg.pairs_per_epoch,), generator=g)]
            loss = loss - F.logsigmoid(logits[h] - logits[e]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return clf.eval()


def f1_hard(scores: torch.Tensor, hard: torch.Tensor, threshold: float = 0.5) -> float:
    """F1 of the hard class when ``score >= threshold`` predicts hard."""
    pred, gold = scores >= threshold, hard.bool()
    tp = (pred & gold).sum().item()
    fp = (pred & ~gold).sum().item()
    fn = (~pred & gold).sum().item()
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def best_threshold(scores: torch.Tensor, hard: torch.Tensor) -> float:
    """The threshold maximising hard-class F1 on ``scores`` (how the perplexity baseline is calibrated)."""
    candidates = torch.unique(scores)
    return float(max(candidates, key=lambda t: f1_hard(scores, hard, float(t)))) if len(candidates) else 0.5


def calibrate_tau(scores: torch.Tensor, rethink_share: float) -> float:
    """The τ at which about ``rethink_share`` of these questions score ≥ τ and are re-thought."""
    if not 0.0 <= rethink_share <= 1.0:
        raise ValueError(f"rethink_share must be in [0, 1], got {rethink_share}")
    if rethink_share == 0:
        return 1.0 + 1e-6
    return float(torch.quantile(scores.float(), 1.0 - rethink_share))
