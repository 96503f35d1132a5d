"""Publishing trained runs as Hugging Face Hub model repositories (``hub/publish.py``), and the record of
published weights that ``pretrained=True`` reads (``timm_svb/models/published.json``).

- :mod:`~timm_svb.hub.publish`: build, check, push, record;
- :mod:`~timm_svb.hub.card`: the model card;
- :mod:`~timm_svb.hub.record`: reading and writing the record, the weights shipped in the package.
"""
