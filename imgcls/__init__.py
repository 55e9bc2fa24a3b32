"""What train.py composes: data, models, the schedule, checkpoints, loggers, evaluate/predict.

Layers. Each module imports only modules of the layers below its own (never its own layer,
never one above), so the imports form no cycle; ``tests/test_layers.py`` reads every import
(top level and inside functions) and fails on a cycle or an upward import. train.py sits on top.

Import policy. The modules ``train.py`` imports at start-up (its top-level imports and theirs:
config, schema, schedule, device, exits, distributed, runlock, reporting, results, ...) import
torch, numpy, PIL, torchvision and matplotlib only inside the functions that use them, so
``train.py --help``, ``--cfg job`` and a refused command line answer without loading torch.
Every other module imports torch and the project's modules at the top; optional packages
(timm, wandb, mlflow, tensorboard, matplotlib, huggingface_hub) and torchvision are imported
where they are used, so a run that does not use them does not pay for them.
"""

# Bottom to top (tests/test_layers.py checks every import against this table).
LAYERS = (
    ("io", "schema", "splits", "models", "loss", "augment", "distributed"),  # no project imports
    (
        "runlock",
        "datastore",
        "device",
        "precision",
    ),  # the run directory's lock; dataset files, archives and the tensor cache
    ("exits", "step"),  # exit codes, one-line errors, the stop request; one optimizer step
    ("data", "loader", "averaging", "plot"),  # datasets; the device loader; EMA/SWA; pictures of runs
    ("schedule", "sweep"),  # schedule lengths, steps per epoch, scheduler stepping; the sweep summary
    ("config", "build"),  # composition, its messages, validation; what the config builds (seed ... scheduler)
    ("checkpoint", "loggers", "preview"),  # checkpoints and resume; metric trackers; the schedule preview
    ("evaluate", "reporting"),  # scoring a model or checkpoint; what a run prints and logs
    ("results", "predict", "lr_find"),  # the final test and results.json; predictions for new images
)
