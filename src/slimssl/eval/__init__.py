"""The evaluation protocols: kNN, the linear probe, fine-tuning, and the results they write.

The defaults of the linear probe and of fine-tuning live here rather than in :mod:`.linear` and
:mod:`.finetune` so that the command line can show them in ``--help`` without importing torch.
"""

DEFAULT_EPOCHS = 100
DEFAULT_LR = 0.1
DEFAULT_BATCH_SIZE = 256
DEFAULT_MOMENTUM = 0.9
DEFAULT_RECALIBRATE_BATCHES = 20  # used automatically when the supernet's BatchNorm is shared
TRAIN_CROPS = ("pad", "resized", "whole")  # fine-tuning's and the augmented probe's random crop (eval/linear.py)
PROBE_LR_DROP = 0.1  # the linear probe's step schedule: the lr is multiplied by this at each milestone epoch

# fine-tuning (eval/finetune.py): the 1% recipe up to FEW_LABELS of the labels, the 10% recipe above
FINETUNE_EPOCHS_FEW_LABELS, FINETUNE_EPOCHS, FEW_LABELS = 60, 30, 0.05
FINETUNE_LR = 0.05  # at batch FINETUNE_BATCH_SIZE; scaled linearly with the actual batch
FINETUNE_BATCH_SIZE = 256
FINETUNE_MIN_STEPS = 100


def check_train_crop(train_crop: str | None, default_allowed: bool = True) -> None:
    """One of TRAIN_CROPS, or (``default_allowed``: the API's keyword) None for the config's ``eval.train_crop``."""
    if not (train_crop is None and default_allowed) and train_crop not in TRAIN_CROPS:
        from ..errors import UsageError

        raise UsageError(f"train_crop must be one of {', '.join(TRAIN_CROPS)}, got {train_crop!r}")


def probe_optimizer(milestones: tuple[int, ...] | None = None) -> str:
    """How the linear heads are trained, as results.json records it: a per-step cosine to 0, or the papers' step
    schedule (the lr times PROBE_LR_DROP from each of the ``milestones`` epochs on)."""
    schedule = "cosine"
    if milestones:
        epochs = [str(m) for m in milestones]
        listed = epochs[0] if len(epochs) == 1 else f"{', '.join(epochs[:-1])} and {epochs[-1]}"
        schedule = f"lr x{PROBE_LR_DROP:g} at epoch{'s' if len(epochs) > 1 else ''} {listed}"
    return f"sgd momentum {DEFAULT_MOMENTUM}, {schedule}, no weight decay"


PROBE_OPTIMIZER = probe_optimizer()  # the linear heads' optimiser by default; earlier results.json files hold it


def check_milestones(milestones, epochs: int) -> tuple[int, ...] | None:
    """The probe's step schedule as a tuple of ints: None, or epochs in increasing order, each > 0 and < ``epochs``
    (a drop at or past the end would change nothing)."""
    from collections.abc import Iterable
    from numbers import Integral

    from ..wording import named
    from ..errors import UsageError

    if milestones is None:
        return None
    if isinstance(milestones, (str, bytes, set, frozenset)) or not isinstance(milestones, Iterable):
        raise UsageError(f"milestones must be a list of epochs (ints), got {milestones!r}")
    values = list(milestones)
    ok = (values and all(isinstance(m, Integral) and not isinstance(m, bool) for m in values)
          and all(a < b for a, b in zip([0, *values], values)) and values[-1] < epochs)
    if not ok:
        raise UsageError(f"{named('--milestones', 'milestones')} must be epochs in increasing order, each > 0 and < "
                         f"{named('--epochs', 'epochs')} ({epochs}), got {values!r}")
    return tuple(int(m) for m in values)


def recalibration_batches(batches: int | None, private_bn: bool, num_images: int | None = None,
                          batch_size: int = 1) -> int:
    """How many train batches re-estimate each sub-network's BatchNorm statistics before it is evaluated;
    ``None`` means automatic: only when the supernet's BatchNorm is shared (private BatchNorm has them). Given
    the train split's ``num_images``, the batches of ``batch_size`` it holds at most (whole ones, or a smaller
    one): what recalibration reads. Results record the number asked (as they always have: comparable across
    versions), and recalibration says when it reads fewer."""
    n = (0 if private_bn else DEFAULT_RECALIBRATE_BATCHES) if batches is None else max(0, int(batches))
    return n if not n or num_images is None else max(1, min(n, num_images // batch_size))


def linear_settings(images: dict, *, epochs: int, recalibrate_bn: int, lr: float = DEFAULT_LR,
                    batch_size: int = DEFAULT_BATCH_SIZE, distill: bool = False, shared_head: bool = False,
                    augment: bool = False, train_crop: str | None = None, seed: int = 0,
                    teacher: str | None = None, raw_features: bool = False,
                    milestones: tuple[int, ...] | None = None) -> dict:
    """What a linear probe records in results.json next to its accuracies; ``images``: the protocol's image
    settings (``DataOptions.settings``); ``teacher``: the head the others were distilled from when it is not the
    full network's (recorded then only). Switchable heads start from the seed and their sub-network's name
    (``head_init``). ``slimssl reproduce`` compares these to find probes to run again."""
    return {**images, "epochs": epochs, "lr": lr, "batch_size": batch_size, "optimizer": probe_optimizer(milestones),
            "standardized_features": not raw_features, "distill": distill, "shared_head": shared_head,
            "augment": augment, "train_crop": train_crop if augment else None, "seed": seed,
            "recalibrate_bn": recalibrate_bn,
            **({} if shared_head else {"head_init": "per_subnet"}),
            **({"distill_teacher": teacher} if distill and teacher else {})}
