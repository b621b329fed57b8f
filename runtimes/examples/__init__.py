"""Documented python-kind models: copy one to start your own.

- scale.Scale: the smallest useful model (predict on a batch, an option, dynamic batching).
- streaming.WordStream: a streaming (decoupled) model whose generate() yields one
  response per word, served over ModelStreamInfer.
"""
