"""``train.compile``: compiled forwards train exactly like eager ones, with one graph per sub-network.

The graphs are traced with the ``aot_eager`` backend: the same dynamo capture and autograd split as
inductor, without needing a C++ compiler on the test machine.
"""

from __future__ import annotations

import torch
from torch._dynamo.testing import CompileCounterWithBackend

from slimssl.config import config_from_dict
from slimssl.train import compile as compile_mod
from slimssl.train.loop import Trainer

from test_pretrain import tiny

STEPS = 2
WIDTHS = [1.0, 0.5]


def _train(tmp_path, mode: str) -> dict[str, torch.Tensor]:
    cfg = config_from_dict(tiny("byol", widths=WIDTHS, train={"compile": mode}))
    trainer = Trainer(cfg, tmp_path / mode)
    for step in range(STEPS):
        trainer.train_step(step)
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_compiled_training_matches_eager_with_one_graph_per_subnet(tmp_path, monkeypatch):
    counter = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(compile_mod, "BACKEND", counter)
    torch._dynamo.reset()
    eager = _train(tmp_path, "off")
    compiled = _train(tmp_path, "default")
    # one online graph per width and one target graph, compiled once: no graph breaks, no recompiles
    assert counter.frame_count == len(WIDTHS) + 1
    assert eager.keys() == compiled.keys()
    for key in eager:
        assert torch.allclose(eager[key].float(), compiled[key].float(), atol=1e-5, rtol=1e-4), key
    torch._dynamo.reset()


def test_the_modes_that_capture_cuda_graphs_keep_copies_of_the_outputs(tmp_path):
    # a CUDA-graph output is overwritten at the next replay: both inductor modes that capture graphs need copies
    assert not compile_mod.uses_cuda_graphs("off") and not compile_mod.uses_cuda_graphs("default")
    assert compile_mod.uses_cuda_graphs("reduce-overhead") and compile_mod.uses_cuda_graphs("max-autotune")
    out = torch.ones(2)
    for mode, copied in (("off", False), ("max-autotune", True)):
        trainer = Trainer(config_from_dict(tiny("byol", widths=WIDTHS, train={"compile": mode})), tmp_path / mode)
        assert (trainer._keep(out) is not out) == copied


def test_each_run_of_a_sweep_compiles_graphs_of_its_own_and_gives_the_graph_limit_back(tmp_path, monkeypatch):
    """Runs in one process (a sweep over widths) shared the forward's code object, on which dynamo keeps its graphs:
    an earlier run's graphs counted against the next one's limit, and from the third run of a sweep on the online
    forward ran uncompiled, without a word. Each compile now has graphs of its own, and the limit raised for a run
    is given back when its Trainer closes."""
    import torch._dynamo

    counter = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(compile_mod, "BACKEND", counter)
    torch._dynamo.reset()
    layer, x = torch.nn.Linear(3, 2), torch.ones(1, 3)
    for run in range(1, 4):
        compile_mod.compile_forward(layer.forward, "default")(x)
        assert counter.frame_count == run  # a graph of its own (before: the first run's, found again)
    config = torch._dynamo.config
    key = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    # config.patch, not monkeypatch: pytest's undo would delete the setting, which hides it from torch for the
    # rest of the process (every later compile then fails)
    with config.patch(**{key: 4}):
        space = tiny("byol", widths=WIDTHS, train={"compile": "default"}, slim={"random_space": "space"})
        with Trainer(config_from_dict({**space, "model": {**space["model"], "bn": "shared"}}), tmp_path / "run"):
            assert getattr(config, key) == 66  # any of the space's sub-networks gets a graph
        assert getattr(config, key) == 4  # given back
        first, second = compile_mod.graph_limit(10), compile_mod.graph_limit(4)  # two Trainers open at once
        first.__enter__()
        second.__enter__()
        first.__exit__(None, None, None)  # the first closes first: the second's limit stays, then all is given back
        assert getattr(config, key) == 6
        second.__exit__(None, None, None)
        assert getattr(config, key) == 4
    torch._dynamo.reset()
