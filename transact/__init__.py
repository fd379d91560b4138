"""TransAct and TransAct V2 ranking models: model, data, training and evaluation."""

from .batch import Batch, BatchError, Seq
from .config import ModelConfig, TransActConfig, TransActV2Config
from .model import RankingModel, TransAct, TransActV2

__all__ = [
    "Batch", "BatchError", "Seq", "ModelConfig", "TransActConfig", "TransActV2Config",
    "RankingModel", "TransAct", "TransActV2",
]  # fmt: skip
__version__ = "0.1.0"
