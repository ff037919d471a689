"""Deployment, offline half: serving export, backfill, embedding store, index builds, drift."""
