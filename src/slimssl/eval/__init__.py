"""The evaluation protocols: kNN, the linear probe, fine-tuning, and the results they write.

The linear probe's defaults live here rather than in :mod:`.linear` so that the command line can show them
in ``--help`` without importing torch.
"""

DEFAULT_EPOCHS = 100
DEFAULT_LR = 0.1
DEFAULT_BATCH_SIZE = 256
DEFAULT_MOMENTUM = 0.9
DEFAULT_RECALIBRATE_BATCHES = 20  # used automatically when the supernet's BatchNorm is shared
TRAIN_CROPS = ("pad", "resized")  # fine-tuning's and the augmented probe's random crop (eval/linear.py)
