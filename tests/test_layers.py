"""Slimmable layers inside a supernet: scoped activation, BatchNorm modes, depth rule, gradients."""

from __future__ import annotations

import pytest
import torch
import torchvision
import torch.nn.functional as F
from torch import nn

from slimssl.models.resnet import InputError, SlimResNet
from slimssl.nn.channels import scaled_channels
from slimssl.nn.layers import SlimBatchNorm, SlimConv2d, SlimLinear, SlimState, bind_state
from slimssl.nn.slimmable import recalibrate_bn
from slimssl.nn.spec import Menu, SubnetError, SubnetSpec

D1 = (1, 1, 1, 1)
W = {w: SubnetSpec(w, D1) for w in (1.0, 0.5, 0.25)}


def tiny(bn: str = "private", base_width: int = 8, **kw) -> SlimResNet:
    torch.manual_seed(0)
    kw.setdefault("menu", list(W.values()))
    return SlimResNet("basic", D1, base_width=base_width, stem="cifar", bn=bn, **kw)


def images(n: int = 2, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def private_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}


# ---- scoped activation --------------------------------------------------------------------------------

def test_subnet_context_narrows_and_restores(perturb_bn):
    model = perturb_bn(tiny()).eval()
    x = images()
    full = model(x)
    assert full.shape == (2, 64)
    with model.subnet("w0p5_d1-1-1-1") as spec:
        assert spec == W[0.5]
        narrow = model(x)
    assert narrow.shape == (2, 32)
    after = model(x)
    assert after.shape == (2, 64)
    torch.testing.assert_close(after, full, rtol=0, atol=0)
    # a freshly built network of the same weights agrees too
    fresh = perturb_bn(tiny()).eval()
    torch.testing.assert_close(fresh(x), full, rtol=0, atol=0)


def test_subnet_context_restores_after_exception(perturb_bn):
    model = perturb_bn(tiny()).eval()
    x = images()
    full = model(x)
    with pytest.raises(RuntimeError, match="boom"):
        with model.subnet(W[0.25]):
            assert model(x).shape == (2, 16)
            raise RuntimeError("boom")
    torch.testing.assert_close(model(x), full, rtol=0, atol=0)


def test_forward_subnet_argument_does_not_leak(perturb_bn):
    model = perturb_bn(tiny()).eval()
    x = images()
    full = model(x)
    assert model(x, subnet="0.25").shape == (2, 16)
    assert model(x, subnet=W[0.5]).shape == (2, 32)
    torch.testing.assert_close(model(x), full, rtol=0, atol=0)
    # an error inside a forward with a sub-network also leaves the full network active
    with pytest.raises(InputError, match=r"expected a float tensor of images \[batch, 3, height, width\]"):
        model(torch.randn(2, 5, 16, 16), subnet=W[0.5])
    torch.testing.assert_close(model(x), full, rtol=0, atol=0)


def test_subnet_output_matches_context_output(perturb_bn):
    model = perturb_bn(tiny()).eval()
    x = images()
    with model.subnet(W[0.5]):
        ctx = model(x)
    torch.testing.assert_close(model(x, subnet=W[0.5]), ctx, rtol=0, atol=0)
    assert not torch.allclose(ctx, model(x)[:, :32])  # the narrow network really differs


def test_nested_contexts_restore_each_level():
    model = tiny().eval()
    x = images()
    with model.subnet(W[0.5]):
        assert model(x).shape == (2, 32)
        with model.subnet(W[0.25]):
            assert model(x).shape == (2, 16)
            assert model(x, subnet=W[1.0]).shape == (2, 64)
            assert model(x).shape == (2, 16)
        assert model(x).shape == (2, 32)
        with pytest.raises(ValueError):
            with model.subnet(W[0.25]):
                raise ValueError
        assert model(x).shape == (2, 32)
    assert model(x).shape == (2, 64)


def test_feature_dim_matches_output():
    model = tiny().eval()
    x = images()
    for spec in model.menu:
        assert model(x, subnet=spec).shape[1] == model.feature_dim(spec) == scaled_channels(64, spec.width)


# ---- private BatchNorm --------------------------------------------------------------------------------

def test_private_bn_only_active_subnet_stats_change():
    model = tiny().train()
    before = private_stats(model)
    model(images(4), subnet=W[0.5])
    after = private_stats(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    mine = {k for k in before if ".bns.w0p5_d1-1-1-1." in k}
    assert mine, "no private BatchNorm keyed by the sub-network name"
    assert changed == mine
    # evaluation never touches running statistics
    model.eval()
    model(images(4, seed=3), subnet=W[0.25])
    model(images(4, seed=3))
    assert all(torch.equal(after[k], v) for k, v in private_stats(model).items())


def test_private_bn_subnet_outside_menu_raises_naming_menu():
    model = tiny().eval()
    x = images()
    full = model(x)
    for bad in ("0.75", SubnetSpec(0.75, D1)):
        with pytest.raises(SubnetError) as err:
            model(x, subnet=bad)
        msg = str(err.value)
        assert "w0p75_d1-1-1-1" in msg
        for name in model.menu.names:
            assert name in msg
    with pytest.raises(SubnetError):
        with model.subnet("0.75"):
            pass
    torch.testing.assert_close(model(x), full, rtol=0, atol=0)


def test_too_deep_subnet_raises():
    model = tiny(bn="shared").eval()
    with pytest.raises(SubnetError):
        model(images(), subnet=SubnetSpec(1.0, (2, 1, 1, 1)))
    with pytest.raises(SubnetError):
        model(images(), subnet=SubnetSpec(1.0, (1, 1, 1)))


def test_private_bn_module_direct_lookup_error():
    state = SlimState(SubnetSpec(1.0, (1,)), Menu([SubnetSpec(1.0, (1,))]))
    bn = SlimBatchNorm(8, subnets={"w1p0_d1": 8})
    bind_state(bn, state)
    with pytest.raises(SubnetError, match="w1p0_d1"):
        bn.norm_for(SubnetSpec(0.5, (1,)))


# ---- shared BatchNorm and recalibration ---------------------------------------------------------------

def test_shared_bn_runs_any_width():
    model = tiny(bn="shared").eval()
    x = images()
    out = model(x, subnet="0.6")
    assert out.shape == (2, scaled_channels(64, 0.6))
    assert model(x, subnet=SubnetSpec(0.37, D1)).shape == (2, scaled_channels(64, 0.37))
    assert model(x).shape == (2, 64)


def test_recalibrate_bn_sets_batch_statistics_of_that_width():
    model = tiny(bn="shared").eval()
    c = scaled_channels(8, 0.6)
    captured = []
    hook = model.conv1.register_forward_hook(lambda m, i, o: captured.append(o.detach().clone()))
    batches = [images(4, seed=5), images(4, seed=6)]
    before = model.bn1.bn.running_mean.clone()
    recalibrate_bn(model, "0.6", batches)
    hook.remove()
    assert len(captured) == 2 and captured[0].shape[1] == c
    means = torch.stack([o.mean(dim=(0, 2, 3)) for o in captured])
    vars_ = torch.stack([o.var(dim=(0, 2, 3), unbiased=True) for o in captured])
    bn = model.bn1.bn
    assert not torch.allclose(bn.running_mean[:c], before[:c])
    # plain average over the batches
    torch.testing.assert_close(bn.running_mean[:c], means.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var[:c], vars_.mean(0), rtol=1e-4, atol=1e-5)
    # the model is left as it was: eval mode, full network active, momentum restored
    assert not model.training
    assert model(images()).shape == (2, 64)
    assert bn.momentum == 0.1


def test_recalibrate_bn_of_a_plain_model_says_what_takes_one():
    plain = tiny(bn="shared").export("0.5")  # one sub-network, no menu: nothing to choose
    with pytest.raises(SubnetError, match=r"takes a slimmable supernet .* got PlainResNet.*swa_utils.update_bn"):
        recalibrate_bn(plain, "0.5", [images(4)])


def test_recalibrate_bn_takes_a_compiled_supernet():
    model = tiny(bn="shared")
    recalibrate_bn(torch.compile(model, backend="eager"), "0.5", [images(4)])
    assert model.bn_statistics_estimated("0.5")


def test_shared_statistics_of_a_one_entry_menu_are_that_entry_s_own():
    alone = tiny(bn="shared", menu=[W[0.5]])  # trained as one width: its statistics are that width's
    assert alone.bn_statistics_estimated("0.5") and not alone.bn_statistics_estimated("1.0")
    recalibrate_bn(alone, "1.0", [images(4)])  # now the full width's, no longer w0p5's
    assert alone.bn_statistics_estimated("1.0") and not alone.bn_statistics_estimated("0.5")
    assert not tiny(bn="shared").bn_statistics_estimated("0.5")  # several widths trained: a mix of them


def test_slim_layers_refuse_more_input_channels_than_their_weights_have():
    conv, linear = SlimConv2d(3, 8, 3), SlimLinear(6, 8)
    state = SlimState(SubnetSpec(1.0, D1), Menu([SubnetSpec(1.0, D1), SubnetSpec(0.5, D1)]))
    for layer in (conv, linear):
        bind_state(layer, state)
    state.active = SubnetSpec(0.5, D1)
    with pytest.raises(RuntimeError, match="channels"):
        conv(torch.randn(1, 4, 5, 5))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        linear(torch.randn(2, 7))


def test_recalibrate_bn_single_batch_equals_batch_stats_deep_layer():
    model = tiny(bn="shared").train()
    x = images(4, seed=9)
    captured = []
    layer = model.layer4[0]
    hook = layer.conv2.register_forward_hook(lambda m, i, o: captured.append(o.detach().clone()))
    recalibrate_bn(model, SubnetSpec(0.5, D1), [(x, torch.zeros(4))])  # (images, labels) batches work
    hook.remove()
    (out,) = captured
    c = out.shape[1]
    assert c == scaled_channels(64, 0.5)
    torch.testing.assert_close(layer.bn2.bn.running_mean[:c], out.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.bn2.bn.running_var[:c], out.var(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert model.training


def test_recalibrate_bn_private_touches_only_that_subnet():
    model = tiny().eval()
    before = private_stats(model)
    recalibrate_bn(model, W[0.25], [images(4)])
    after = private_stats(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".bns.w0p25_d1-1-1-1." in k for k in changed)



def test_recalibrate_bn_shared_keeps_what_the_subnet_does_not_run():
    """Shared BatchNorm: the channels beyond the sub-network's width and the blocks beyond its depth keep the
    statistics of the sub-networks that do run them."""
    deep = SubnetSpec(1.0, (2, 2, 2, 2))
    torch.manual_seed(0)
    model = SlimResNet("basic", (2, 2, 2, 2), base_width=8, stem="cifar", bn="shared",
                       menu=[deep, SubnetSpec(0.5, D1)]).train()
    for seed in range(3):
        model(images(4, seed=seed) + 3)  # statistics of the full network, away from the reset values
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    recalibrate_bn(model, SubnetSpec(0.5, D1), [images(4, seed=9)])
    after = model.state_dict()
    c = scaled_channels(8, 0.5)
    assert not torch.equal(after["bn1.bn.running_mean"][:c], before["bn1.bn.running_mean"][:c])
    assert torch.equal(after["bn1.bn.running_mean"][c:], before["bn1.bn.running_mean"][c:])
    assert torch.equal(after["bn1.bn.running_var"][c:], before["bn1.bn.running_var"][c:])
    second_blocks = [k for k in before if k.startswith(("layer1.1.", "layer4.1."))]  # beyond depth 1
    assert second_blocks and all(torch.equal(after[k], before[k]) for k in second_blocks)


# ---- SyncBatchNorm conversion -------------------------------------------------------------------------

def test_convert_sync_batchnorm_private(perturb_bn):
    model = perturb_bn(tiny()).eval()
    x = images()
    expected = {s: model(x, subnet=s) for s in model.menu}
    keys = list(model.state_dict())
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    bns = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(isinstance(m, nn.SyncBatchNorm) for m in bns)
    assert list(converted.state_dict()) == keys
    converted.eval()
    for spec, out in expected.items():
        torch.testing.assert_close(converted(x, subnet=spec), out, rtol=0, atol=1e-6)


# ---- depth rule ---------------------------------------------------------------------------------------

def test_resnet34_depth_supernet_contains_resnet18(perturb_bn):
    torch.manual_seed(0)
    r18 = SubnetSpec(1.0, (2, 2, 2, 2))
    menu = [SubnetSpec(1.0, (3, 4, 6, 3)), r18, SubnetSpec(0.5, (2, 2, 2, 2))]
    model = perturb_bn(SlimResNet("basic", (3, 4, 6, 3), base_width=4, stem="cifar", menu=menu)).eval()
    x = images(2, 16)
    sub = model(x, subnet=r18)
    plain = model.export(r18).eval()
    assert plain.config.depths == (2, 2, 2, 2)
    assert [len(s) for s in plain.stages()] == [2, 2, 2, 2]
    torch.testing.assert_close(plain(x), sub, rtol=0, atol=1e-5)
    assert not torch.allclose(sub, model(x), atol=1e-3)  # depth actually matters
    # the exported parameter names are torchvision ResNet-18's (without fc)
    tv_keys = {k for k in torchvision.models.resnet18(weights=None).state_dict() if not k.startswith("fc.")}
    assert set(plain.state_dict()) == tv_keys
    # private BatchNorms exist only in the blocks a sub-network runs
    keys = set(model.state_dict())
    assert "layer3.1.bn1.bns.w1p0_d2-2-2-2.running_mean" in keys
    assert "layer3.2.bn1.bns.w1p0_d2-2-2-2.running_mean" not in keys
    assert "layer3.5.bn1.bns.w1p0_d3-4-6-3.running_mean" in keys
    half = model.export("w0p5_d2-2-2-2").eval()
    torch.testing.assert_close(half(x), model(x, subnet="w0p5_d2-2-2-2"), rtol=0, atol=1e-5)


# ---- gradients ----------------------------------------------------------------------------------------

def test_narrow_subnet_gradients_touch_only_leading_slice():
    model = tiny().train()
    spec = W[0.25]
    model(images(4), subnet=spec).sum().backward()
    conv = model.layer4[0].conv1  # full weight 64 x 32 x 3 x 3
    out, cin = scaled_channels(64, 0.25), scaled_channels(32, 0.25)
    grad = conv.weight.grad
    assert grad is not None and grad.shape == (64, 32, 3, 3)
    assert grad[:out, :cin].abs().sum() > 0
    rest = grad.clone()
    rest[:out, :cin] = 0
    assert torch.count_nonzero(rest) == 0
    for m in model.modules():  # every slimmable conv obeys the rule
        if isinstance(m, SlimConv2d) and m.weight.grad is not None:
            o = scaled_channels(m.out_channels, 0.25)
            i = m.in_channels if m.in_channels == 3 else scaled_channels(m.in_channels, 0.25)
            g = m.weight.grad.clone()
            g[:o, :i] = 0
            assert torch.count_nonzero(g) == 0
    # BatchNorms of the other sub-networks receive no gradient
    for name, p in model.named_parameters():
        if ".bns." in name and ".bns.w0p25_d1-1-1-1." not in name:
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, name


def test_slim_linear_uses_leading_slice():
    state = SlimState(SubnetSpec(1.0, (1,)), Menu([SubnetSpec(1.0, (1,))]))
    lin = SlimLinear(8, 6)
    bind_state(lin, state)
    x = torch.randn(3, 4)
    state.active = SubnetSpec(0.5, (1,))
    y = lin(x)
    assert y.shape == (3, 3)
    torch.testing.assert_close(y, x @ lin.weight[:3, :4].T + lin.bias[:3])
    fixed = SlimLinear(8, 6, slim_out=False)
    bind_state(fixed, state)
    assert fixed(x).shape == (3, 6)


def test_unbound_layer_raises():
    with pytest.raises(RuntimeError, match="bind_state"):
        SlimConv2d(3, 4, 3)(torch.randn(1, 3, 8, 8))


# ---- slimmable heads ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method, head, params, ends_with", [
    # in 64 (or 16 for predictors), hidden 32, out 16; a BatchNorm with affine has 2 x 32 parameters, and a
    # linear layer followed by one has no bias (the BatchNorm would cancel it)
    ("byol", "projector", 64 * 32 + 2 * 32 + 32 * 16 + 16, "linear"),
    ("byol", "predictor", 16 * 32 + 2 * 32 + 32 * 16 + 16, "linear"),
    ("mocov2", "projector", 64 * 32 + 32 + 32 * 16 + 16, "linear"),
    # MoCo v3: no biases; the projector ends with a BatchNorm without affine, the predictor with a linear
    ("mocov3", "projector", 64 * 32 + 2 * 32 + 32 * 16, "bn"),
    ("mocov3", "predictor", 16 * 32 + 2 * 32 + 32 * 16, "linear"),
])
def test_heads_match_the_methods_published_architectures(method, head, params, ends_with):
    from slimssl.methods import METHODS
    from slimssl.models.heads import SlimMLP

    menu = Menu([SubnetSpec(1.0, D1)])
    mlp = SlimMLP(64 if head == "projector" else 16, getattr(METHODS[method], f"{head}_layers")(32, 16), menu)
    assert sum(p.numel() for p in mlp.parameters()) == params
    assert isinstance(mlp[-1], SlimLinear if ends_with == "linear" else SlimBatchNorm)


@pytest.mark.parametrize("method", ["byol", "mocov2", "mocov3"])
def test_slim_mlp_keeps_output_dim_and_narrows_hidden(method):
    from slimssl.methods import METHODS
    from slimssl.models.heads import SlimMLP

    menu = Menu([SubnetSpec(w, D1) for w in (1.0, 0.5)])
    state = SlimState(SubnetSpec(1.0, D1), menu)
    torch.manual_seed(0)
    mlp = SlimMLP(64, METHODS[method].projector_layers(32, 16), menu)
    bind_state(mlp, state)
    mlp.train()
    hidden = []
    mlp[0].register_forward_hook(lambda m, i, o: hidden.append(o.shape[1]))
    full = mlp(torch.randn(4, 64))
    state.active = SubnetSpec(0.5, D1)
    narrow = mlp(torch.randn(4, 32))
    assert full.shape == narrow.shape == (4, 16)  # every sub-network lands in the same embedding space
    assert hidden == [32, 16]
    for m in mlp:
        if isinstance(m, SlimBatchNorm):
            assert set(m.bns) == set(menu.names)
            last = m is mlp[-1]
            assert m.bns["w0p5_d1-1-1-1"].num_features == 16
            assert m.bns["w1p0_d1-1-1-1"].num_features == (16 if last else 32)


def test_eval_mode_gives_every_module_back_its_own_mode_after_an_error():
    from torch import nn

    from slimssl.nn.modes import eval_mode

    training, frozen = nn.Linear(2, 2).train(), nn.Linear(2, 2).eval()
    with pytest.raises(RuntimeError, match="failed"), eval_mode(training, frozen):
        assert not training.training and not frozen.training
        raise RuntimeError("failed")
    assert training.training and not frozen.training

    # a training model with a BatchNorm kept in eval mode (frozen statistics) gets it back frozen
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train()
    model[1].eval()
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == [True, True, False]


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("width", [1.0, 0.5])
def test_slim_layers_compute_what_slicing_their_weights_computes(layout, width):
    # the layers take their weights' leading block without slicing ops; values and gradients must not change,
    # in any memory layout, and under bf16 autocast with two calls per step (the two views)
    torch.manual_seed(0)
    conv, linear = SlimConv2d(8, 16, 3, padding=1, bias=True), SlimLinear(16, 12)
    state = SlimState(SubnetSpec(1.0, D1), Menu([SubnetSpec(1.0, D1), SubnetSpec(0.5, D1)]))
    for layer in (conv, linear):
        bind_state(layer, state)
    conv = conv.to(memory_format=layout)
    state.active = SubnetSpec(width, D1)
    cin = scaled_channels(8, width)
    views = [torch.randn(2, cin, 6, 6, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    cout, lout = scaled_channels(16, width), scaled_channels(12, width)

    def step(reference: bool) -> list[torch.Tensor]:
        for p in (*conv.parameters(), *linear.parameters()):
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs = []
            for x in views:
                if reference:
                    h = F.conv2d(x, conv.weight[:cout, :cin], conv.bias[:cout], padding=1).mean((2, 3))
                    outs.append(F.linear(h, linear.weight[:lout, :cout], linear.bias[:lout]))
                else:
                    outs.append(linear(conv(x).mean((2, 3))))
        sum(o.float().square().sum() for o in outs).backward()
        return [o.detach() for o in outs] + [p.grad.clone() for p in (*conv.parameters(), *linear.parameters())]

    for got, expected in zip(step(reference=False), step(reference=True)):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("bn", ["private", "shared"])
def test_a_supernets_repr_gives_each_batchnorm_one_line(bn):
    """Private BatchNorm holds one module per sub-network: listed, a ResNet-18 of 4 widths printed 223 lines."""
    supernet = tiny(bn)
    lines = repr(supernet).splitlines()
    norms = [line for line in lines if "SlimBatchNorm(" in line]
    assert len(norms) == sum(isinstance(m, SlimBatchNorm) for m in supernet.modules())
    assert not any("BatchNorm2d(" in line for line in lines)
    sizes = [supernet.bn1.bns[s.name].num_features for s in supernet.menu] if bn == "private" else None
    assert norms[0].strip() == f"(bn1): SlimBatchNorm({supernet.bn1.num_features}, " + (
        f"private BatchNorm2d: one per sub-network, of {sizes} features)" if bn == "private" else
        "shared BatchNorm2d: sliced to each width)")
    head = SlimBatchNorm(8, dim=1, subnets={"w1p0": 8, "w0p5": 4}, affine=False)  # as a projector's last layer
    assert repr(head) == "SlimBatchNorm(8, private BatchNorm1d, affine=False: one per sub-network, of [8, 4] features)"
