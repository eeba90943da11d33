"""The builders of the demo's committed assets (``lora/demo/assets``): run
``python -m tools.demo_assets.build`` from the repository root (see :mod:`tools.demo_assets.build`).

Not installed with the package: the assets are committed, so nothing at run time builds them.
"""
