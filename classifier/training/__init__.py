"""The training engine around Lightning's Trainer: callbacks, fault handling, tracking, logged hyperparameters and
lr_find."""
