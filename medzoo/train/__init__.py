"""Training: tuning methods (methods.py), packing and batching (batching.py), optimizers and schedules
(optim.py), the training loop with checkpoints and resume (loop.py), multi-process launch (launch.py) and
the run as a whole, from resolved settings to a registered model folder (run.py).

Importing this package is cheap; torch, transformers and peft are imported inside the functions that use them.
"""
