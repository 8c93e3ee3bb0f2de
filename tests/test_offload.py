"""Engram tables outside the model's device (memory.OffloadedTable): sample.py --engram_offload=host|disk
gives exactly the resident model's tokens, the disk table file is checked against its checkpoint, and
train.py --engram_offload=host (rows gathered a step ahead by a background thread, SparseAdam on the
host rows) trains to the same losses as resident tables."""
import copy
import json
import os
import shutil
from collections import namedtuple

import pytest
import torch

import memory
import harness
import sample
import train
from model import GPT
from test_model import VOCAB, make_model, tiny_config
from test_train import TINY, data_flags, read_log


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    """A tiny trained run (resident tables) to sample from."""
    out = tmp_path_factory.mktemp("offload") / "run"
    train.main(TINY + data_flags(prepared) + ["--max_iters=8", "--eval_interval=8", f"--out_dir={out}"])
    return out


def sample_text(capsys, out_dir, *flags):
    sample.main([f"--out_dir={out_dir}", "--num_samples=2", "--max_new_tokens=24", "--device=cpu", *flags])
    return capsys.readouterr().out


@pytest.mark.parametrize("temperature", ["0", "0.8"])
def test_offloaded_tables_sample_the_resident_tokens(trained, tmp_path, capsys, temperature):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    resident = sample_text(capsys, run, f"--temperature={temperature}")
    host = sample_text(capsys, run, f"--temperature={temperature}", "--engram_offload=host")
    disk = sample_text(capsys, run, f"--temperature={temperature}", "--engram_offload=disk")  # writes the file
    again = sample_text(capsys, run, f"--temperature={temperature}", "--engram_offload=disk")  # reads it
    assert resident.count("--- sample") == 2 and resident == host == disk == again
    manifest = json.loads((run / memory.MANIFEST).read_text())
    assert os.path.getsize(run / memory.TABLE_FILE) == manifest["bytes"] == sum(
        t["rows"] * t["dim"] * 4 for t in manifest["tables"])


def test_a_disk_model_holds_no_table_in_memory(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    model, _ = harness.load_run(str(run), "cpu", "disk")
    resident, _ = harness.load_run(str(run), "cpu")
    tables = memory.offloaded_tables(model)
    assert tables and all(t.where == "disk" and isinstance(t.file, memory.np.memmap) for t in tables)
    assert not any(p.numel() == t.n_rows * t.file.shape[1] for p in model.parameters() for t in tables)
    assert model.param_counts() == resident.param_counts()  # the tables still count, wherever they live


def test_a_bad_table_file_is_a_one_line_error_naming_it(trained, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    sample_text(capsys, run, "--engram_offload=disk")
    table_file = run / memory.TABLE_FILE
    good = table_file.read_bytes()

    def error_of(*flags):
        with pytest.raises(SystemExit) as e:
            sample_text(capsys, run, *flags)
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert e.value.code == 2 and len(errors) == 1 and "Traceback" not in err, err
        return errors[0]

    table_file.write_bytes(good[:len(good) // 2])
    err = error_of("--engram_offload=disk")
    assert "cut short" in err and str(table_file) in err and "delete" in err
    table_file.write_bytes(bytes(len(good)))  # the right size, other rows: as if from another checkpoint
    assert "another checkpoint" in error_of("--engram_offload=disk")
    table_file.unlink()
    (run / memory.MANIFEST).unlink()
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(memory.shutil, "disk_usage", lambda path: Usage(10, 10, 0))
    assert "GiB free" in error_of("--engram_offload=disk")
    assert not table_file.exists() and (run / "ckpt.pt").exists()  # nothing half-written, nothing lost


def test_offload_of_a_model_without_engram_is_an_error(prepared, tmp_path, capsys):
    out = tmp_path / "plain"
    train.main(TINY + data_flags(prepared) + ["--max_iters=2", "--eval_interval=2", "--engram=off", f"--out_dir={out}"])
    with pytest.raises(SystemExit) as e:
        sample_text(capsys, out, "--engram_offload=host")
    assert e.value.code == 2 and "has no Engram table" in capsys.readouterr().err


def test_host_tables_train_to_the_resident_losses_and_their_checkpoint_resumes_resident(prepared, tmp_path):
    """12 steps with resident tables against 6 with host tables (a prefetch thread, SparseAdam on the host
    rows), resumed with resident tables for the other 6: every logged loss the same to the last digit."""
    common = TINY + data_flags(prepared) + ["--eval_interval=3", "--lr_decay_iters=12"]
    train.main(common + ["--max_iters=12", f"--out_dir={tmp_path / 'resident'}"])
    train.main(common + ["--max_iters=6", "--engram_offload=host", f"--out_dir={tmp_path / 'host'}"])
    train.main([f"--out_dir={tmp_path / 'host'}", "--resume", "--max_iters=12", "--engram_offload="])
    resident, host = read_log(tmp_path / "resident"), read_log(tmp_path / "host")
    keys = ("iter", "val_loss", "train_loss_mean", "train_loss_last")
    assert [[r[k] for k in keys] for r in host] == [[r[k] for k in keys] for r in resident]


def test_a_prefetch_that_a_step_overtook_reads_the_changed_rows_again():
    """The batch after this one is prefetched before this one's optimizer step, which changes rows both
    batches look up: the lookup must see the new values, as a resident table would."""
    cfg = tiny_config(engram_sparse=True)
    resident = make_model(cfg).train()
    host = copy.deepcopy(resident)
    memory.offload_tables(host, "host", "cpu")
    torch.manual_seed(0)
    batch = torch.randint(0, VOCAB, (4, 17))
    losses = {}
    for name, model in (("resident", resident), ("host", host)):
        opts = model.configure_optimizers(1e-2, 0.1, (0.9, 0.95))
        losses[name] = []
        for _ in range(3):  # the same batch each step: every row it reads was just changed
            _, loss = model(batch[:, :-1], batch[:, 1:])
            memory.prefetch(model, batch[:, :-1])  # the next step's rows, gathered before this step updates them
            loss.backward()
            for opt in opts:
                opt.step()
            for table in memory.offloaded_tables(model):
                table.mark_updated()
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            losses[name].append(loss.item())
    assert losses["host"] == losses["resident"] and losses["host"][2] != losses["host"][0]
    table = host.blocks[1].engram.table
    assert table.weight.device.type == "cpu" and memory.prefetch_stats(host)["fetch_s"] > 0
    assert torch.equal(table.weight, resident.blocks[1].engram.table.weight)


def test_host_tables_stay_in_host_memory_when_the_model_moves():
    model = make_model(tiny_config(engram_sparse=True))
    memory.offload_tables(model, "host", "cpu")
    table = model.blocks[1].engram.table
    model.to(torch.float64)  # as .to("cuda") would: the rest converts, the host rows do not
    assert table.weight.dtype == torch.float32 and model.blocks[1].engram.value_proj.weight.dtype == torch.float64
    assert isinstance(GPT(tiny_config(), table_device="meta").blocks[1].engram.table.weight.device, torch.device)
