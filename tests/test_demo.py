"""The README's first command, as shipped: ``slimssl pretrain`` with no arguments (about 3-4 min on 2 cores).

This is the honest check behind the demo's claim: every sub-network beats itself at random initialisation,
in kNN and in the linear probe, and the trained checkpoint exports to plain models with equal features.
"""

import json

import pytest
import torch

from slimssl import build_supernet, load_exported, load_supernet
from slimssl.cli import main
from slimssl.data.datasets import load_dataset
from slimssl.eval.linear import linear_probe_subnets


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    assert main(["pretrain", "--out", str(out)]) == 0
    return out


def test_demo_beats_random_init_in_knn_for_every_subnet(demo_run):
    rows = json.loads((demo_run / "results.json").read_text())["subnets"]
    assert [r["subnet"] for r in rows] == ["w1p0_d1-1-1-1", "w0p5_d1-1-1-1", "w0p25_d1-1-1-1"]
    for row in rows:
        assert row["knn_top1"] > row["knn_top1_random_init"], row


def test_demo_beats_random_init_in_the_linear_probe(demo_run):
    trained, cfg = load_supernet(demo_run)
    torch.manual_seed(cfg.train.seed)
    untrained = build_supernet(cfg).eval()
    res = cfg.data.resolution
    train, test = load_dataset("digits", "train", resolution=res), load_dataset("digits", "test", resolution=res)
    kw = dict(resolution=res, mean=cfg.data.mean, std=cfg.data.std, epochs=30)
    ours, baseline = linear_probe_subnets(trained, train, test, **kw), linear_probe_subnets(untrained, train, test, **kw)
    for name in ours:
        assert ours[name]["top1"] > baseline[name]["top1"], (name, ours[name], baseline[name])


def test_demo_checkpoint_exports_equal_features(demo_run, tmp_path):
    assert main(["export", str(demo_run), "--all", "--out", str(tmp_path), "--verify"]) == 0
    supernet, cfg = load_supernet(demo_run)
    x = load_dataset("digits", "test", resolution=cfg.data.resolution).images[:16].float() / 255
    for spec in supernet.menu:
        plain = load_exported(tmp_path / spec.name)
        torch.testing.assert_close(plain(x), supernet(x, subnet=spec), atol=1e-5, rtol=1e-5)
