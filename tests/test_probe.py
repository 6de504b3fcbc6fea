"""The kNN probe (issue 34): DINO's weighted vote, computed without gathering the bank; 2 ranks give what 1
does; the probe in a run (cadence, metrics, resume) and its refusals before any training.

Reference: DINO's `eval_knn.knn_classifier` (facebookresearch/dino): top-k cosine neighbours, each weighing
exp(sim / T) for its class, the class scores summed; here `knn_reference` is that function without its
chunking, and the hand-built case below is worked out on paper."""
import json

import pytest
import torch
from conftest import in_process_config, prelaunched

from pretrain.config import ConfigError, load_config
from pretrain.data.manifest import DataError
from pretrain.training import Trainer
from pretrain.training.probe import distributed_knn, knn_reference, local_topk, merge_topk, vote


def test_the_vote_is_dinos_on_a_hand_built_bank():
    """Bank on the unit circle: class 0 at 0 and 10 degrees, class 1 at 30, 41, 50. A query at 20 degrees,
    k=3: its neighbours are 10 and 30 (10 degrees away) and 0 (20; 41 is 21 away), so class 0 scores
    exp(cos 10/T) + exp(cos 20/T) and class 1 exp(cos 10/T): class 0. A query at 45: 41, 50, 30, all class 1."""
    deg = torch.tensor([0.0, 10.0, 30.0, 41.0, 50.0]).deg2rad()
    bank = torch.stack([deg.cos(), deg.sin()], 1)
    bank_labels = torch.tensor([0, 0, 1, 1, 1])
    q = torch.tensor([[torch.tensor(20.0).deg2rad().cos(), torch.tensor(20.0).deg2rad().sin()],
                      [torch.tensor(45.0).deg2rad().cos(), torch.tensor(45.0).deg2rad().sin()]])
    labels = torch.tensor([0, 1])
    T = 0.07
    # Query 0 (20 deg): neighbours 10, 30 (cos 10 deg) and 0 (cos 20 deg; 41 is at 21 deg).
    c10, c20 = torch.tensor(10.0).deg2rad().cos(), torch.tensor(20.0).deg2rad().cos()
    expect0 = torch.tensor([(c10 / T).exp() + (c20 / T).exp(), (c10 / T).exp()])
    vals, lab = local_topk(q, bank, bank_labels, 3)
    scores = vote(vals, lab, T, 2)
    torch.testing.assert_close(scores[0], expect0, rtol=1e-5, atol=0)
    assert scores.argmax(1).tolist() == [0, 1] == knn_reference(q, labels, bank, bank_labels, 3, T)[:, 0].tolist()
    counts = distributed_knn(q, labels, bank, bank_labels, 3, T, 2, world=1)
    assert counts.tolist() == [2.0, 2.0, 2.0]


def test_merging_bank_shares_gives_the_whole_banks_top_k():
    g = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=1)
    bank_labels = torch.randint(0, 7, (300,), generator=g)
    q = torch.nn.functional.normalize(torch.randn(50, 16, generator=g), dim=1)
    whole_v, whole_l = local_topk(q, bank, bank_labels, 20)
    parts = [local_topk(q, bank[a:b], bank_labels[a:b], 20) for a, b in ((0, 7), (7, 190), (190, 300))]
    v, lab = merge_topk(torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1), 20)
    torch.testing.assert_close(v, whole_v, rtol=0, atol=1e-6)  # matmuls of other shapes: float rounding
    assert torch.equal(lab, whole_l)  # no ties among random floats
    ref = knn_reference(q, torch.zeros(50, dtype=torch.long), bank, bank_labels, 20, 0.07, 7)
    assert torch.equal(vote(v, lab, 0.07, 7).argsort(1, descending=True)[:, :5], ref[:, :5])


TWO_RANKS = r"""
import json, os, torch, torch.distributed as dist
from pretrain.training.probe import distributed_knn
dist.init_process_group("gloo")
r, w = dist.get_rank(), dist.get_world_size()
g = torch.Generator().manual_seed(0)
bank = torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=1)
bank_labels = torch.randint(0, 7, (300,), generator=g)
q = torch.nn.functional.normalize(torch.randn(41, 16, generator=g), dim=1)
ql = torch.randint(0, 7, (41,), generator=g)
b_cut, q_cut = (0, 123, 300), (0, 25, 41)  # uneven shares, as the evaluation loader deals them
mine = slice(b_cut[r], b_cut[r + 1]), slice(q_cut[r], q_cut[r + 1])
counts = distributed_knn(q[mine[1]], ql[mine[1]], bank[mine[0]], bank_labels[mine[0]], 20, 0.07, 7, w)
dist.all_reduce(counts)
one = distributed_knn(q, ql, bank, bank_labels, 20, 0.07, 7, 1)
if r == 0:
    print("COUNTS", json.dumps({"two": counts.tolist(), "one": one.tolist()}))
dist.destroy_process_group()
"""


@pytest.mark.dist
def test_two_ranks_give_the_top_1_of_one_rank_on_the_same_bank_and_queries():
    r = prelaunched(["-c", TWO_RANKS], 2)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(next(x for x in r.stdout.splitlines() if x.startswith("COUNTS"))[7:])
    assert got["two"] == got["one"] and got["one"][2] == 41  # every query counted once


# ------------------------------------------------------------------------------------------ in a run

def probe_config(shards, run_dir, **probe):
    return in_process_config(shards, run_dir, probe={"data": shards, "every_steps": 2, "k": 5, **probe},
                             checkpoint={"every_steps": 2, "keep": 5})


def probes(run_dir):
    return {r["step"]: r for r in map(json.loads, open(run_dir / "metrics.jsonl")) if "probe_knn_top1" in r}


def test_a_run_logs_the_probe_at_its_cadence_and_a_resume_reproduces_the_next_one(shards, tmp_path, capsys):
    """At update 0 (the initial encoder: the curve's baseline), then every 2 updates of 6 (bank: the 112
    training images, queries: the 16 validation ones); a run resumed at update 2 gives the same probes at 4
    and 6 (the same weights, fixed loaders: to 1e-9)."""
    Trainer(probe_config(shards, tmp_path / "a")).fit()
    first = probes(tmp_path / "a")
    assert sorted(first) == [0, 2, 4, 6]
    assert all(r["probe_bank"] == 112 and r["probe_queries"] == 16 and 0 <= r["probe_knn_top1"] <= 100
               for r in first.values())
    assert "kNN probe at update 6: top-1" in capsys.readouterr().out
    plain = in_process_config(shards, tmp_path / "plain", checkpoint={"every_steps": 2, "keep": 5})
    Trainer(plain).fit()  # the probe draws no random number: training is the same without it
    loss = {r["step"]: r["loss"] for r in map(json.loads, open(tmp_path / "a" / "metrics.jsonl")) if "loss" in r}
    assert loss == {r["step"]: r["loss"] for r in map(json.loads, open(tmp_path / "plain" / "metrics.jsonl"))
                    if "loss" in r}
    cfg = probe_config(shards, tmp_path / "a")
    resumed = Trainer(cfg, resume=str(tmp_path / "a" / "checkpoints" / "step00000002"))
    resumed.fit()
    again = probes(tmp_path / "a")
    for step in (4, 6):
        for key in ("probe_knn_top1", "probe_knn_top5"):
            assert again[step][key] == pytest.approx(first[step][key], abs=1e-9), (step, key)


def test_the_cap_per_class_and_a_middle_stage(shards, tmp_path):
    Trainer(probe_config(shards, tmp_path / "c", max_per_class=3, stage=0, every_steps=0)).fit()
    recs = probes(tmp_path / "c")
    assert list(recs) == [0, 6] and recs[6]["probe_bank"] == 8 * 3  # with the final evaluation; 3 of each class


def test_probes_that_cannot_run_are_refused_before_training(shards, unlabelled_shards, tmp_path):
    with pytest.raises(DataError, match=r"probe.data=.*split 'train' is unlabelled .* the kNN probe votes with "
                                        r"labels; point probe.data at labelled shards"):
        Trainer(probe_config(shards, tmp_path / "u", data=unlabelled_shards))
    with pytest.raises(DataError, match=r"probe.k=500 is larger than the bank: .* lists 112 images"):
        Trainer(probe_config(shards, tmp_path / "k", k=500))
    with pytest.raises(DataError, match=r"probe.bank_split='holdout': .*no split 'holdout'"):
        Trainer(probe_config(shards, tmp_path / "s", bank_split="holdout"))
    for d in "uks":  # nothing trained: no tag, no metrics
        assert not list((tmp_path / d).glob("checkpoints/step*")) and not (tmp_path / d / "metrics.jsonl").exists()
    with pytest.raises(ConfigError, match=r"probe.k act\(s\) only with probe.data set"):
        load_config(None, ["probe.k=5"])
    with pytest.raises(ConfigError, match=r"probe.stage must be"):
        load_config(None, ["probe.data=x", "probe.stage=4", "probe.every_steps=5"])
    with pytest.raises(ConfigError, match=r"probe.every_steps=0 probes with each evaluation, but data.val is empty"):
        load_config(None, ["probe.data=x"])


@pytest.mark.dist
def test_the_probe_under_zero3_sees_the_weights_zero0_does(shards, tmp_path):
    """2 DeepSpeed ranks, a Swin with an absolute position embedding (a parameter of the model itself, which
    ZeRO-3 gathers only in the model's forward, not in the probe's forward_pooled): ZeRO-3 and ZeRO-0 give the
    same probe at update 0 (the same initial weights) and after 4 updates within one of the 16 queries."""
    from conftest import base_config, launch, ok
    got = {}
    for stage in (0, 3):
        cfg = base_config(shards, tmp_path / f"z{stage}", model={"ape": True},
                          optim={"zero_stage": stage, "max_steps": 4},
                          probe={"data": shards, "every_steps": 2, "k": 5})
        ok(launch(cfg))
        got[stage] = probes(tmp_path / f"z{stage}")
    assert sorted(got[3]) == sorted(got[0]) == [0, 2, 4]
    assert got[3][0]["probe_knn_top1"] == got[0][0]["probe_knn_top1"]
    assert got[3][0]["probe_knn_top5"] == got[0][0]["probe_knn_top5"]
    assert abs(got[3][4]["probe_knn_top1"] - got[0][4]["probe_knn_top1"]) <= 100 / 16 + 1e-9  # bf16 rounding
