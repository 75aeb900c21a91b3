"""Downstream fine-tuning (paper §IV, Tables II and III): `pertvl finetune nli` (nli.py) and `pertvl
finetune chexpert` (chexpert.py), each with its data, labels, metrics, result and CLI handler, and the
shared fit loop (fit.py). Protocols, label policies and encoder sources: docs/FINETUNE.md.
"""
