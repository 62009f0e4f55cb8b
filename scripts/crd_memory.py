"""Memory of the CRD term on the CPU: the banks' bytes and one training step's peak RSS growth.

python scripts/crd_memory.py --samples 50000 --nce-k 16384 --batch 64 --student-dim 256 --teacher-dim 256
"""

from __future__ import annotations

import argparse
import resource

import torch

from kdtrain.terms.crd import CRDLoss


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=50000)
    p.add_argument("--nce-k", type=int, default=16384)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--student-dim", type=int, default=256)
    p.add_argument("--teacher-dim", type=int, default=256)
    p.add_argument("--feat-dim", type=int, default=128)
    a = p.parse_args()
    labels = torch.arange(a.samples) % 100
    before = max_rss_mib()
    term = CRDLoss(a.student_dim, a.teacher_dim, labels, feat_dim=a.feat_dim, nce_k=a.nce_k)
    built = max_rss_mib()
    s, t = torch.randn(a.batch, a.student_dim, requires_grad=True), torch.randn(a.batch, a.teacher_dim)
    term(s, t, torch.arange(a.batch)).backward()
    stepped = max_rss_mib()
    heads = sum(p.numel() * p.element_size() for p in term.parameters())
    print(
        f"N={a.samples} K={term.k} B={a.batch}: banks {term.memory_bytes() / 2**20:.1f} MiB "
        f"(2 x N x {a.feat_dim} x 4 bytes), heads {heads / 2**20:.2f} MiB; "
        f"peak RSS +{built - before:.0f} MiB to build, +{stepped - built:.0f} MiB for one step"
    )


if __name__ == "__main__":
    main()
