"""Gradient communication across workers: compression (DGC), gradient coding, federated learning glue."""
