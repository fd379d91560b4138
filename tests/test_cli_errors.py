"""Bad input at the command line: one line naming the field and the file, non-zero exit, no traceback,
nothing half-written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def transact(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "transact.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def one_line_error(res: subprocess.CompletedProcess) -> str:
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    lines = [x for x in res.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1, res.stderr
    return lines[0]


@pytest.mark.parametrize(
    "text,needle",
    [
        ("epochs = [1, 2\n", "malformed TOML"),
        ("epochz = 3\n", "epochz"),
        ("epochs = 0\n", "epochs"),
        ('data = "imagenet"\n', "data"),
        ("[model]\nheads = ['click', 'purchase']\n", "purchase"),
        ("[model.transact_v2]\nk_lll = 3\n", "k_lll"),
    ],
)
def test_bad_config_file(tmp_path: Path, text: str, needle: str) -> None:
    cfg = tmp_path / "train.toml"
    cfg.write_text(text)
    line = one_line_error(transact("train", "--config", str(cfg), "--out", str(tmp_path / "ckpt"), cwd=tmp_path))
    assert needle in line and "train.toml" in line
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize(
    "csv,needle",
    [
        ("", "empty"),
        ("user,item,action,timestamp,colour\n1,2,click,1000,red\n", "colour"),
        ("user,item,action\n1,2,click\n", "timestamp"),
        ("user,item,action,timestamp\n1,2,click,99999999999999\n", "timestamp"),
        ("user,item,action,timestamp\n1,2,purchase,1000\n", "action"),
        ("user,item,action,timestamp\n1,,click,1000\n", "item"),
    ],
)
def test_bad_action_log(tmp_path: Path, csv: str, needle: str) -> None:
    log = tmp_path / "actions.csv"
    log.write_text(csv)
    out = tmp_path / "ckpt"
    line = one_line_error(transact("train", "--data", "logs", "--logs", str(log), "--out", str(out), cwd=tmp_path))
    assert needle in line and "actions.csv" in line, line
    assert not out.exists()


def test_missing_checkpoint_for_eval(tmp_path: Path) -> None:
    line = one_line_error(transact("eval", str(tmp_path / "nope"), cwd=tmp_path))
    assert "nope" in line


@pytest.mark.parametrize("device, needle", [("tpu", "must be auto, cpu, cuda or cuda:N, got 'tpu'"),
                                            ("cuda:x", "got 'cuda:x'")])  # fmt: skip
def test_bad_training_device(tmp_path: Path, device: str, needle: str) -> None:
    out = tmp_path / "ckpt"
    line = one_line_error(transact("train", "--users", "8", "--device", device, "--out", str(out), cwd=tmp_path))
    assert "device" in line and needle in line, line
    assert not out.exists()


def test_training_on_a_gpu_this_machine_lacks(tmp_path: Path) -> None:
    """A CPU build of PyTorch (CI) asked for CUDA: refused before any data is read; on a GPU machine, a device
    index past its GPUs."""
    import torch

    device = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    out = tmp_path / "ckpt"
    line = one_line_error(transact("train", "--users", "8", "--device", device, "--out", str(out), cwd=tmp_path))
    assert "field 'device'" in line and ("GPU(s)" in line if torch.cuda.is_available() else "CUDA" in line), line
    assert not out.exists()
