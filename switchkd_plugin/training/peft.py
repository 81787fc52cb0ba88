"""`peft_config=`: the student wrapped with PEFT adapters before the Trainer sees it, as TRL's
trainers do."""

from __future__ import annotations


def with_peft_student(args: tuple, kwargs: dict, peft_config) -> tuple[tuple, dict]:
    """The Trainer's arguments with the student (`model`, first positional or keyword) wrapped
    by `peft.get_peft_model(student, peft_config)`."""
    try:
        import peft
    except ImportError as error:
        raise ImportError(
            "peft_config= needs peft: pip install -e '.[peft]' (or pip install peft)"
        ) from error
    model = args[0] if args else kwargs.get("model")
    if model is None:
        raise ValueError("peft_config= needs the student model (model=) to wrap")
    if isinstance(model, str):  # TRL's trainers take a model id and load it themselves
        raise ValueError(
            f"peft_config= with model={model!r}: Switch-KD wraps the student before the Trainer "
            "sees it, so load the model first (e.g. with from_pretrained) and pass the object"
        )
    if isinstance(model, peft.PeftModel):
        raise ValueError(
            "the student is already a PeftModel: pass either the PeftModel or peft_config=, "
            "not both"
        )
    model = peft.get_peft_model(model, peft_config)
    training_args = args[1] if len(args) > 1 else kwargs.get("args")
    if getattr(training_args, "gradient_checkpointing", False):
        # Reentrant checkpointing back-propagates into a checkpointed block only when its input
        # requires grad. With frozen embeddings (LLM and vision patch embeddings alike) the
        # adapters inside would get no gradient: checkpoint non-reentrantly unless told
        # otherwise, and otherwise make the LLM's embeddings require grad, as TRL does.
        options = dict(training_args.gradient_checkpointing_kwargs or {})
        if options.setdefault("use_reentrant", False):
            model.enable_input_require_grads()
        training_args.gradient_checkpointing_kwargs = options
    if args:
        return (model, *args[1:]), kwargs
    return args, {**kwargs, "model": model}
