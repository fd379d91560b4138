"""Training on a GPU (`transact train --device cuda`): one training step on the GPU gives the loss and the
gradients of the same step on the CPU, and a short run learns and leaves a checkpoint that the CPU loads and
scores as the GPU did.

    pytest -m gpu tests/gpu/test_train_gpu.py
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from transact.ablation import deep_merge  # noqa: E402
from transact.batch import validate_batch  # noqa: E402
from transact.checkpoint import load_checkpoint  # noqa: E402
from transact.cli import DEMO_MODEL  # noqa: E402
from transact.data.synthetic import make_synthetic  # noqa: E402
from transact.losses import total_loss  # noqa: E402
from transact.model import RankingModel  # noqa: E402
from transact.train import TrainConfig, evaluate, model_config_for, train  # noqa: E402


@pytest.fixture(scope="module")
def parts():
    data = make_synthetic(seed=3, num_users=160, candidates_per_request=8, long_term_actions=(150, 300), max_ll=300)
    return data.split_by_time(0.1, 0.25)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double().cpu() - want.double()).norm() / want.double().norm().clamp_min(1e-30))


def test_one_training_step_on_the_gpu_equals_the_cpu(parts) -> None:
    """Same weights, same batch, train mode with the random parts off (dropout 0, no time window): the
    loss (BCE + Next Action Loss) and every parameter's gradient agree with the CPU's in float32."""
    train_ds = parts[0]
    overrides = deep_merge(DEMO_MODEL, {"transact": {"time_window_ms": 0, "dropout": 0.0}})
    cfg = model_config_for(TrainConfig(model=overrides), train_ds)
    torch.manual_seed(0)
    cpu = RankingModel(cfg).train()
    gpu = RankingModel(cfg).train()
    gpu.load_state_dict(cpu.state_dict())
    gpu.cuda()
    batch = next(iter(train_ds.batches(16, shuffle=True, seed=3)))
    validate_batch(batch.to("cuda"), cfg)  # a batch on the GPU is checked where it lies
    results = {}
    for name, model, b in (("cpu", cpu, batch), ("gpu", gpu, batch.to("cuda"))):
        loss, parts_ = total_loss(model, b, model.forward_with_aux(b))
        loss.backward()
        results[name] = (loss.detach(), parts_, {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    (l_cpu, p_cpu, g_cpu), (l_gpu, p_gpu, g_gpu) = results["cpu"], results["gpu"]
    assert p_cpu["nal"] > 0 and abs(p_gpu["nal"] - p_cpu["nal"]) <= 1e-5 * p_cpu["nal"]  # NAL took part
    assert abs(float(l_gpu) - float(l_cpu)) <= 1e-5 * abs(float(l_cpu))
    assert set(g_cpu) == set(g_gpu) and len(g_cpu) > 20
    worst = max((rel_err(g_gpu[n], g_cpu[n]), n) for n in g_cpu if g_cpu[n].abs().max() > 0)
    assert worst[0] < 1e-4, worst


def test_a_short_gpu_run_learns_and_its_checkpoint_scores_the_same_on_the_cpu(parts, tmp_path) -> None:
    cfg = TrainConfig(out=str(tmp_path / "gpu"), epochs=3, seed=3, lr=3e-3, batch_requests=16, device="cuda",
                      model=DEMO_MODEL)  # fmt: skip
    model, report = train(cfg, progress=False, data=parts)
    assert next(model.parameters()).device.type == "cuda" and report["device"] == "cuda"
    losses = [h["loss"] for h in report["history"]]
    assert losses[-1] < losses[0] * 0.95, losses
    # Well above chance (the test split's ~1,000 candidates put a chance AUC within ~0.02 of 0.5); the same run on
    # the CPU reads 0.63 / 0.71, and the GPU draws other dropout masks.
    assert report["test"]["click"]["auc"] > 0.58 and report["test"]["hide"]["auc"] > 0.62, report["test"]
    on_cpu, state = load_checkpoint(tmp_path / "gpu")
    assert state["epoch"] == 3
    again = evaluate(on_cpu, parts[2])
    for head, m in report["test"].items():
        assert abs(again[head]["auc"] - m["auc"]) < 1e-3 and abs(again[head]["hit@3"] - m["hit@3"]) < 1e-3, head
    # Resuming on the GPU from the CPU-readable checkpoint continues (moments restored to the weights' device).
    more = dataclasses.replace(cfg, epochs=4)
    resumed, report2 = train(more, resume=True, progress=False, data=parts)
    assert len(report2["history"]) == 4 and np.isfinite(report2["history"][-1]["loss"])
