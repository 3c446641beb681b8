"""mhc: Manifold-Constrained Hyper-Connections for PyTorch."""
