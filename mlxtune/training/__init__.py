"""The training loop as plain Python: config (the proto's TrainingConfig),
optimizer and schedule, the masked loss, the loop, and exact-resume state."""
