"""Training: the loop (loop.py, `python -m fastlm.train`), the optimizers (optim.py), learning-rate
schedules (schedule.py), torchrun setup (distributed.py), run logs (logs.py) and the loss plot
(plot.py).
"""
