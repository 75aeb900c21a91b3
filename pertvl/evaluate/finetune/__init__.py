"""Downstream fine-tuning (paper §IV, Tables II and III): `pertvl finetune nli` (nli.py) and `pertvl
finetune chexpert` (chexpert.py), with the shared fit loop (fit.py), metrics, label sets and policies
(tasks.py) and the CLI handlers (commands.py). Protocols, label policies and encoder sources:
docs/FINETUNE.md.
"""
