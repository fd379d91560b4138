"""Training end to end on synthetic data: the loss falls, held-out AUC is well above chance, the
lifelong module beats rt-only, runs repeat exactly for a seed, and resuming equals a straight run."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from transact.ablation import VARIANTS, deep_merge
from transact.cli import DEMO_MODEL
from transact.data.synthetic import make_synthetic
from transact.train import TrainConfig, train

SMALL = dict(num_users=160, candidates_per_request=8, long_term_actions=(150, 300), max_ll=300)


@pytest.fixture(scope="module")
def data():
    return make_synthetic(seed=3, **SMALL).split_by_time(0.1, 0.25)


@pytest.fixture(scope="module")
def ablation(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation")
    reports = {}
    for name in ("rt", "rt + ll + NAL"):
        cfg = TrainConfig(out=str(out / name.replace(" ", "")), epochs=3, seed=3, lr=3e-3, batch_requests=16,
                          model=deep_merge(DEMO_MODEL, VARIANTS[name]))  # fmt: skip
        reports[name] = train(cfg, progress=False, data=data)[1]
    return reports


def test_loss_falls_and_auc_is_well_above_chance(ablation):
    rep = ablation["rt + ll + NAL"]
    losses = [h["loss"] for h in rep["history"]]
    assert losses[-1] < losses[0] * 0.95, losses
    assert "nal" in rep["history"][0]
    test = rep["test"]
    assert test["click"]["auc"] > 0.6 and test["hide"]["auc"] > 0.65, test
    assert rep["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # device "auto", the default


def test_lifelong_module_beats_rt_only(ablation):
    full, rt = ablation["rt + ll + NAL"]["test"], ablation["rt"]["test"]
    # The planted long-term interests and dislikes live in the lifelong sequence.
    assert full["click"]["auc"] > rt["click"]["auc"] + 0.03, (full, rt)
    assert full["hide"]["auc"] > rt["hide"]["auc"] + 0.1, (full, rt)


def tiny(out, epochs):
    return TrainConfig(out=str(out), epochs=epochs, seed=7, batch_requests=16, model=DEMO_MODEL)


def test_same_seed_same_weights_and_resume_equals_straight_run(tmp_path):
    data = make_synthetic(seed=1, num_users=24, candidates_per_request=4, long_term_actions=(40, 60), max_ll=80)
    parts = data.split_by_time(0.1, 0.2)
    train(tiny(tmp_path / "a", 2), progress=False, data=parts)
    train(tiny(tmp_path / "b", 2), progress=False, data=parts)
    train(tiny(tmp_path / "c", 1), progress=False, data=parts)
    train(tiny(tmp_path / "c", 2), resume=True, progress=False, data=parts)
    a, b, c = (load_file(tmp_path / x / "model.safetensors") for x in "abc")
    for name in a:
        assert torch.equal(a[name], b[name]), name
        assert torch.allclose(a[name], c[name], atol=1e-6), name


def test_bad_train_config_is_refused():
    with pytest.raises(ValueError, match="epochs"):
        dataclasses.replace(TrainConfig(), epochs=0).validate()
    with pytest.raises(ValueError, match="data"):
        dataclasses.replace(TrainConfig(), data="imagenet").validate()


def test_eval_ablation_json_prints_json_alone(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`transact eval --ablation --json` keeps stdout for the JSON (a pipe into jq must parse); the plot's
    path goes to stderr. The training itself is stood in for: this is about the command's output."""
    import json

    from click.testing import CliRunner

    import transact.ablation
    from transact.cli import cli

    results = {"rt": {"test": {"click": {"auc": 0.75, "hit@3": 0.9}}, "seconds": 1.0}}
    monkeypatch.setattr(transact.ablation, "run_ablation", lambda cfg, out: {"results": results, "table": "| t |"})
    args = ["eval", "--ablation", "--data", "synthetic", "--out", str(tmp_path)]
    r = CliRunner().invoke(cli, [*args, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == results
    assert f"plot: {tmp_path / 'ablation.png'}" in r.stderr
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0 and r.stdout.splitlines() == ["| t |", f"plot: {tmp_path / 'ablation.png'}"]


def test_device_names_resolve_or_are_refused() -> None:
    from transact.errors import TransactError
    from transact.train import resolve_device

    for bad in ("tpu", "gpu", "cuda:x", ""):
        with pytest.raises(ValueError, match="device"):
            dataclasses.replace(TrainConfig(), device=bad).validate()
        with pytest.raises(TransactError, match="field 'device'"):
            resolve_device(bad)
    for good in ("auto", "cpu", "cuda", "cuda:1"):
        dataclasses.replace(TrainConfig(), device=good).validate()
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")

