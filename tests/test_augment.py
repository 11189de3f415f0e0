import math
from dataclasses import replace

import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

from slimssl.data.augment import (
    TwoViewAugment,
    ViewRecipe,
    adjust_hue,
    augment_view,
    blur_kernel_size,
    eval_transform,
    gaussian_blur,
    recipe,
    sample_crop_boxes,
)

PLAIN = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # outputs stay in [0, 1]
NO_COLOUR = ViewRecipe(jitter_p=0.0, grayscale_p=0.0)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _synthetic(n, size=32, seed=0):
    """Structured uint8 images: a colour gradient plus a random coloured square."""
    g = _gen(seed)
    ramp = torch.linspace(0, 1, size)
    across = torch.rand(n, 3, 1, 1, generator=g) * ramp.view(1, 1, 1, -1)
    down = torch.rand(n, 3, 1, 1, generator=g) * ramp.view(1, 1, -1, 1)
    base = (across + down) / 2
    base[:, :, 4:14, 8:20] = torch.rand(n, 3, 1, 1, generator=g)
    return (base.clamp(0, 1) * 255).round().to(torch.uint8)


def test_shapes_dtypes_and_determinism():
    images = _synthetic(6, size=40)
    aug = TwoViewAugment(recipe("byol", 24), size=24)
    a1, a2 = aug(images, _gen(1))
    b1, b2 = aug(images, _gen(1))
    c1, _ = aug(images, _gen(2))
    assert a1.shape == a2.shape == (6, 3, 24, 24) and a1.dtype == torch.float32
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, c1) and not torch.equal(a1, a2)


def test_global_rng_untouched():
    state = torch.random.get_rng_state()
    TwoViewAugment(recipe("mocov2", 128), size=16)(_synthetic(4), _gen(0))
    assert torch.equal(state, torch.random.get_rng_state())


def test_recipes():
    v1, v2 = recipe("byol", 224)
    assert (v1.blur_p, v1.solarize_p, v2.blur_p, v2.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    assert recipe("mocov3", 224) == (v1, v2)
    m1, m2 = recipe("mocov2", 224)
    assert m1 == m2 and m1.saturation == 0.4 and m1.blur_p == 0.5 and m1.crop_scale == (0.2, 1.0)
    assert recipe("mocov2", 224, crop_scale=(0.5, 1.0), flip_p=0.0)[1] == replace(m2, crop_scale=(0.5, 1.0), flip_p=0.0)
    assert all(v.blur_p == 0 and v.crop_scale == (0.08, 1.0) for v in recipe("byol", 32))
    with pytest.raises(ValueError, match="mocov2"):
        recipe("simclr", 32)


def test_data_blur_turns_the_recipes_blur_on_at_small_resolutions_and_off_at_large_ones():
    from slimssl.config import load_config
    from slimssl.data.views import two_view_augment

    def blur_ps(*overrides):
        return [v.blur_p for v in two_view_augment(load_config("demo", list(overrides))).views]

    assert blur_ps("data.resolution=32") == [0.0, 0.0]  # the default at <= 64 px
    assert blur_ps("data.resolution=32", "data.blur=true") == [1.0, 0.1]
    assert blur_ps("data.resolution=96") == [1.0, 0.1]
    assert blur_ps("data.resolution=96", "data.blur=false") == [0.0, 0.0]


def test_data_views_change_the_recipes_views_one_entry_for_both_or_one_each():
    from slimssl.config import load_config
    from slimssl.data.views import two_view_augment

    def views(*overrides):
        return two_view_augment(load_config("demo", ["data.resolution=16", *overrides])).views

    byol = views("data.augment=byol")
    both = views("data.augment=byol", "data.views={brightness: 0.8, contrast: 0.8, saturation: 0.8, hue: 0.2}")
    assert both == tuple(replace(v, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2) for v in byol)
    each = views("data.augment=byol", "data.blur=false", "data.views=[{blur_p: 1.0}, {solarize_p: 0.5, "
                 "crop_ratio: [1, 1]}]")  # data.views is applied after data.blur
    assert each == (replace(byol[0], blur_p=1.0), replace(byol[1], solarize_p=0.5, crop_ratio=(1.0, 1.0)))

    # what the views hold: no colour change, the whole image, no flip -> both views are the image itself;
    # grayscale always -> three equal channels
    images = _synthetic(4, size=16)
    plain = ["data.crop_scale=[1, 1]", "data.flip_p=0", "data.mean=[0, 0, 0]", "data.std=[1, 1, 1]"]
    still = two_view_augment(load_config("demo", ["data.resolution=16", *plain, "data.views={jitter_p: 0, "
                                                  "grayscale_p: 0, blur_p: 0, solarize_p: 0, crop_ratio: [1, 1]}"]))
    one, two = still(images, _gen(0))
    torch.testing.assert_close(one, images.float() / 255)
    torch.testing.assert_close(two, images.float() / 255)
    grey = two_view_augment(load_config("demo", ["data.resolution=16", *plain, "data.views={grayscale_p: 1}"]))
    for view in grey(images, _gen(0)):
        torch.testing.assert_close(view[:, 0], view[:, 1])
        torch.testing.assert_close(view[:, 1], view[:, 2])


def test_data_views_name_every_setting_of_a_view_but_those_of_their_own_keys():
    from dataclasses import fields

    from slimssl.config import ViewChanges

    own_keys = {"crop_scale", "flip_p", "interpolation"}  # data.crop_scale, data.flip_p, data.crop_interpolation
    assert set(ViewChanges.model_fields) == {f.name for f in fields(ViewRecipe)} - own_keys


def test_equal_view_changes_are_one_setting(tmp_path):
    from slimssl.config import config_differences, load_config

    def cfg(views):
        return load_config("demo", [f"data.views={views}"])

    assert config_differences(cfg("[{hue: 0.2}, {hue: 0.2}]"), cfg("{hue: 0.2}")) == []
    assert config_differences(cfg("[{}, {}]"), load_config("demo")) == []
    assert cfg("[{hue: 0.2}, {}]").to_yaml().count("hue") == 1  # unset keys are not written as null


@pytest.mark.parametrize("override, message", [
    ("data.views=[{brightnes: 0.8}]", r"data.views.0.brightnes: unknown key \[from overrides=\] \(did you mean "
                                      r"data.views.0.brightness\?\) \(allowed here: crop_ratio, jitter_p, brightness"),
    ("data.views=[{}, {blur_sigma: [2, 1]}]", r"data.views.1.blur_sigma: must be \(min, max\) with min <= max"),
    ("data.views=[{}, {}, {}]", r"data.views: List should have at most 2 items"),
    ("data.views={hue: 0.9}", r"data.views.0.hue: Input should be less than or equal to 0.5"),
    ("data.views={grayscale_p: 2}", r"data.views.0.grayscale_p: Input should be less than or equal to 1"),
])
def test_bad_view_changes_are_refused_naming_the_key(override, message):
    from slimssl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config("demo", [override])


def test_crop_boxes_follow_scale_and_ratio():
    boxes = sample_crop_boxes(4000, 64, 48, (0.2, 0.6), (3 / 4, 4 / 3), _gen(0), "cpu")
    top, left, h, w = boxes.unbind(1)
    area = h * w / (64 * 48)
    assert area.min() > 0.2 - 0.03 and area.max() < 0.6 + 0.03  # +-rounding of h, w
    ratio = w / h
    assert ratio.min() > 0.75 * 0.9 and ratio.max() < 4 / 3 * 1.1
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 64).all() and (left + w <= 48).all()
    # Mean area agrees with torchvision's sampler.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ref = [T.RandomResizedCrop.get_params(torch.zeros(1, 64, 48), (0.2, 0.6), (3 / 4, 4 / 3)) for _ in range(4000)]
    ref_area = torch.tensor([p[2] * p[3] / (64 * 48) for p in ref])
    assert abs(area.mean() - ref_area.mean()) < 0.01


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_a_crop_of_the_whole_image_is_the_image_resized_with_the_interpolation_asked(interpolation):
    images = _synthetic(4, 12).float() / 255
    whole = replace(NO_COLOUR, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, interpolation=interpolation)
    out = augment_view(images, whole, 24, _gen(0))
    expected = torch.nn.functional.interpolate(images, size=(24, 24), mode=interpolation, align_corners=False)
    torch.testing.assert_close(out, expected.clamp(0, 1), rtol=0, atol=1e-5)


def test_data_crop_interpolation_resizes_both_views_crops_and_is_checked():
    from slimssl.config import ConfigError, load_config
    from slimssl.data.views import two_view_augment

    bicubic = two_view_augment(load_config("demo", ["data.crop_interpolation=bicubic"]))
    bilinear = two_view_augment(load_config("demo"))
    assert [v.interpolation for v in bicubic.views] == ["bicubic"] * 2
    assert [replace(v, interpolation="bilinear") for v in bicubic.views] == list(bilinear.views)
    images = _synthetic(8, 24)
    one, two = bicubic(images, _gen(3)), bilinear(images, _gen(3))
    assert all(a.shape == b.shape and not torch.allclose(a, b, atol=1e-3) for a, b in zip(one, two))
    with pytest.raises(ConfigError, match="data.crop_interpolation: Input should be 'bilinear' or 'bicubic'"):
        load_config("demo", ["data.crop_interpolation=nearest"])


def test_crop_falls_back_to_center():
    boxes = sample_crop_boxes(5, 40, 10, (1.5, 2.0), (3 / 4, 4 / 3), _gen(0), "cpu")
    expected = T.RandomResizedCrop.get_params(torch.zeros(1, 40, 10), (1.5, 2.0), (3 / 4, 4 / 3))
    assert boxes.tolist() == [[float(v) for v in expected]] * 5 == [[13.0, 0.0, 13.0, 10.0]] * 5


def test_single_colour_survives_crop_and_flip():
    images = torch.empty(8, 3, 20, 30, dtype=torch.uint8)
    images[:] = torch.tensor([30, 140, 250], dtype=torch.uint8).view(1, 3, 1, 1)
    out, _ = TwoViewAugment((NO_COLOUR, NO_COLOUR), 16, **PLAIN)(images, _gen(0))
    expected = torch.tensor([30, 140, 250]).view(1, 3, 1, 1) / 255
    assert torch.allclose(out, expected.expand_as(out), atol=1e-6)


def test_grayscale_and_solarize_always():
    images = _synthetic(8)
    full = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0)
    grey = ViewRecipe(**full, grayscale_p=1.0)
    out, _ = TwoViewAugment((grey, grey), 32, **PLAIN)(images, _gen(0))
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    sol = ViewRecipe(**full, grayscale_p=0.0, solarize_p=1.0)
    out, _ = TwoViewAugment((sol, sol), 32, **PLAIN)(images, _gen(0))
    x = images.float() / 255
    assert torch.allclose(out, torch.where(x >= 0.5, 1 - x, x), atol=1e-5)


def test_colour_ops_match_torchvision():
    x = _synthetic(4).float() / 255
    for shift in (-0.3, 0.07, 0.45):
        ref = torch.stack([TF.adjust_hue(xi, shift) for xi in x])
        assert torch.allclose(adjust_hue(x, torch.full((4, 1, 1, 1), shift)), ref, atol=1e-5)
    ref = torch.stack([TF.gaussian_blur(xi, [5, 5], [1.3, 1.3]) for xi in x])
    assert torch.allclose(gaussian_blur(x, torch.full((4,), 1.3), 5), ref, atol=1e-5)
    assert blur_kernel_size(224) == 23 and blur_kernel_size(32) == 3


def test_eval_transform():
    images = _synthetic(3, size=40)
    out = eval_transform(images, 40, **PLAIN)
    assert torch.allclose(out, images.float() / 255)
    assert eval_transform(images[:, :, :, 4:], 16).shape == (3, 3, 16, 16)


def _torchvision_view(view, size):
    return T.Compose([
        T.RandomResizedCrop(size, view.crop_scale, view.crop_ratio, antialias=True),
        T.RandomHorizontalFlip(view.flip_p),
        T.RandomApply([T.ColorJitter(view.brightness, view.contrast, view.saturation, view.hue)], p=view.jitter_p),
        T.RandomGrayscale(view.grayscale_p),
        T.RandomApply([T.GaussianBlur(blur_kernel_size(size), view.blur_sigma)], p=view.blur_p),
        T.RandomSolarize(0.5, p=view.solarize_p),
    ])


def _both(view, images, size, seed=0):
    """(ours, torchvision per-sample) outputs in [0,1] for the same recipe."""
    ours = augment_view(images.float() / 255, view, size, _gen(seed))
    ref_t = _torchvision_view(view, size)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        ref = torch.stack([ref_t(img) for img in images.float() / 255])
    return ours, ref


def _assert_close_means(a, b, sigmas=4.0):
    """Means of two samples agree within ``sigmas`` standard errors."""
    se = math.sqrt(a.var().item() / len(a) + b.var().item() / len(b))
    assert abs(a.mean().item() - b.mean().item()) < sigmas * se + 1e-3, (a.mean(), b.mean(), se)


def test_statistics_match_torchvision_recipe():
    images = _synthetic(16).repeat(16, 1, 1, 1)  # 256 samples
    view = ViewRecipe(blur_p=0.5, solarize_p=0.2)
    ours, ref = _both(view, images, 32)
    _assert_close_means(ours.mean(dim=(1, 2, 3)), ref.mean(dim=(1, 2, 3)))  # brightness
    for c in range(3):
        _assert_close_means(ours[:, c].mean(dim=(1, 2)), ref[:, c].mean(dim=(1, 2)))
    _assert_close_means(ours.std(dim=(1, 2, 3)), ref.std(dim=(1, 2, 3)))  # contrast
    spread_ours, spread_ref = ours.mean(dim=(1, 2, 3)).std(), ref.mean(dim=(1, 2, 3)).std()
    assert abs(spread_ours - spread_ref) < 0.15 * spread_ref
    grey = lambda x: ((x[:, 0] - x[:, 1]).abs().amax(dim=(1, 2)) < 1e-6).float()
    _assert_close_means(grey(ours), grey(ref))


FULL_FRAME = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0)


def _mid_range(n, size=16):
    """Colourful images in [0.2, 0.65], so jitter factors up to 1.4 do not clip."""
    images = torch.zeros(n, 3, size, size)
    images[:, 0, :, size // 2 :] = 0.4  # red right half: a flip moves it left
    images += 0.2 + 0.25 * torch.rand(n, 3, 1, 1, generator=_gen(0))
    return (images * 255).round().to(torch.uint8)


def _grey(x):
    return (x[:, 0] - x[:, 1]).abs().amax(dim=(1, 2)) < 1e-6


def _changed(x, images):
    return (x - images.float() / 255).abs().amax(dim=(1, 2, 3)) > 1e-4


def _flipped(x):
    half = x.shape[-1] // 2
    return x[:, 0, :, :half].mean(dim=(1, 2)) > x[:, 0, :, half:].mean(dim=(1, 2))


@pytest.mark.parametrize("knob, p, event", [
    ("flip_p", 0.5, lambda x, _: _flipped(x)),
    ("grayscale_p", 0.3, lambda x, _: _grey(x)),
    ("solarize_p", 0.2, _changed),
    ("jitter_p", 0.8, _changed),
    ("blur_p", 0.4, _changed),
])
def test_per_sample_rates_match_torchvision(knob, p, event):
    images = _mid_range(300)
    ours, ref = _both(ViewRecipe(**{**FULL_FRAME, knob: p}), images, 16)
    bound = 4 * math.sqrt(p * (1 - p) / len(images))
    for out in (ours, ref):
        assert abs(event(out, images).float().mean().item() - p) < bound


def _factor(knob, out, images):
    """The per-sample jitter factor, recovered from the image."""
    x = images.float() / 255
    if knob == "brightness":
        return out.mean(dim=(1, 2, 3)) / x.mean(dim=(1, 2, 3))
    if knob == "contrast":
        return out.std(dim=(1, 2, 3)) / x.std(dim=(1, 2, 3))
    colourful = lambda y: (y.amax(1) - y.amin(1)).mean(dim=(1, 2))
    return colourful(out) / colourful(x)


@pytest.mark.parametrize("knob", ["brightness", "contrast", "saturation"])
def test_jitter_factor_distribution_matches_torchvision(knob):
    images = _mid_range(300)
    jitter = dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, jitter_p=1.0)
    view = ViewRecipe(**{**FULL_FRAME, **jitter, knob: 0.4})
    ours, ref = (_factor(knob, out, images) for out in _both(view, images, 16))
    expected_std = 0.8 / math.sqrt(12)  # U(0.6, 1.4)
    for factors in (ours, ref):
        assert abs(factors.mean().item() - 1.0) < 0.04
        assert abs(factors.std().item() - expected_std) < 0.03
    assert abs(ours.std().item() - ref.std().item()) < 0.04


def test_hue_shift_matches_torchvision():
    images = _mid_range(300)
    view = ViewRecipe(**{**FULL_FRAME, "jitter_p": 1.0, "brightness": 0.0, "contrast": 0.0, "saturation": 0.0})
    ours, ref = _both(view, images, 16)
    shift = lambda out: (out.mean(dim=(2, 3)) - images.float().mean(dim=(2, 3)) / 255).abs().sum(1)
    _assert_close_means(shift(ours), shift(ref))
    assert shift(ours).mean() > 0.02


def test_colour_jitter_applies_its_ops_in_each_samples_drawn_order():
    """Each sample's brightness, contrast, saturation and hue, in the order drawn for it, as torchvision's
    functional ops apply them one image at a time (saturation and hue do not commute)."""
    from slimssl.data.augment import _color_jitter

    view = ViewRecipe(brightness=0.4, contrast=0.4, saturation=0.8, hue=0.3)
    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.6 + 0.2
    draws = torch.Generator().manual_seed(3)  # the draws _color_jitter makes: factors, then the order
    u, order = torch.rand(16, 4, generator=draws), torch.rand(16, 4, generator=draws).argsort(1)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    spans = [(0.6, 1.4), (0.6, 1.4), (0.2, 1.8), (-0.3, 0.3)]
    expected = []
    for i in range(len(x)):
        y = x[i]
        for op in order[i].tolist():
            lo, hi = spans[op]
            y = ops[op](y, float(lo + (hi - lo) * u[i, op]))
        expected.append(y)
    ours = _color_jitter(x, view, torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, torch.stack(expected), atol=2e-3, rtol=0)


def test_blur_is_off_up_to_64_px_and_on_above():
    assert all(v.blur_p == 0 for v in recipe("byol", 64)) and recipe("byol", 65)[0].blur_p == 1.0
