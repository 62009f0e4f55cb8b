"""CRD term: embedding heads, memory banks, negatives, NCE, exact state round trip."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from kdtrain.terms.crd import CRDLoss, NegativeSampler, nce_loss

LABELS = torch.tensor([0, 0, 1, 1, 2, 2, -1, -1, 0, 1])  # 10 samples, two unlabelled


def crd(k: int = 5, **kw) -> CRDLoss:
    torch.manual_seed(0)
    return CRDLoss(6, 4, LABELS, feat_dim=8, nce_k=k, **kw)


def batch(seed: int, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(idx), 6, generator=g), torch.randn(len(idx), 4, generator=g), torch.tensor(idx)


def test_nce_loss_known_answer():
    # N = 4, K = 2: noise K/N = 0.5. Positive 0.5 -> log(0.5 / 1.0); negatives 0.5 and 1.5 -> log(0.5/1), log(0.5/2).
    scores = torch.tensor([[0.5, 0.5, 1.5]])
    expected = -(math.log(0.5) + math.log(0.5) + math.log(0.25))
    assert nce_loss(scores, 4).item() == pytest.approx(expected, rel=1e-5)
    # Over a batch it is the mean of the rows' losses.
    two = torch.tensor([[0.5, 0.5, 1.5], [1.5, 0.5, 0.5]])
    second = -(math.log(1.5 / 2.0) + 2 * math.log(0.5))
    assert nce_loss(two, 4).item() == pytest.approx((expected + second) / 2, rel=1e-5)


def test_negatives_are_never_the_positive_and_come_from_other_classes():
    sampler = NegativeSampler(LABELS)
    idx = torch.arange(10)
    neg = sampler.draw(idx, 2000, torch.Generator().manual_seed(0))
    assert neg.shape == (10, 2000)
    assert not (neg == idx[:, None]).any()
    labelled = LABELS >= 0
    for i in range(10):
        drawn = set(neg[i].tolist())
        if labelled[i]:
            # Labelled anchors: exactly the labelled samples of the other classes (all of them, over 2000 draws).
            assert drawn == {j for j in range(10) if labelled[j] and LABELS[j] != LABELS[i]}
        else:
            assert drawn == set(range(10)) - {i}


def test_negatives_fall_back_to_any_other_sample_when_one_class_is_labelled():
    labels = torch.tensor([3, 3, -1, 3])
    neg = NegativeSampler(labels).draw(torch.tensor([0, 2]), 500, torch.Generator().manual_seed(1))
    assert set(neg[0].tolist()) == {1, 2, 3} and set(neg[1].tolist()) == {0, 1, 3}


def test_loss_is_finite_and_gradients_reach_both_heads_and_the_student():
    term = crd()
    s, t, idx = batch(0, [0, 3, 6, 9])
    s.requires_grad_(True)
    loss = term(s, t, idx)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    for p in [*term.embed_s.parameters(), *term.embed_t.parameters(), s]:
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert term.bank_s.shape == term.bank_t.shape == (10, 8)
    assert term.memory_bytes() == 2 * 10 * 8 * 4


def test_k_is_capped_at_n_minus_1():
    assert crd(k=16384).k == 9


def test_bank_momentum_update_by_hand():
    term = crd(momentum=0.5)
    s, t, idx = batch(0, [1, 4, 7])
    before_s, before_t = term.bank_s.clone(), term.bank_t.clone()
    v_s, v_t = term.embed_s(s), term.embed_t(t)
    term(s, t, idx)
    for bank, before, v in ((term.bank_s, before_s, v_s), (term.bank_t, before_t, v_t)):
        expected = 0.5 * before[idx] + 0.5 * v.detach()
        expected = expected / expected.norm(dim=1, keepdim=True)
        torch.testing.assert_close(bank[idx], expected)
        others = torch.ones(10, dtype=torch.bool)
        others[idx] = False
        assert torch.equal(bank[others], before[others])  # rows outside the batch are untouched
        assert torch.allclose(bank[idx].norm(dim=1), torch.ones(3))


def test_z_is_fixed_by_the_first_batch_and_eval_changes_nothing():
    term = crd()
    s, t, idx = batch(0, [0, 1, 2])
    with torch.no_grad():
        term(s, t, idx)
    assert term.z_fixed and (term.z > 0).all()
    z = term.z.clone()
    with torch.no_grad():
        term(*batch(1, [3, 4, 5]))
    assert torch.equal(term.z, z)
    state = copy.deepcopy(term.state_dict())
    term.eval()
    with torch.no_grad():
        term(*batch(2, [6, 7]))
    after = term.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state if isinstance(state[k], torch.Tensor))


def test_z_matches_the_mean_score_times_n():
    term = crd(k=9)  # K = N - 1
    s, t, idx = batch(0, [0, 5])
    with torch.no_grad():
        v_s = term.embed_s(s)
        bank_t = term.bank_t.clone()
        term(s, t, idx)
    # Every anchor sees its own row and 9 negatives; the mean of exp(<v_s, row>/T) over them, x N.
    term.draws = 0  # the generator of the first step again
    negatives = NegativeSampler(LABELS).draw(idx, 9, term._generator(torch.device("cpu")))
    rows = torch.cat([idx[:, None], negatives], 1)
    scores = torch.exp(torch.einsum("bkd,bd->bk", bank_t[rows], v_s) / 0.07)
    torch.testing.assert_close(term.z[0], scores.mean() * 10)


def train_steps(term: CRDLoss, steps: range) -> list[float]:
    opt = torch.optim.SGD(term.parameters(), lr=0.1)
    losses = []
    for i in steps:
        s, t, idx = batch(i, [(3 * i + j) % 10 for j in range(4)])
        loss = term(s, t, idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_state_dict_round_trip_is_bit_identical(tmp_path):
    straight = crd()
    train_steps(straight, range(3))
    path = tmp_path / "crd.pt"
    torch.save(straight.state_dict(), path)
    expected = train_steps(straight, range(3, 6))

    resumed = CRDLoss(6, 4, LABELS, feat_dim=8, nce_k=5)  # another init: everything must come from the file
    resumed.load_state_dict(torch.load(path, weights_only=True))
    got = train_steps(resumed, range(3, 6))
    assert got == expected
    assert torch.equal(resumed.bank_s, straight.bank_s) and torch.equal(resumed.bank_t, straight.bank_t)
    assert torch.equal(resumed.z, straight.z) and resumed.draws == straight.draws == int(resumed.steps) == 6


def test_embeddings_are_unit_length():
    term = crd()
    assert torch.allclose(term.embed_s(torch.randn(5, 6)).norm(dim=1), torch.ones(5))
    assert torch.allclose(term.embed_t(torch.randn(5, 2, 2)).norm(dim=1), torch.ones(5))  # maps are flattened


def _rank_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        term = crd()
        s, t, idx = batch(0, [0, 3, 6, 9, 2])
        share = torch.tensor_split(torch.arange(5), world)[rank]  # uneven shares: 3 and 2 samples
        term(s[share], t[share], idx[share])
        torch.save({"bank_s": term.bank_s, "bank_t": term.bank_t, "z": term.z}, f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_under_torchrun_every_rank_updates_the_banks_with_all_ranks_samples(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_rank_worker, args=(2, port, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for key in ("bank_s", "bank_t", "z"):
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # identical on every rank

    single = crd()  # one process, the whole batch
    s, t, idx = batch(0, [0, 3, 6, 9, 2])
    single(s, t, idx)
    torch.testing.assert_close(ranks[0]["bank_s"], single.bank_s)
    torch.testing.assert_close(ranks[0]["bank_t"], single.bank_t)


def test_a_non_finite_embedding_leaves_its_bank_rows_alone():
    term = crd()
    term(*batch(0, [0, 1]))  # fixes Z
    before = term.bank_s.clone()
    s, t, idx = batch(1, [2, 3])
    s[0] = float("nan")
    term(s, t, idx)
    assert torch.equal(term.bank_s[2], before[2]) and not torch.equal(term.bank_s[3], before[3])
    assert term.bank_s.isfinite().all() and term.bank_t.isfinite().all()
