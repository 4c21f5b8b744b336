"""Training: the objectives, the loop, the optimizer, online sampling, GAIL and logging."""
