"""Behaviour that the tests of views in one batch, the JPEG size guard, the CUDA-graph watch, resume and exports
left open (found by hand-made mutants of those changes): each test here fails on one of them."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from slimssl.config import config_from_dict
from slimssl.seeds import derived_generator
from slimssl.train.loop import Trainer

from test_pretrain import tiny


# ---- a step's losses are those of its views run one at a time, computed outside the trainer ------------------

def _losses_from_views_one_at_a_time(trainer: Trainer, step: int, keys) -> dict[str, float]:
    """Each planned sub-network's loss at ``step``, from a copy of the model before the step: every view through
    every network on its own (``keys(model, view, index)``: the target's outputs for one view)."""
    trainer.model.train()
    model = copy.deepcopy(trainer.model)
    views = [v.clone() for v in trainer.views(step)]
    method = model.method
    with torch.no_grad():
        target = method.prepare_target([keys(model, v, i) for i, v in enumerate(views)])
        losses = {}
        for task in trainer.policy.plan(step):
            with model.subnet(task.spec):
                losses[task.spec.name] = method.loss([model.online(v) for v in views], target).loss.item()
    return losses


def test_a_steps_losses_are_those_of_its_views_one_at_a_time_target_included(tmp_path):
    """The reference of test_views_in_one_batch shares the trainer's step, so it could not see the target's
    forward run as one batch whose BatchNorm takes both views together: here the reference is computed apart."""
    trainer = Trainer(config_from_dict(tiny("byol", train={"batch_size": 16})), tmp_path)
    expected = _losses_from_views_one_at_a_time(trainer, 0, lambda model, v, i: model.target_forward(v))
    got = {k: v.item() for k, v in trainer.train_step(0).losses.items()}
    trainer.metrics.close()
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_shuffle_bn_still_shuffles_the_keys_of_a_training_step(tmp_path):
    """method.shuffle_bn: the keys the loss reads are each view's, normalised in the groups of its own drawn order
    (not the consecutive groups that running the views in one batch would give them)."""
    data = tiny("mocov2", train={"batch_size": 16})
    data["model"]["bn_group_size"] = 4
    data["method"]["shuffle_bn"] = True
    trainer = Trainer(config_from_dict(data), tmp_path)
    seed = trainer.cfg.train.seed

    def shuffled_keys(model, view, index):
        order = torch.randperm(16, generator=derived_generator(seed, "shuffle_bn", 0, index))
        keys = torch.empty(16, model.method.cfg.proj_dim)
        for group in order.view(4, 4):  # each group of 4 on its own, as a GPU holding it would
            keys[group] = model.target_forward(view[group])
        return keys

    expected = _losses_from_views_one_at_a_time(trainer, 0, shuffled_keys)
    unshuffled = _losses_from_views_one_at_a_time(trainer, 0, lambda model, v, i: model.target_forward(v))
    assert expected != pytest.approx(unshuffled, rel=1e-3)  # the check below can tell them apart
    got = {k: v.item() for k, v in trainer.train_step(0).losses.items()}
    trainer.metrics.close()
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)


# ---- views_in_one_batch gives back the count it found --------------------------------------------------------

def _quarters_and_halves(model, x):
    with torch.no_grad():
        quarters = torch.cat([model.online(part) for part in x.chunk(4)])
        halves = torch.cat([model.online(part) for part in x.chunk(2)])
    return quarters, halves


def test_views_in_one_batch_inside_another_gives_back_the_outer_count(tmp_path):
    trainer = Trainer(config_from_dict(tiny("byol", train={"batch_size": 16})), tmp_path)
    model = trainer.model.train()
    x = torch.randn(16, 3, 8, 8)
    quarters, halves = _quarters_and_halves(model, x)
    with torch.no_grad(), model.views_in_one_batch(4):
        with model.views_in_one_batch(2):
            torch.testing.assert_close(model.online(x), halves, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model.online(x), quarters, rtol=1e-4, atol=1e-5)  # four views again


def test_a_forward_that_fails_inside_views_in_one_batch_leaves_one_view(tmp_path):
    """An error in a forward (out of memory, a bad input) does not leave later forwards split in views."""
    from slimssl import InputError

    trainer = Trainer(config_from_dict(tiny("byol", train={"batch_size": 16})), tmp_path)
    model = trainer.model.train()
    x = torch.randn(8, 3, 8, 8)
    with torch.no_grad():
        whole = model.online(x)  # training BatchNorm: statistics over all 8 samples
        with pytest.raises(InputError), model.views_in_one_batch(2):
            model.online(torch.randn(4, 5, 8, 8))  # five channels: refused
        torch.testing.assert_close(model.online(x), whole)
        with model.views_in_one_batch(2):
            assert not torch.allclose(model.online(x), whole, atol=1e-3)  # (two views would differ)


# ---- the CUDA-graph watch counts this run's skips only --------------------------------------------------------

def test_a_runs_cuda_graph_warning_counts_its_own_skips_not_the_process_earlier_ones(tmp_path, monkeypatch, caplog):
    """A notebook that trained before (and skipped CUDA graphs then) is not told that this run skipped them."""
    from torch._dynamo.utils import counters

    from slimssl.train import compile as compile_mod

    monkeypatch.setattr(compile_mod, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    counters["inductor"]["cudagraph_skips"] += 2  # an earlier run in this process
    before = counters["inductor"]["cudagraph_skips"]
    cfg = config_from_dict(tiny("byol", widths=[1.0, 0.5], train={"compile": "reduce-overhead"}))
    eager = config_from_dict(tiny("byol", widths=[1.0, 0.5], train={"compile": "off"}))
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        Trainer(eager, tmp_path / "eager").fit(max_steps=1)  # captures no CUDA graphs: nothing to say
        Trainer(cfg, tmp_path / "quiet").fit(max_steps=1)  # skipped none of its own
    assert "without CUDA graphs" not in caplog.text
    caplog.clear()
    trainer = Trainer(cfg, tmp_path / "skips")
    forward = trainer.online_forward
    skipped = []

    def skipping(x):
        if not skipped:
            skipped.append(1)
            counters["inductor"]["cudagraph_skips"] += 1
        return forward(x)

    trainer.online_forward = skipping
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        trainer.fit(max_steps=2)
    warnings = [r.getMessage() for r in caplog.records if "without CUDA graphs" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("torch.compile ran 1 graph(s) of this run")
    assert f"({before + 1} in this process so far)" in warnings[0]
    torch._dynamo.reset()


# ---- resume: train state an older checkpoint cannot name the writer of --------------------------------------

def test_unknown_train_state_in_a_checkpoint_that_names_no_writer_is_refused_as_another_versions(tmp_path):
    """A checkpoint written before checkpoints named their writer (or by a build that did not) is refused with
    the same one-line error, not a KeyError."""
    import slimssl
    from slimssl.checkpoint import CheckpointError, load_checkpoint

    run = slimssl.pretrain(config_from_dict(tiny("byol", "all")), tmp_path / "run", max_steps=2)
    saved = load_checkpoint(run.run_dir)
    saved["train_state"]["ema_of_something"] = 0.5
    del saved["saved_by"]
    torch.save({**saved, "config": saved["config"].model_dump(mode="json")}, run.run_dir / "checkpoints" / "last.pt")
    with pytest.raises(CheckpointError, match=r"does not know \(ema_of_something\).*saved by another version"):
        slimssl.pretrain(None, run.run_dir, resume=True)


# ---- the JPEG size guard reads the frame header libjpeg reads -------------------------------------------------

def _jpeg_64x48() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buffer, "JPEG")
    return buffer.getvalue()


# a frame header of 8 x 8 pixels inside a comment, which libjpeg skips whole
_FAKE_FRAME = b"\xff\xc0\x00\x11\x08\x00\x08\x00\x08\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01"
_COMMENT = b"\xff\xfe" + (2 + len(_FAKE_FRAME)).to_bytes(2, "big") + _FAKE_FRAME


@pytest.mark.parametrize("before", [b"", b"\xff", b"\xff\x00\x00\x06", b"\xff\xd0\x00\x06", b"\xff\xd7\x00\x06",
                                    b"\xff\x01\x00\x06", b"\xff\xfe\x00\x03\xff" + _FAKE_FRAME[1:]],
                         ids=["none", "one-fill-byte", "stuffed-then-junk", "RST0-then-junk", "RST7-then-junk",
                              "TEM-then-junk", "comment-ending-in-0xff-then-junk"])
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_frame_header_inside_a_comment_does_not_pass_for_the_images(monkeypatch, before):
    """torchvision's decoder skips a comment whole, and what comes before it as libjpeg does (a fill byte, a
    stuffed zero, a restart or TEM marker, stray bytes, a comment's last byte): the guard must not read the 8 x 8
    frame header hidden in the comment (or in the stray bytes) in place of the image's 64 x 48 one."""
    from PIL import Image

    from slimssl.data.decode import decode_full

    data = _jpeg_64x48()
    crafted = data[:2] + before + _COMMENT + data[2:]
    assert torch.equal(decode_full(crafted), decode_full(data))  # the image torchvision decodes is 64 x 48
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 48 is over twice that, 8 x 8 is not
    with pytest.raises(Image.DecompressionBombError, match="64x48"):
        decode_full(crafted)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_jpeg_whose_huffman_tables_come_before_its_frame_header_is_decoded_and_guarded(monkeypatch):
    """Encoders may write the tables (DHT) before the frame header, which libjpeg accepts: a table is not a size."""
    from PIL import Image

    from slimssl.data.decode import decode_full

    data = _jpeg_64x48()
    segments, at = [], 2
    while data[at + 1] != 0xDA:  # up to the scan
        end = at + 2 + int.from_bytes(data[at + 2:at + 4], "big")
        segments.append(data[at:end])
        at = end
    tables = [s for s in segments if s[1] == 0xC4]
    others = [s for s in segments if s[1] != 0xC4]
    frame = next(i for i, s in enumerate(others) if s[1] == 0xC0)
    reordered = data[:2] + b"".join(others[:frame] + tables + others[frame:]) + data[at:]
    assert torch.equal(decode_full(reordered), decode_full(data))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(Image.DecompressionBombError, match="64x48"):
        decode_full(reordered)


def test_jpegs_decode_with_pillows_guard_turned_off(monkeypatch):
    """$SLIMSSL_MAX_IMAGE_PIXELS=none sets Pillow's limit to None: JPEGs are read, not refused."""
    from PIL import Image

    from slimssl.data.decode import decode_full

    data = _jpeg_64x48()
    expected = decode_full(data)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert torch.equal(decode_full(data), expected)


@pytest.mark.parametrize("data", [b"\xff\xd8\x00", b"\xff\xd8\xff"])
def test_a_jpeg_cut_short_in_its_first_marker_is_unreadable_as_pil_says(data):
    """Reported as the file that PIL cannot identify, not as an index error of the size guard."""
    from PIL import UnidentifiedImageError

    from slimssl.data.decode import decode_full

    with pytest.raises(UnidentifiedImageError):
        decode_full(data)


# ---- bench: a compiled mode that lost its CUDA graphs is said of the rows it measured ---------------------------

@pytest.mark.parametrize("skipping", ["slimmable", "dense"])
def test_bench_warns_when_a_measured_step_ran_without_cuda_graphs(monkeypatch, caplog, skipping):
    """The slimmable step or a dense network's: either row would measure train.compile=default's speed under
    reduce-overhead's name. (The forwards are left uncompiled; the skip is made as inductor's would be.)"""
    from torch._dynamo.utils import counters

    import slimssl.train.loop as loop_mod
    from slimssl.bench.measure import run_bench

    monkeypatch.setattr(loop_mod, "compile_forward", lambda fn, mode: fn)
    step, skipped = Trainer.train_step, []

    def train_step(self, i):
        slimmable = len(self.cfg.subnet_menu()) > 1
        if not skipped and slimmable == (skipping == "slimmable"):
            skipped.append(1)
            counters["inductor"]["cudagraph_skips"] += 1
        return step(self, i)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    cfg = config_from_dict(tiny("byol", widths=[1.0, 0.5], train={"compile": "reduce-overhead"}))
    with caplog.at_level(logging.WARNING, logger="slimssl"):
        run_bench(cfg, steps=1, warmup=1)
    assert skipped
    warnings = [r.getMessage() for r in caplog.records if "without CUDA graphs" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("torch.compile ran 1 graph(s) of this run")
