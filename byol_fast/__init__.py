"""byol_fast: high-throughput BYOL pretraining (Grill et al. 2020) with DALI data loading."""

__version__ = "0.1.0"
