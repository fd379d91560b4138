"""Configuration dataclasses for the ranking model (DESIGN §2). Plain data, serialisable to JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

ITEM_DIM = 32  # item embeddings are int8[32] throughout (DESIGN §2.1)


@dataclass
class TransActConfig:
    """TransAct (V1): the real-time sequence module, field names as in the reference module."""

    enabled: bool = True
    seq_len: int = 100
    time_window_ms: int = 1000 * 60 * 60
    latest_n_emb: int = 10
    concat_candidate_emb: bool = True
    concat_max_pool: bool = True
    # Action ids fed to the module are (highest set bit of the action mask) + 1, so id 0 means "no
    # action": the reference lookup masks its smallest id, which must therefore be a non-action.
    action_vocab: list[int] = field(default_factory=lambda: list(range(0, 33)))
    action_emb_dim: int = 32
    item_emb_dim: int = ITEM_DIM
    num_layer: int = 2
    nhead: int = 2
    dim_feedforward: int = 32
    dropout: float = 0.1

    @property
    def d_model(self) -> int:
        return self.action_emb_dim + self.item_emb_dim * (2 if self.concat_candidate_emb else 1)

    @property
    def out_dim(self) -> int:
        if not self.enabled:
            return 0
        pooled = self.d_model if self.concat_max_pool else 0
        return pooled + self.d_model * (self.latest_n_emb if self.latest_n_emb > 0 else self.seq_len)


@dataclass
class TransActV2Config:
    """TransAct V2: the lifelong module with nearest-neighbour selection (DESIGN §2.4)."""

    enabled: bool = True
    use_ll: bool = True  # False: the lifelong sequence contributes no tokens (the "rt + NAL" ablation)
    k_ll: int = 96
    r_rt: int = 32
    k_rt: int = 32
    k_imp: int = 32
    nhead: int = 1
    num_layer: int = 2
    dim_feedforward: int = 32
    dropout: float = 0.0
    latest_n: int = 0
    nal_weight: float = 0.01
    nal_dim: int = 32
    nal_negatives: str = "impressions"  # or "in_batch"

    @property
    def d_model(self) -> int:
        return 2 * ITEM_DIM

    @property
    def max_tokens(self) -> int:
        return self.k_ll + self.r_rt + self.k_rt + self.k_imp

    @property
    def out_dim(self) -> int:
        return self.d_model * (1 + self.latest_n) if self.enabled else 0


@dataclass
class ModelConfig:
    """The whole ranking model: features, sequence modules, DCN-v2, MLP and heads."""

    action_names: list[str] = field(default_factory=lambda: ["click", "save", "hide"])
    positive_actions: list[str] = field(default_factory=lambda: ["click", "save"])
    heads: list[str] = field(default_factory=lambda: ["click", "save", "hide"])
    score_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, -1.0])
    loss_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    user_dense_dim: int = 8
    item_dense_dim: int = 8
    num_surfaces: int = 8
    context_emb_dim: int = 8
    cross_layers: int = 2
    mlp_dims: list[int] = field(default_factory=lambda: [256, 128])
    max_ll: int = 16_000
    max_rt: int = 100
    max_imp: int = 100
    quant_scale: float = 0.65
    transact: TransActConfig = field(default_factory=TransActConfig)
    transact_v2: TransActV2Config = field(default_factory=TransActV2Config)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field for an inconsistent configuration."""
        if len(self.action_names) > 32:
            raise ValueError("action_names: at most 32 action kinds fit the int32 bitmask")
        for name in self.positive_actions + self.heads:
            if name not in self.action_names:
                raise ValueError(f"'{name}' is not one of action_names {self.action_names}")
        for key in ("score_weights", "loss_weights"):
            if len(getattr(self, key)) != len(self.heads):
                raise ValueError(f"{key}: needs one weight per head ({len(self.heads)})")
        if self.quant_scale <= 0:
            raise ValueError("quant_scale: must be positive")
        v2 = self.transact_v2
        for key in ("k_ll", "r_rt", "k_rt", "k_imp"):
            if getattr(v2, key) < 1:
                raise ValueError(f"transact_v2.{key}: must be >= 1")
        if v2.r_rt > self.max_rt:
            raise ValueError("transact_v2.r_rt: larger than max_rt")
        if v2.nal_negatives not in ("impressions", "in_batch"):
            raise ValueError("transact_v2.nal_negatives: must be 'impressions' or 'in_batch'")
        if self.transact.d_model % self.transact.nhead:
            raise ValueError("transact.nhead: must divide the token width")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a dict; unknown keys raise ValueError naming them (typos must not pass)."""
        data = dict(data)
        sub = {"transact": TransActConfig, "transact_v2": TransActV2Config}
        kwargs: dict[str, Any] = {}
        known = {f.name for f in dataclasses.fields(cls)}
        for key, value in data.items():
            if key not in known:
                raise ValueError(f"unknown model config key '{key}'")
            if key in sub:
                if not isinstance(value, dict):
                    raise ValueError(f"{key}: expected a table")
                sub_known = {f.name for f in dataclasses.fields(sub[key])}
                bad = sorted(set(value) - sub_known)
                if bad:
                    raise ValueError(f"unknown key '{key}.{bad[0]}'")
                value = sub[key](**value)
            kwargs[key] = value
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))
