"""Mesh, logical axis rules and shardings."""
