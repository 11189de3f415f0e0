"""What only a GPU can check: no host synchronisation in the training step, bf16 autocast, and compiled
steps with CUDA graphs. Skipped without CUDA (CI has none); run with ``python -m pytest tests/test_cuda.py``
on a GPU machine."""

from __future__ import annotations

import pytest
import torch

from slimssl.config import config_from_dict
from slimssl.train.loop import Trainer

from test_pretrain import tiny

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _cuda_cfg(method: str, **train):
    return config_from_dict(tiny(method, train={"device": "cuda", "precision": "bf16", "batch_size": 16,
                                                **train}))


SETUPS = {
    "byol": ("byol", {}),
    "mocov2": ("mocov2", {}),
    "mocov3": ("mocov3", {}),
    # BatchNorm over groups of 4 and shuffle-BN (the key encoder's order is drawn on the host each step)
    "mocov2-grouped-shuffle": ("mocov2", {"model": {"bn_group_size": 4}, "method": {"shuffle_bn": True}}),
    # decoded images kept in host memory (too large for the GPU): each batch is copied through pinned memory
    "byol-images-on-host": ("byol", {}),
    # gradient accumulation: two parts per step, the losses averaged on the device
    "byol-micro-batches": ("byol", {"train": {"micro_batches": 2}}),
}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_training_step_never_synchronises_with_the_host(tmp_path, monkeypatch, setup):
    from slimssl.data import views

    method, changes = SETUPS[setup]
    if setup.endswith("on-host"):
        monkeypatch.setattr(views, "GPU_SHARE", 0.0)
    base = tiny(method, train={"device": "cuda", "precision": "bf16", "batch_size": 16})
    cfg = config_from_dict({**base, **{k: {**base[k], **v} for k, v in changes.items()}})
    trainer = Trainer(cfg, tmp_path)
    assert trainer.view_source.images.is_cuda != setup.endswith("on-host")
    trainer.train_step(0)  # first step: lazy initialisation (optimizer state, cuDNN plans) may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in (1, 2, 3):  # 32 images in batches of 16: steps 2 starts an epoch (a new order)
            trainer.train_step(step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("method", ["byol", "mocov3"])
def test_bf16_steps_keep_fp32_weights_and_finite_losses(tmp_path, method):
    trainer = Trainer(_cuda_cfg(method), tmp_path)
    for step in range(3):
        losses = trainer.train_step(step).losses
    assert all(torch.isfinite(v).all() for v in losses.values())
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_steps_follow_eager_steps(tmp_path, mode):
    def run(compile_mode):
        torch._dynamo.reset()
        cfg = config_from_dict(tiny("byol", widths=[1.0, 0.5], train={
            "device": "cuda", "precision": "fp32", "batch_size": 16, "compile": compile_mode}))
        trainer = Trainer(cfg, tmp_path / compile_mode)
        losses = [trainer.train_step(step).losses for step in range(3)]
        return [{k: float(v) for k, v in step.items()} for step in losses]

    from torch._dynamo.utils import counters

    eager = run("off")
    skips = counters["inductor"]["cudagraph_skips"]
    compiled = run(mode)
    for a, b in zip(eager, compiled):  # inductor's kernels round differently: close, not equal
        assert a.keys() == b.keys()
        assert all(abs(a[k] - b[k]) < 1e-2 * max(1.0, abs(a[k])) for k in a), (a, b)
    # reduce-overhead is there for its CUDA graphs: a forward that inductor could not capture (the BatchNorm
    # buffers it updates in place, say) would run without them, as slowly as default's, and only log it
    assert counters["inductor"]["cudagraph_skips"] == skips, \
        "inductor skipped CUDA graphs for a compiled forward (TORCH_LOGS=perf_hints says why)"


@pytest.mark.parametrize("distill", [False, True])
def test_linear_probe_step_never_synchronises_with_the_host(distill):
    from slimssl.eval.linear import make_heads, probe_step

    dims = {"w1p0_d1-1-1-1": 32, "w0p5_d1-1-1-1": 16}
    heads = make_heads(dims, 10, seed=0).cuda()
    optimizer = torch.optim.SGD(heads.parameters(), lr=0.1, momentum=0.9)
    bank = {n: torch.randn(64, d, device="cuda") for n, d in dims.items()}
    labels = torch.randint(0, 10, (64,), device="cuda")
    idx = torch.randperm(64)[:16].cuda()
    probe_step(heads, optimizer, {n: f[idx] for n, f in bank.items()}, labels[idx], distill=distill)  # lazy state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        running = torch.zeros((), device="cuda")
        for _ in range(2):
            running += probe_step(heads, optimizer, {n: f[idx] for n, f in bank.items()}, labels[idx], distill=distill)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(running).item()


def test_a_knn_bank_kept_in_host_memory_scores_as_one_kept_on_the_gpu(monkeypatch):
    from slimssl.data.datasets import load_dataset
    from slimssl.eval import knn
    from slimssl.models.build import build_supernet

    cfg = _cuda_cfg("byol")
    supernet = build_supernet(cfg).cuda().eval()
    train, test = (load_dataset("fake", split, resolution=8, fake_size=64) for split in ("train", "test"))
    kw = dict(k=5, temperature=0.1, resolution=8, mean=cfg.data.mean, std=cfg.data.std, device="cuda")
    on_gpu = knn.knn_eval_subnets(supernet, train, test, **kw)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1024, 1024))  # "no room": the host's
    assert knn.bank_storage([64], 64, "cuda") == torch.device("cpu")
    assert knn.knn_eval_subnets(supernet, train, test, **kw) == on_gpu


def test_a_linear_probe_with_its_features_in_host_memory_learns_as_one_with_them_on_the_gpu(monkeypatch):
    from slimssl.data.datasets import load_dataset
    from slimssl.eval.linear import linear_probe_subnets
    from slimssl.models.build import build_supernet

    cfg = _cuda_cfg("byol")
    supernet = build_supernet(cfg).cuda().eval()
    train, test = (load_dataset("fake", split, resolution=8, fake_size=64) for split in ("train", "test"))
    kw = dict(resolution=8, mean=cfg.data.mean, std=cfg.data.std, epochs=2, batch_size=16, device="cuda")
    on_gpu = linear_probe_subnets(supernet, train, test, **kw)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1024, 1024))  # "no room": the host's
    assert linear_probe_subnets(supernet, train, test, **kw) == on_gpu  # statistics summed on the GPU for both


def test_a_pt2_program_moved_to_the_gpu_computes_the_subnet(tmp_path):
    """model.pt2 is saved on the CPU; a deployment moves the loaded program to its GPU with .to("cuda")."""
    from slimssl import export_subnet
    from slimssl.models.build import build_supernet

    supernet = build_supernet(_cuda_cfg("byol")).eval()
    spec = supernet.menu[-1]
    folder = export_subnet(supernet, spec, tmp_path, fmt="pt2", resolution=16)
    program = torch.export.load(str(folder / "model.pt2")).module().to("cuda")
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(program(x.cuda()).cpu(), supernet(x, subnet=spec), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-3), ("bf16", 5e-2)])
def test_views_in_one_batch_train_as_one_view_at_a_time_on_the_gpu(tmp_path, precision, tolerance):
    """channels_last and autocast as a GPU run has them: the stacked views keep the layout, and the losses of
    three steps follow those of the views run one at a time (bf16 rounds the summed gradients once, not twice)."""
    from test_views_in_one_batch import OneViewAtATime

    cfg = config_from_dict(tiny("byol", train={"device": "cuda", "precision": precision, "batch_size": 16}))
    batched, alone = Trainer(cfg, tmp_path / "batched"), OneViewAtATime(cfg, tmp_path / "alone")
    layouts = []
    forward = batched.online_forward
    batched.online_forward = lambda x: layouts.append(x.is_contiguous(memory_format=torch.channels_last)) or forward(x)
    for step in range(3):
        a, b = batched.train_step(step).losses, alone.train_step(step).losses
        assert all(abs(float(a[k]) - float(b[k])) < tolerance * max(1.0, abs(float(b[k]))) for k in a), (step, a, b)
    assert layouts and all(layouts)


@pytest.mark.parametrize("method", ["byol", "mocov2"])
def test_micro_batches_train_what_groups_of_their_size_train_on_the_gpu(tmp_path, monkeypatch, method):
    """tests/test_micro_batches.py's equality on the GPU, channels_last included (TF32 off: it rounds each
    convolution to 10 bits, which the comparison of two ways to the same numbers cannot tell from a bug)."""
    from test_micro_batches import BATCH, PARTS, SETTINGS, compare_training, trainer_of

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    on_gpu = {"device": "cuda", "precision": "fp32"}
    with trainer_of(tmp_path, "parts", SETTINGS[method], micro_batches=PARTS, **on_gpu) as accumulated, \
            trainer_of(tmp_path, "groups", SETTINGS[method], group=BATCH // PARTS, **on_gpu) as grouped:
        compare_training(accumulated, grouped, method)


def test_an_evaluation_gives_a_cpu_supernet_back_on_the_cpu():
    import slimssl
    from test_eval import tiny_config, tiny_supernet

    supernet = tiny_supernet()
    rows = slimssl.knn(supernet, config=tiny_config(), device="cuda", save=False)
    assert rows and all(t.device.type == "cpu" for t in [*supernet.parameters(), *supernet.buffers()])
