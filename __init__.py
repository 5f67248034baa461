"""kvrelay: disaggregated prefill/decode LLM serving.

The repository root is this package; its folders are the subpackages (see DESIGN.md, Layout):
``kvrelay.workers`` (one worker process), ``kvrelay.cluster`` (across processes),
``kvrelay.kernels`` (device ops), ``kvrelay.proto`` (wire contract), ``kvrelay.client`` (SDK).
"""

__version__ = "0.1.0"
