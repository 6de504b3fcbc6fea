"""The training core's parts, in one process (world 1, accelerate on the CPU): the Trainer's public
train_step and fit, the CheckpointManager's exact resume and a crash inside a save, each part's cadence, the
Evaluator alone, Preemption, the train state."""
import json
import os
import signal

import pytest
import torch
from conftest import in_process_config

from pretrain.config import ConfigError
from pretrain.runs import RunExistsError
from pretrain.training import Faults, NonFiniteLossError, Preempted, Trainer, evaluate_weights
from pretrain.training.loop import TrainState
from pretrain.training.preemption import Preemption, act


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
        from pretrain.runs import load_run_weights
        model.load_state_dict(load_run_weights(str(tmp_path / "a" / "checkpoints"), "step00000006"))
    alone = evaluate_weights(again, final_weights)
    assert alone["val_samples"] == 16 and alone["val_top1"] == pytest.approx(result["val_top1"], abs=1e-9)
    assert not (tmp_path / "b").exists()  # evaluation wrote no run dir


class CrashInSave(Faults):
    """A rank that dies inside a save, after its files and before the pointer moves (launched runs exit 17
    there; in one process the exception stands for it)."""

    def in_save(self, step: int) -> None:
        if self.crash_in_save == step:
            raise SystemError(f"crashed inside the save of update {step}")


def test_a_crash_inside_a_save_keeps_the_previous_checkpoint_and_resume_replaces_the_half_tag(shards, tmp_path):
    """Moved here from a 2-rank launch: every step of it is one rank's behaviour. 7 updates an epoch."""
    cfg = in_process_config(shards, tmp_path / "crash", optim={"max_steps": 10})
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        Trainer(cfg, resume="auto")
    with pytest.raises(SystemError, match="update 8"):
        Trainer(cfg, faults=CrashInSave(crash_in_save=8)).fit()
    ckpt = tmp_path / "crash" / "checkpoints"
    assert (ckpt / "step00000008").exists() and not (ckpt / "step00000008" / "COMPLETE").exists()
    assert (ckpt / "latest_complete").read_text() == "step00000007"  # the epoch-end checkpoint
    resumed = Trainer(cfg, resume="auto")
    assert resumed.state.step == 7
    resumed.fit()
    assert (ckpt / "latest_complete").read_text() == "step00000010"
    assert sorted(p.name for p in ckpt.glob("step*")) == ["step00000008", "step00000010"]  # keep=2, 8 redone
    with pytest.raises(RunExistsError, match="already holds a run.*--resume auto"):
        Trainer(cfg)  # a fresh start where a run is: refused, nothing overwritten
    assert (ckpt / "latest_complete").read_text() == "step00000010"


def test_each_part_keeps_its_own_cadence(shards, tmp_path):
    """Metrics every log.every_steps (and the last), evaluation every log.eval_every_steps, checkpoints every
    checkpoint.every_steps and at each epoch's end (7 updates), the last after the final evaluation."""
    cfg = in_process_config(shards, tmp_path / "c", optim={"max_steps": 10}, log={"every_steps": 3,
                            "eval_every_steps": 5, "tensorboard": False, "progress": False},
                            checkpoint={"every_steps": 4, "keep": 10})
    trainer = Trainer(cfg)
    trainer.fit()
    recs = [json.loads(x) for x in open(tmp_path / "c" / "metrics.jsonl")]
    assert [r["step"] for r in recs if "loss" in r] == [3, 6, 9, 10]
    assert [r["step"] for r in recs if "val_top1" in r] == [5, 10]
    assert sorted(p.name for p in (tmp_path / "c" / "checkpoints").glob("step*")) == [
        "step00000004", "step00000007", "step00000008", "step00000010"]
    m, e, c = trainer.metrics, trainer.evaluator, trainer.checkpoints
    assert [s for s in range(1, 11) if m.should_log(s)] == [3, 6, 9, 10]
    assert [s for s in range(1, 11) if e.should_run(s)] == [5, 10] and not e.should_run(7, epoch_end=True)
    e.every_steps = 0  # log.eval_every_steps 0: at each epoch's end only
    assert not e.should_run(5) and e.should_run(7, epoch_end=True)
    assert c.maybe_save(10, last=True) is None and c.maybe_save(9) is None  # neither due nor saved


def test_a_copied_run_dir_is_its_own_run_and_a_lost_pointer_falls_back_to_the_newest_complete_tag(shards, tmp_path):
    """Issue 35: `cp -a runs/ref runs/copy` (its config.json still names runs/ref) is refused for a fresh start
    naming its own checkpoints, and resumes; with `latest_complete` gone, `--resume auto` and export take the
    newest tag marked COMPLETE (written only once every rank finished it)."""
    import shutil

    from pretrain.weights import export_run
    sections = dict(checkpoint={"every_steps": 2, "keep": 5})
    Trainer(in_process_config(shards, tmp_path / "ref", optim={"max_steps": 4}, **sections)).fit()
    shutil.copytree(tmp_path / "ref", tmp_path / "copy", symlinks=True)
    copy = in_process_config(shards, tmp_path / "copy", optim={"max_steps": 6}, **sections)
    with pytest.raises(RunExistsError) as e:
        Trainer(copy)
    said = str(e.value)
    assert f"checkpoints in {tmp_path / 'copy' / 'checkpoints'}, newest step00000004" in said
    assert str(tmp_path / "ref") not in said and f"delete {tmp_path / 'copy'}" in said
    (tmp_path / "copy" / "checkpoints" / "latest_complete").unlink()
    resumed = Trainer(copy, resume="auto")
    assert resumed.state.step == 4
    resumed.fit()
    assert (tmp_path / "copy" / "checkpoints" / "latest_complete").read_text() == "step00000006"
    (tmp_path / "ref" / "checkpoints" / "latest_complete").unlink()
    assert all("step00000004" in p for p in export_run(str(tmp_path / "ref"), layouts=("ours",)))


def test_a_resume_that_would_change_the_schedule_is_refused_mid_epoch_and_said_at_an_epoch_end(shards, tmp_path,
                                                                                              capsys):
    """Issue 35: a mid-epoch resume with optim.global_batch 16 -> 32 used to run on with the lr schedule at
    its end (0.0002 instead of 0.0150). global_batch is refused at any tag (updates count in it); the other
    schedule inputs mid-epoch (step 4 of a 7-update epoch), and are said at the epoch-end tag (step 7)."""
    run = tmp_path / "r"
    Trainer(in_process_config(shards, run, optim={"max_steps": 8}, checkpoint={"keep": 5})).fit()
    tags = run / "checkpoints"
    assert {"step00000004", "step00000007"} <= {p.name for p in tags.glob("step*")}

    def resume(tag: str, **optim) -> Trainer:
        cfg = in_process_config(shards, run, optim={"max_steps": 8, **optim}, checkpoint={"keep": 5})
        return Trainer(cfg, resume=str(tags / tag))
    for tag in ("step00000004", "step00000007"):
        with pytest.raises(ConfigError, match=r"optim.global_batch 16 -> 32: the saved updates, epoch position and "
                                              r"lr schedule count updates of 16 images; resume with --set "
                                              r"optim.global_batch=16"):
            resume(tag, global_batch=32)
    with pytest.raises(ConfigError, match=r"cannot resume mid-epoch with a changed schedule \(optim.epochs 3 -> 6\)"
                                          r".*resume with --set optim.epochs=3, or from a tag saved at an epoch"):
        resume("step00000004", epochs=6)
    capsys.readouterr()
    t = resume("step00000007", epochs=6, max_steps=0)
    assert t.state.step == 7 and t.total_updates == 42  # 6 epochs of 7 updates
    assert "resuming with a changed schedule (optim.epochs 3 -> 6)" in capsys.readouterr().out
    t.close()
    same = resume("step00000004")  # nothing changed: resumes exactly, silently
    assert same.state.step == 4 and same.train_loader.batches_done == 8
    same.close()


def test_a_complete_tag_whose_bytes_changed_is_refused_before_anything_is_loaded(shards, tmp_path, capsys):
    """Issue 35: a corrupt pickle inside a complete tag (same size) failed with a raw UnpicklingError after
    the log said "resumed from". The marker holds each file's CRC-32; the resume names the file and the
    previous complete tag, and loads nothing."""
    from pretrain.runs import DamagedCheckpointError
    run = tmp_path / "rot"
    cfg = in_process_config(shards, run, optim={"max_steps": 8}, checkpoint={"keep": 5})
    Trainer(cfg).fit()
    tag = run / "checkpoints" / "step00000008"
    marker = json.loads((tag / "COMPLETE").read_text())
    assert set(marker["crc32"]) == set(marker["files"]) and len(marker["files"]) >= 3
    victim = max((tag / f for f in marker["files"]), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x40  # one flipped bit: the size is the same
    victim.write_bytes(bytes(data))
    capsys.readouterr()
    with pytest.raises(DamagedCheckpointError, match=rf"{victim.name}: its bytes changed since it was written "
                                                     rf"\(CRC-32 [0-9a-f]{{8}}, written as [0-9a-f]{{8}}\): checkpoint "
                                                     rf".*step00000008 is damaged; resume from another complete tag "
                                                     rf"\(--resume .*step00000007\)"):
        Trainer(cfg, resume="auto")
    assert "resumed from" not in capsys.readouterr().out
    previous = Trainer(cfg, resume=str(tag.parent / "step00000007"))
    assert previous.state.step == 7
    previous.close()
