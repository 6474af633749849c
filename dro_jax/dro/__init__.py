"""Training soft prompts: the DRO loss (`loss`), its training data (`training_set`), the optax loop with
orbax checkpoints (`train`, `checkpoints`), soft-prompt files and initialisation (`soft_prompt`), and the
vanilla prompt-tuning baseline (`prompt_tuning`)."""
