"""Evaluation of pretrained encoders: structure (Table IV), retrieval, zero-shot, text-structure, reports.

Everything here talks to a model through the small `Encoder` protocol (pertvl.evaluate.encoder),
so the same code runs on onnxruntime (pertvl.infer.Embedder) and torch (torch_encoder.TorchEncoder).
Import the submodules directly; this package imports nothing heavy.
"""
