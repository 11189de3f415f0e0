"""``slimssl reproduce``: the papers' central claim at CIFAR scale, measured end to end.

For every recipe, (a) the slimmable run pretrains the whole menu at once, and (b) every menu entry is
pretrained alone with the same method, data, epochs and batch (``standalone_config``). Every network is
then evaluated by kNN and by the linear probe. The report compares each width with its one-by-one
counterpart, and the pretraining time of (a) with the sum of (b).

Each job is an ordinary run directory (``OUT/<recipe>/slim``, ``OUT/<recipe>/alone-<subnet>``), so the
usual commands (``slimssl report``, ``knn``, ``linear``, ``pretrain --resume``) work on it. The command
resumes: a call pretrains one epoch at a time and stops starting new work once ``--time-budget`` seconds
have passed. It then exits with :data:`EXIT_CONTINUE`, and the same command continues where it stopped.
Pretraining seconds (training steps only, with CUDA synchronised before the clock is read) add up across
calls in ``timing.json`` in each run directory.

The package's modules: :mod:`.plan` (the jobs of a reproduction and their configs), :mod:`.run`
(pretraining and probing them within a call's budget, with their times), :mod:`.report` (the comparison,
the goals and ``reproduction.md``) and :mod:`.command` (the command line). This module holds only what the
command line needs without importing torch.
"""

EXIT_CONTINUE = 4  # documented: the time budget ran out with work left; run the same command again
DEFAULT_RECIPES = ("cifar10_r18_dspnet_byol", "cifar10_r18_slimclr_mocov2")
DEFAULT_EPOCHS = 50
DEFAULT_PROBE_EPOCHS = 100
REPORT_MD = "reproduction.md"
# REPORT_MD's first line: a reproduction.md that starts otherwise is not a reproduction's
REPORT_HEADING = "# Reproduction: slimmable pretraining against networks pretrained one by one"
REPORT_JSON = "reproduction.json"
