"""Training: pertvl's DeepSpeed engine (engine.py) and what it runs on: ranks and DeepSpeed configs
(launch.py), the paper's SGD and schedule (optim.py), crash-safe checkpoints (checkpoint.py),
stop signals (signals.py), stall detection (watchdog.py), logging (monitor.py). Nothing is imported
at package import time: `pertvl --help` must not import torch.
"""
