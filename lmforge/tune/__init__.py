"""Tune hyperparameters (`lmforge tune`): the LR range test (lr_range) and Optuna sweeps over the
pretraining config (sweep), each run through the one Trainer."""
