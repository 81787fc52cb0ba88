"""The Trainer around the objective: the hooks of `SwitchKDTrainer` (trainer), its set-up
(setup, teacher, checks, peft), ZeRO-3 and rank agreement (distributed), per-term logs
(metrics), the non-finite guard (nonfinite), loss scaling (loss_scale), resume, the
release-dependent switches (compat) and the settings dataclass `SwitchKDConfig`
(training_config)."""
