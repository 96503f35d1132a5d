"""The publishing command line (``python -m hub.publish`` from a checkout); its work is in
:mod:`timm_svb.hub`. Not installed: only ``timm_svb`` is. ``releases/`` holds the checked repository
folders of the weights that ship in the package."""
