"""Every entry point shares pretrain.cli: a user error (a bad key, a missing file, a bad checkpoint) is one
line `error: ...` naming it, exit 2, no traceback. In-process: main(argv) as the console scripts call it."""
import os


from finetune import run as finetune_run
from pretrain.cli import convert, demo_convert, make_shards, release, train


def one_line_error(capsys, main, argv, needle: str) -> None:
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert "Traceback" not in err


def test_bad_key_missing_file_and_bad_checkpoint_are_one_line_everywhere(capsys, tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(2048))
    missing = str(tmp_path / "nowhere")
    # a bad key
    one_line_error(capsys, train.main, ["--config", "configs/swin_tiny_cpu.json", "--set", "optim.lr=1"],
                   "unknown key(s) optim.lr")
    one_line_error(capsys, finetune_run.main, ["--config", "configs/finetune/swin_tiny_cpu.json", "--set",
                                               "aug.img_size=64"], "aug.img_size is set from model.img_size")
    # a missing file
    one_line_error(capsys, train.main, ["--config", missing + ".json"], "nowhere.json does not exist")
    one_line_error(capsys, finetune_run.main, ["--config", missing + ".json"], "nowhere.json does not exist")
    one_line_error(capsys, make_shards.main, ["write", missing, str(tmp_path / "out")], "nowhere")
    one_line_error(capsys, make_shards.main, ["verify", missing], "nowhere")
    one_line_error(capsys, release.main, [missing], "nowhere: no complete checkpoint")
    one_line_error(capsys, convert.main, [missing, str(tmp_path / "o.safetensors"), "--layout", "timm"], "nowhere")
    # a bad checkpoint
    one_line_error(capsys, convert.main, [str(junk), str(tmp_path / "o.safetensors"), "--layout", "timm"],
                   "not a readable checkpoint")
    tag = tmp_path / "run" / "checkpoints" / "step00000004"
    tag.mkdir(parents=True)
    (tag / "COMPLETE").write_text("{}")
    (tag / "config.json").write_text("{not json")
    (tag.parent / "latest_complete").write_text(tag.name)
    one_line_error(capsys, release.main, [str(tmp_path / "run")], "config.json can't be read")


def test_demo_convert_runs_through_the_library_not_another_entry_point(capsys, tmp_path):
    assert demo_convert.main(["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "timm vs ours at 384/window 12" in out and "OK" in out


def test_a_run_with_keys_this_version_does_not_know_still_exports(capsys, tmp_path):
    """export reads only the checkpoint's model section; unknown keys there are named in a warning."""
    import json

    import torch

    from pretrain.config import load_config
    from pretrain.models import model_from_section
    from pretrain.runs import mark_complete, write_state
    cfg = load_config("configs/swin_tiny_cpu.json", ["backend=accelerate", "optim.zero_stage=null"])
    saved = cfg.to_dict()
    saved["a_future_section"] = {"x": 1}
    saved["model"]["a_future_model_key"] = True
    tag = tmp_path / "run" / "checkpoints" / "step00000002"
    tag.mkdir(parents=True)
    torch.manual_seed(0)
    write_state(str(tag / "model.safetensors"), model_from_section(cfg.model).state_dict())
    mark_complete(str(tag.parent), tag.name, json.dumps(saved))
    assert release.main([str(tmp_path / "run"), "--layouts", "ours", "timm"]) == 0
    io = capsys.readouterr()
    assert "ignoring model key(s) this version does not know: model.a_future_model_key" in io.err
    assert io.out.count("wrote ") == 2 and "Traceback" not in io.err


def test_tests_do_not_import_each_other():
    """Shared fixtures and helpers live in tests/conftest.py: no test module imports another."""
    import ast
    from pathlib import Path
    tests = Path(__file__).resolve().parent
    names = {f.stem for f in tests.glob("test_*.py")}
    for f in sorted(tests.glob("*.py")):
        tree = ast.parse(f.read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not imported & names, f"{f.name} imports {imported & names}"
