"""Deployment, offline half: serving export, embedding store and backfill, index builds.\n\nSee docs/deploy.md. `serving` (the loader) imports JAX, NumPy and the tokenizer only.\n"""
