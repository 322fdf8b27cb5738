"""Evaluation: ``opefo eval``, validation during training, and ``opefo compare``.

    metrics     pass@k, avg@K (+ bootstrap interval), maj@K: pure numpy
    tasks       problem sets: env held-out sets, data files, the math6 suite
    codec       prompt text <-> token ids for the engines (the model directory's tokenizer)
    runner      one problem set through an EngineFleet, scored by the env's verifier
    report      the JSON / JSONL files and the table on stdout
    validation  evaluation inside training (GRPO.training_step), on the training fleet
    compare     curves and first/last values of several runs from their TensorBoard files

What to evaluate (``EvalSpec``, the ``eval_tasks`` entries of a config) is config:
``opefo_rllib.config.eval_spec``. Importing the package imports none of the modules above.
"""
