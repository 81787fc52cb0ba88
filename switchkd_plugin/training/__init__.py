"""The Trainer around the objective: the hooks of `SwitchKDTrainer`, teacher loading, resume,
the non-finite guard, loss scaling, the settings dataclass `SwitchKDConfig`."""
