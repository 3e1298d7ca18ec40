"""Training: one loop (`Trainer`) shared by pretraining and fine-tuning."""
