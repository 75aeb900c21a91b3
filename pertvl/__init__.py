"""pertvl: biomedical vision-language pretraining with multi-scale contrastive learning and
perturbed report discrimination.

The package reads in the order data flows:
ingest (pertvl.data.openi, pertvl.data.phantom) -> perturb (pertvl.data.perturb)
-> pack (pertvl.data.shards) -> stream (pertvl.data.stream) -> model (pertvl.model)
-> losses (pertvl.losses) -> engine (pertvl.train) -> export (pertvl.export)
-> evaluate (pertvl.infer, pertvl.evaluate). Imports point one way along that flow
(docs/ARCHITECTURE.md, "Layers"; tests/test_architecture.py).
"""

__version__ = "0.1.0"
