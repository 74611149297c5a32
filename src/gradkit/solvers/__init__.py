"""Learned and classical solvers whose gradients train or flow through them."""
