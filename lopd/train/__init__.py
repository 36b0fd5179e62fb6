"""Training: the OPD/SFT losses (pure functions), DeepSpeed engine setup, packing, data, loops."""
