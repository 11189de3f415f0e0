"""``slimssl bench``: throughput of the data path, the slimmable step and the one-by-one baseline.

All three run on synthetic images of the config's resolution (``data.source=fake``) by default, so the
numbers measure the compute path, not the disk; ``--data`` measures on real files with the recipe's loader.
The baseline trains each menu entry as its own dense network (a supernet whose full width *is* that entry)
at the same batch, one after the other, which is what pretraining the networks one by one costs per step.

:mod:`.measure` times the steps; :mod:`.command` is the command line, which imports torch only when it runs.
"""
