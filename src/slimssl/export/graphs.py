"""The graphs an export may add beside its weights: an ONNX graph (``model.onnx``, with the onnx extra) and a
torch.export program (``model.pt2``, torch alone), written with the export's config.json inside and run to
verify them."""

from __future__ import annotations

import json
import logging
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_write
from ..errors import ExportError
from ..layout import EXPORT_CONFIG
from ..models.plain import PlainResNet, PlainResNetConfig

ONNX = "model.onnx"
PROGRAM = "model.pt2"  # torch.export's archive: loads with torch alone
GRAPHS = {"onnx": ONNX, "pt2": PROGRAM}  # the formats that add a graph beside the weights, and its file

log = logging.getLogger("slimssl")


def require_onnx() -> None:
    """Fail with a hint when the onnx package is missing (torch's exporter needs it), before any file is
    written."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ExportError("ONNX export needs the onnx package: pip install 'onnx>=1.14' 'onnxruntime>=1.16' (the onnx "
                          "extra)") from None


def export_onnx(plain: PlainResNet, path: Path, resolution: int, config: dict) -> None:
    """The graph of ``plain`` at ``path``, carrying the config.json beside it as metadata (each entry's value as
    JSON text: a runtime without that file still knows the sub-network and its preprocessing)."""
    require_onnx()
    import onnx

    example = torch.zeros(1, 3, resolution, resolution)  # the tracing size; a ResNet takes any size
    torch.onnx.export(plain, (example,), str(path), input_names=["images"], output_names=["features"],
                      dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}, "features": {0: "batch"}},
                      dynamo=False)
    graph = onnx.load(str(path))
    onnx.helper.set_model_props(graph, {key: json.dumps(value) for key, value in config.items()})
    onnx.save(graph, str(path))


def smallest_program_input(config: PlainResNetConfig) -> int:
    """The smallest image side a torch.export program of ``config`` takes: one more than the network's total
    stride. torch.export compiles a size-1 feature map as a special case, so the program's sizes start where
    the last stage's map has at least 2 pixels a side."""
    stride = 2 ** (len(config.depths) - 1) * (4 if config.stem == "imagenet" else 1)  # the stem's conv and max-pool
    return stride + 1


def program_input(config: PlainResNetConfig, resolution: int) -> dict:
    """The image sides a torch.export program traced at ``resolution`` takes: any from ``min_size`` on, or,
    traced below that (its last feature map then has 1 pixel, a size torch.export compiles as a case of its
    own), ``resolution`` alone (``size``)."""
    least = smallest_program_input(config)
    return {"min_size": least} if resolution >= least else {"size": resolution}


def export_program(plain: PlainResNet, path: Path, resolution: int, config: dict) -> None:
    """The torch.export program of ``plain`` at ``path`` (batch, height and width dynamic, as ``config``'s
    ``pt2_input`` says), carrying that config.json as an extra file of the archive
    (``torch.export.load(path, extra_files=...)``)."""
    from torch.export import Dim, export, save

    sizes = config["pt2_input"]
    example = torch.zeros(2, 3, resolution, resolution, dtype=plain.conv1.weight.dtype)  # batch 1 is specialised
    dims = {0: Dim("batch")}
    if "min_size" in sizes:
        dims.update({2: Dim("height", min=sizes["min_size"]), 3: Dim("width", min=sizes["min_size"])})
    else:
        log.info("%s: the program takes %d-pixel images only (from %d pixels a side, it would take any size)",
                 path, resolution, smallest_program_input(plain.config))
    try:
        program = export(plain, (example,), dynamic_shapes=(dims,))
    except Exception:  # noqa: BLE001 - torch before 2.13 cannot keep a max-pool's size dynamic: trace it unfolded
        if "min_size" not in sizes or not isinstance(plain.maxpool, nn.MaxPool2d):
            raise
        pooled = plain.maxpool
        plain.maxpool = UnfoldedMaxPool(pooled)
        try:
            program = export(plain, (example,), dynamic_shapes=(dims,))
        finally:
            plain.maxpool = pooled
    with atomic_write(path) as file:  # a kill while saving leaves no half-written archive
        save(program, file, extra_files={EXPORT_CONFIG: json.dumps(config, indent=2)})


class UnfoldedMaxPool(nn.Module):
    """The ImageNet stem's 3x3 max-pool (stride 2, padding 1) as -inf padding, unfold and max: the same numbers,
    and an output size torch.export can keep dynamic in every torch. Before torch 2.13 the shape rule of
    max_pool2d rounds with a test of the remainder, which ties a program to images of one parity of size."""

    def __init__(self, pool: nn.MaxPool2d):
        super().__init__()
        if (pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode) != (3, 2, 1, 1, False):
            raise ValueError(f"expected the stem's MaxPool2d(3, 2, 1), got {pool}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.pad(x, (1, 1, 1, 1), value=float("-inf"))
        return x.unfold(2, 3, 2).unfold(3, 3, 2).amax(dim=(-2, -1))


def run_program(path: Path, x: torch.Tensor) -> torch.Tensor:
    """``x`` through the torch.export program at ``path``, in the program's dtype. Its module is in inference
    mode as exported (torch refuses ``.eval()`` on it).

    A program is loaded as torch loads it, which unpickles some of what an archive may hold (and, in the archive
    format of older torch releases such as 2.4, its whole state): load only programs you trust, such as those
    slimssl wrote. An archive whose index marks tensors as pickled, which slimssl's never are, is refused unread."""
    _refuse_pickled_entries(path)
    try:
        with warnings.catch_warnings():  # torch's loader warns of its own calls, which are not the user's to act on:
            warnings.filterwarnings("ignore", message=".*weights_only=False", category=FutureWarning)  # torch 2.4
            warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)  # 2.11
            program = torch.export.load(str(path))
    except Exception as e:  # torch raises several kinds for a file that is not its archive
        raise ExportError(f"{path} is not a readable torch.export program ({type(e).__name__}: {e}); re-export "
                          "it") from None
    dtype = next((v.dtype for v in program.state_dict.values() if v.is_floating_point()), torch.float32)
    return program.module()(x.to(dtype))


def _refuse_pickled_entries(path: Path) -> None:
    """Refuse a torch.export archive whose index of weights or constants marks an entry as pickled
    (``use_pickle``), or cannot be read (failing closed: torch would read an index this does not). A file that is
    no zip is left to torch.export.load, which says what it is."""
    trust = "slimssl's programs hold none: re-export it, or load it with torch.export.load if you trust its source"
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        return
    with archive:
        for name in archive.namelist():
            if not name.endswith(("_weights_config.json", "_constants_config.json")):
                continue
            try:
                entries = json.loads(archive.read(name))["config"]
                pickled = [key for key, entry in entries.items() if entry.get("use_pickle", False) is not False]
            except Exception as e:  # noqa: BLE001 - any index this cannot read is one it cannot vouch for
                raise ExportError(f"{path}: its index {name} cannot be read ({type(e).__name__}); {trust}") from None
            if pickled:
                raise ExportError(f"{path} holds pickled entries ({', '.join(map(str, pickled[:3]))}), which "
                                  f"loading would unpickle (that can run code); {trust}")


def run_onnx(path: Path, x: torch.Tensor) -> torch.Tensor:
    try:
        import onnxruntime
    except ImportError:
        from onnx.reference import ReferenceEvaluator

        (out,) = ReferenceEvaluator(str(path)).run(None, {"images": x.numpy()})
    else:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (out,) = session.run(None, {"images": x.numpy()})
    return torch.from_numpy(out)
