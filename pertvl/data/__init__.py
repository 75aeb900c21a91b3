"""Data: ingestion (Open-I, phantom), the one text rule, perturbations, shards, streaming."""
