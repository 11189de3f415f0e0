"""Sub-networks taken out as plain models, which run without the supernet.

``files.py`` writes, loads and verifies one export (safetensors weights and a config.json), ``graphs.py`` the ONNX
graph or torch.export program that may sit beside them, ``run.py`` decides what ``slimssl export`` takes out of a
run, ``imported.py`` saves a ResNet trained elsewhere as an export, and ``command.py`` holds ``slimssl export`` and
``slimssl import-backbone``. This file imports nothing, so that ``--help`` can list the formats without
torch; the public functions are ``slimssl.export_subnet``, ``load_exported``, ``save_exported``, ``verify_export``,
``export_run`` and ``import_backbone``.
"""

FORMATS = ("safetensors", "onnx", "pt2")  # the weights alone, or with an ONNX graph or a torch.export program
