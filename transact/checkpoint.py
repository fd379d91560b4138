"""Checkpoints: a folder with safetensors weights and JSON, never pickle.

    CHECKPOINT/
      model.safetensors   model weights (fp32); metadata: format, config JSON, quant scale
      config.json         {"model": ModelConfig, "train": TrainConfig or null}
      state.json          step, epoch, metrics, RNG seeds (what resuming needs besides tensors)
      optimizer.safetensors   optimiser moments (flat names), present for resumable runs
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .errors import TransactError, replace_folder
from .model import RankingModel

FORMAT = "transact-checkpoint/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
STATE = "state.json"
OPTIMIZER = "optimizer.safetensors"


def state_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous fp32 (or integer) copies of every tensor of the state dict."""
    return {k: v.detach().contiguous().cpu().clone() for k, v in model.state_dict().items()}


def save_checkpoint(
    path: str | os.PathLike,
    model: RankingModel,
    train_config: dict[str, Any] | None = None,
    state: dict[str, Any] | None = None,
    optimizer: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint folder atomically (a temporary folder renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        meta = {"format": FORMAT, "config": model.config.to_json(), "quant_scale": str(model.config.quant_scale)}
        save_file(state_tensors(model), tmp / WEIGHTS, metadata=meta)
        (tmp / CONFIG).write_text(json.dumps({"model": model.config.to_dict(), "train": train_config}, indent=2))
        (tmp / STATE).write_text(json.dumps(state or {}, indent=2))
        if optimizer:
            save_file({k: v.contiguous().cpu() for k, v in optimizer.items()}, tmp / OPTIMIZER)
        replace_folder(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_config(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any] | None]:
    path = Path(path)
    cfg_file = path / CONFIG
    if not cfg_file.is_file():
        raise TransactError("not a TransAct checkpoint (config.json missing)", cfg_file)
    try:
        data = json.loads(cfg_file.read_text())
        return ModelConfig.from_dict(data["model"]), data.get("train")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise TransactError(f"bad model config: {e}", cfg_file) from None


def load_checkpoint(path: str | os.PathLike, map_location: str = "cpu") -> tuple[RankingModel, dict[str, Any]]:
    """Load a checkpoint folder; errors name the file and the reason."""
    path = Path(path)
    if not path.is_dir():
        raise TransactError("checkpoint folder not found", path)
    config, train = read_config(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise TransactError("weights missing", weights)
    try:
        tensors = load_file(weights, device=map_location)
    except (SafetensorError, OSError, ValueError) as e:
        raise TransactError(f"unreadable safetensors file ({e})", weights) from None
    model = RankingModel(config)
    missing, unexpected = set(model.state_dict()) - set(tensors), set(tensors) - set(model.state_dict())
    if missing or unexpected:
        name = sorted(missing or unexpected)[0]
        why = "missing from the weights" if missing else "not in the model"
        raise TransactError(f"weights do not match the config: '{name}' {why}", weights)
    for name, value in model.state_dict().items():
        if tuple(tensors[name].shape) != tuple(value.shape):
            raise TransactError(
                f"weights do not match the config: '{name}' has shape {list(tensors[name].shape)}, "
                f"config needs {list(value.shape)}", weights,
            )  # fmt: skip
    model.load_state_dict(tensors, strict=True)
    state_file = path / STATE
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    state["train_config"] = train
    return model, state


def load_optimizer_state(path: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    f = Path(path) / OPTIMIZER
    return load_file(f) if f.is_file() else None
