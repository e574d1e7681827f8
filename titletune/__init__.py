"""titletune: the code the pipeline's stages run, arranged by the model's lifecycle.

Shared base (every phase may import these; they import no phase):
    cli          errors for the user (UserError, run_main), a stage's command line, atomic outputs and plots
    params       params.yaml as typed, range-checked sections
    prompt       the prompt template and question rotation
    modeling     Unsloth model and tokenizer loading (owns the `import unsloth` order)
    splits       fixed samples of a split by a hash of uid
    launch       the torchrun relaunch for several GPUs (train, predict); rank helpers
    tracking     MLflow: the store, the training run (name, params, tags, stale runs), the registry
    testing      repo copies and fast params for tests and benchmarks (no stage imports it)

Phases (a phase imports the base and earlier phases, never a later one):
    data/        cleaning, corpus                          decompress, preprocess
    training/    sft, batching, attention, resuming,       train
                 early_stopping, loss_log, profiling
    generation/  engine, evaluation, metrics, predict      evaluate-base, evaluate, ask, predict
    export/      merge, gguf, serve                        export, gguf, make serve

The stage scripts in stages/ are thin commands over these modules, and dvc.yaml lists, for each
stage, exactly the modules it imports: editing one re-runs only the stages that use it.
Paths are relative to the repository root, the working directory DVC runs the stages in.
"""
