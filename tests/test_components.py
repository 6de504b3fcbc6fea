"""The training core's parts, in one process (world 1, accelerate on the CPU): the Trainer's public
train_step and fit, the CheckpointManager's exact resume, the Evaluator alone, Preemption, the train state."""
import json
import os
import signal
from pathlib import Path

import pytest
import torch

from pretrain.config import load_config
from pretrain.training import Evaluator, Faults, NonFiniteLossError, Preempted, Trainer, evaluate_weights
from pretrain.training.loop import TrainState
from pretrain.training.preemption import Preemption, act

from conftest import base_config


def in_process_config(shards: str, run_dir: Path, **sections):
    sections.setdefault("optim", {})
    sections["optim"] = {"max_steps": 6, "zero_stage": None, "precision": "fp32", **sections["optim"]}
    cfg = base_config(shards, run_dir, **sections)
    return load_config(cfg["_path"], ["backend=accelerate", f"data.val={shards}", "data.workers=0"])


def test_preemption_installs_and_restores_its_handlers_and_acts_on_a_signal():
    before = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)
    with Preemption() as p:
        assert signal.getsignal(signal.SIGUSR1) not in before
        os.kill(os.getpid(), signal.SIGUSR1)
        assert p.code == Preemption.USR1
        os.kill(os.getpid(), signal.SIGTERM)
        assert p.code == Preemption.TERM  # the stronger one wins
    assert (signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)) == before
    saved = []
    with pytest.raises(Preempted) as e:  # USR1 outside Slurm: save, no requeue, exit 0
        act(Preemption.USR1, 7, lambda: saved.append(7), 0.0, 20.0, 0, lambda m: None)
    assert e.value.code == 0 and saved == [7]
    with pytest.raises(Preempted) as e:  # TERM after a slow save: no time to save again
        act(Preemption.TERM, 8, lambda: saved.append(8), 30.0, 20.0, 0, lambda m: None)
    assert e.value.code == 143 and saved == [7]


def test_the_train_state_stops_the_run_after_too_many_skipped_updates_in_a_row():
    s, said = TrainState(step=3), []
    s.count_update(True, 2, said.append)
    s.count_update(False, 2, said.append)
    s.count_update(True, 2, said.append)
    with pytest.raises(NonFiniteLossError, match=r"2 non-finite updates in a row \(optim.max_nonfinite=2\)"):
        s.count_update(True, 2, said.append)
    assert s.nonfinite_total == 3 and len(said) == 3


def test_train_step_fit_resume_and_the_evaluator_in_one_process(shards, tmp_path):
    """One run of 6 updates; a second one resumed at update 2 gives the same losses for updates 3-6 (to
    1e-6: the same data position, RNG streams, weights and optimizer); the Evaluator built alone on the final
    weights reports what the Trainer did."""
    cfg = in_process_config(shards, tmp_path / "a", checkpoint={"every_steps": 2, "keep": 5})
    first = Trainer(cfg, faults=Faults(nan=[(5, 0)]))
    result = first.fit()
    losses = {r["step"]: r["loss"] for r in map(json.loads, open(tmp_path / "a" / "metrics.jsonl")) if "loss" in r}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and first.state.nonfinite_total == 1  # update 5 was skipped
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # fit() restored the handlers
    again = in_process_config(shards, tmp_path / "b", checkpoint={"every_steps": 2, "keep": 5})
    again.run_dir = str(tmp_path / "a")
    resumed = Trainer(again, resume=str(tmp_path / "a" / "checkpoints" / "step00000002"),
                      faults=Faults(nan=[(5, 0)]))
    assert resumed.state.step == 2 and resumed.train_loader.batches_done == 4  # 2 micro-batches per update
    resumed.fit()
    after = {r["step"]: r["loss"] for r in map(json.loads, open(tmp_path / "a" / "metrics.jsonl")) if "loss" in r}
    for step in (3, 4, 5, 6):
        assert after[step] == pytest.approx(losses[step], abs=1e-6), (step, after[step], losses[step])

    def final_weights(model: torch.nn.Module) -> None:
        from pretrain.training.checkpointing import load_run_weights
        model.load_state_dict(load_run_weights(str(tmp_path / "a" / "checkpoints"), "step00000006"))
    alone = evaluate_weights(again, final_weights)
    assert alone["val_samples"] == 16 and alone["val_top1"] == pytest.approx(result["val_top1"], abs=1e-9)
    assert issubclass(Evaluator, object) and not (tmp_path / "b").exists()  # evaluation wrote no run dir
