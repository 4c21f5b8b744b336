"""Training: the model, the objective, the loop, logging and checkpoints."""
