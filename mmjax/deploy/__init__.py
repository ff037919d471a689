"""Deployment, offline half: serving export, embedding store and backfill, index builds.

  export    a checkpoint's params export -> a serving export (jax.export StableHLO + params +
            tokenizer + preprocessing spec + model version)
  serving   loads a serving export with JAX and NumPy only (never mmjax.models)
  corpus    the corpora a backfill reads (demo scenes, manifests, ingested records, TFDS)
  backfill  corpus -> versioned, sharded, checksummed embedding store (resumable, incremental)
  store     the store format and its reader: `store.load(path, version)` -> ids, vectors, manifest
  index     ScaNN builds from a store, the promotion gate, `current` / `previous`, rollback
  serve     the HTTP embedding and search service (FastAPI; the `serve` extra): micro-batching,
            query cache, Prometheus metrics

See docs/deploy.md. Nothing here is imported by `import mmjax`.
"""
