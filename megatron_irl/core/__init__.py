"""The core layer: model building, checkpoints, distributed set-up, vocabulary padding."""
