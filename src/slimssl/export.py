"""Export sub-networks as plain models: safetensors weights plus a JSON config (optionally ONNX)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import SlimsslError
from .models.plain import PlainResNet, PlainResNetConfig
from .models.resnet import SlimResNet
from .nn.spec import SubnetLike, SubnetSpec

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
ONNX = "model.onnx"
EXPORT_FORMAT = "slimssl-plain-resnet"


FORMATS = ("safetensors", "onnx")  # onnx also writes the safetensors weights


class ExportError(SlimsslError):
    """An exported model folder that cannot be loaded; says which file and why."""


def export_subnet(supernet: SlimResNet, subnet: SubnetLike | None, out_dir: str | Path,
                  fmt: str = "safetensors", resolution: int = 224, metadata: dict | None = None,
                  overwrite: bool = False) -> Path:
    """Write ``subnet`` of ``supernet`` to ``out_dir/<subnet name>/`` and return that folder.

    An export already there is replaced only when it came from the same ``metadata["source"]`` (exporting a
    run again) or with ``overwrite``; see :func:`check_export_folder`."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    spec = supernet.resolve(subnet)
    check_export_folder(out_dir, spec, (metadata or {}).get("source"), overwrite)
    plain = supernet.export(spec).eval()
    # the caller's metadata cannot replace the keys load_exported reads; checked before any folder is made
    info = {**(metadata or {}), "format": EXPORT_FORMAT, "subnet": spec.name, "architecture": plain.config.to_dict()}
    try:
        text = json.dumps(info, indent=2) + "\n"
    except (TypeError, ValueError) as e:
        raise ExportError(f"metadata must be JSON data (str, numbers, lists, dicts): {e}") from None
    folder = Path(out_dir) / spec.name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # the folder, or one on the way to it, is a file
        raise ExportError(f"cannot export into {folder}: it, or a folder on the way to it, is a file") from None
    (folder / CONFIG).write_text(text)
    save_file(plain.state_dict(), str(folder / WEIGHTS), metadata={"subnet": spec.name})
    if fmt == "onnx":
        _export_onnx(plain, folder / ONNX, resolution)
    return folder


def check_export_folder(out_dir: str | Path, spec: SubnetSpec, source: str | None, overwrite: bool = False) -> None:
    """Refuse to replace an export of ``spec`` in ``out_dir`` that came from another source (another run, or
    a random initialisation): it may be the only copy of a trained network. Exports without a source (the
    Python API without ``metadata``) replace each other, as ``torch.save`` would."""
    config = Path(out_dir) / spec.name / CONFIG
    if overwrite or not config.is_file():
        return
    try:
        earlier = json.loads(config.read_text()).get("source")
    except (ValueError, OSError, AttributeError):
        earlier = None
    if earlier != source:
        raise ExportError(f"{config.parent} already holds an export of {spec.name}"
                          + (f" from {earlier}" if earlier else "") + "; choose another output folder, or "
                          "replace it with overwrite=True (--overwrite)")


def _export_onnx(plain: PlainResNet, path: Path, resolution: int) -> None:
    try:
        import onnx  # noqa: F401  (the exporter needs it; fail with a hint instead of deep inside torch)
    except ImportError:
        raise ExportError("ONNX export needs the onnx package: pip install 'slimssl[onnx]'") from None
    example = torch.zeros(1, 3, resolution, resolution)
    torch.onnx.export(plain, (example,), str(path), input_names=["images"], output_names=["features"],
                      dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}}, dynamo=False)


def load_exported(folder: str | Path) -> PlainResNet:
    """Load an exported sub-network folder as a plain ResNet in eval mode."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"exported sub-network folder {folder} does not exist" if not folder.exists() else
                          f"{folder} is a file; expected an exported sub-network folder ({CONFIG} and {WEIGHTS})")
    config_path, weights_path = folder / CONFIG, folder / WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ExportError(f"{path} is missing; an exported sub-network folder holds {CONFIG} and {WEIGHTS}")
    try:
        info = json.loads(config_path.read_text())
        arch = PlainResNetConfig.from_dict(info["architecture"])
        model = PlainResNet(arch)
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise ExportError(f"{config_path} is not an exported slimssl config ({type(e).__name__}: {e})") from None
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ExportError(f"{weights_path} is not a readable safetensors file ({e}); re-export it") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ExportError(f"{weights_path} does not match the architecture in {config_path}: {e}") from None
    return model.eval()


@torch.no_grad()
def verify_export(supernet: SlimResNet, subnet: SubnetLike, exported: PlainResNet | str | Path,
                  resolution: int, batch: int = 2, seed: int = 0) -> float:
    """Max abs difference between the supernet's sub-network (eval mode, fp32) and the exported model: a
    plain model, or the path of an exported ``model.onnx`` (run with onnxruntime when it is installed, else
    with onnx's reference evaluator, slower)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, resolution, resolution, generator=gen)
    was_training = supernet.training
    supernet.eval()
    try:
        expected = supernet(x, subnet=subnet)
    finally:
        supernet.train(was_training)
    got = exported.eval()(x) if isinstance(exported, torch.nn.Module) else _run_onnx(Path(exported), x)
    if got.shape != expected.shape:
        raise ExportError(f"the export gives outputs of shape {list(got.shape)}, the sub-network "
                          f"{supernet.resolve(subnet).name} {list(expected.shape)}: it is another network")
    return (expected - got).abs().max().item()


def _run_onnx(path: Path, x: torch.Tensor) -> torch.Tensor:
    try:
        import onnxruntime
    except ImportError:
        from onnx.reference import ReferenceEvaluator

        (out,) = ReferenceEvaluator(str(path)).run(None, {"images": x.numpy()})
    else:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (out,) = session.run(None, {"images": x.numpy()})
    return torch.from_numpy(out)
