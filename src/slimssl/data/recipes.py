"""The augmentation recipes of the methods' two views (``data.augment``), as one table: a recipe added here is
known to the config, the methods and the augmentation alike. Free of torch: the config schema reads it."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ViewRecipe:
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    interpolation: str = "bilinear"  # of the crop's resize: bilinear or bicubic (data.crop_interpolation)


# BYOL (and MoCo v3, which takes its views): asymmetric, view 1 always blurred, view 2 blurred 10% and solarized
# 20%, jitter (0.4, 0.4, 0.2, 0.1), 8-100% of the area. MoCo v2's aug_plus: symmetric, jitter (0.4, 0.4, 0.4,
# 0.1), blur 50%, 20-100% of the area.
_BYOL_VIEW = ViewRecipe(crop_scale=(0.08, 1.0))
_BYOL_VIEWS = (replace(_BYOL_VIEW, blur_p=1.0), replace(_BYOL_VIEW, blur_p=0.1, solarize_p=0.2))
_MOCOV2_VIEW = ViewRecipe(crop_scale=(0.2, 1.0), saturation=0.4, blur_p=0.5)
RECIPE_VIEWS: dict[str, tuple[ViewRecipe, ViewRecipe]] = {
    "byol": _BYOL_VIEWS,
    "mocov2": (_MOCOV2_VIEW, _MOCOV2_VIEW),
    "mocov3": _BYOL_VIEWS,
}
RECIPES = tuple(RECIPE_VIEWS)
# data.crop_scale when unset: the recipe's (both of its views crop alike)
RECIPE_CROP_SCALE = {name: views[0].crop_scale for name, views in RECIPE_VIEWS.items()}
