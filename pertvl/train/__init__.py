"""Training: pertvl's DeepSpeed engine and the infrastructure around it.

- launch.py     which rank this process is (torchrun, the deepspeed launcher, srun, or alone),
                process-group initialisation, device choice, DeepSpeed config loading
- optim.py      the paper's SGD and the warm-up + cosine schedule (counted in optimizer steps)
- checkpoint.py crash-safe DeepSpeed checkpoints (keep last K, atomic `latest`), RNG capture,
                exact resume
- signals.py    SIGTERM/SIGUSR1 -> a flag the training loop checks -> checkpoint and clean exit
- monitor.py    W&B (offline by default) + metrics.jsonl + console/progress bar, memory metrics

The order a training loop uses them in:

    env = launch.detect_dist_env(argv_local_rank=args.local_rank)
    device = launch.init_distributed(env)          # BEFORE deepspeed.initialize (see launch.py)
    ds_config = launch.load_ds_config(path, world_size=env.world_size)
    optimizer = optim.build_optimizer(model.parameters())
    scheduler = optim.build_scheduler(optimizer, warmup_steps, total_steps, min_lr_ratio)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=ds_config)
    state = checkpoint.resume(engine, run_dir, args.resume)   # None: nothing to resume, start fresh
    mon = monitor.Monitor(run_dir, config, ..., rank=env.rank,
                          resume_run_id=state and state["wandb_run_id"],
                          resume_step=state and state["global_step"])
    flag = signals.PreemptionFlag().install()
    ... after each optimizer step: mon.log(...); periodic checkpoint.save(...);
        if flag.agreed(device): checkpoint.save(...); mon.finish(); exit(signals.PREEMPTED_EXIT_CODE)

Nothing here is imported at package import time: `pertvl --help` must not import torch.
"""
