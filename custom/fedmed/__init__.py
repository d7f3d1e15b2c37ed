"""fedmed: federated medical-imaging training on NVFlare.

Pure core (data, model, training, aggregation, store) with thin NVFlare adapters in ``fedmed.flare``.
"""

__version__ = "0.1.0"
