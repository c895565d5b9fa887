"""Fine-tuning Fast3R: configs, training data, the training loop."""
