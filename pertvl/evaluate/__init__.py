"""Evaluation of pretrained encoders through a small encoder interface (pertvl.evaluate.encoder), on
onnxruntime or torch. Import the submodules directly; this package imports nothing heavy."""
