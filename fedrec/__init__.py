"""fedrec: federated, privacy-preserving recommendation on Flower and Opacus.

The core library (this package) never imports flwr: data, models, the one training
loop, DP-SGD through Opacus, metrics and reports. ``server/`` and ``client/`` adapt it
to Flower.
"""

__version__ = "0.1.0"
