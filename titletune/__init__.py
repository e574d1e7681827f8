"""titletune: the code the pipeline's stages run, one module per concern.

    cli        errors for the user (UserError, run_main), atomic output files
    params     params.yaml as typed, range-checked sections
    prompt     the prompt template and question rotation
    modeling   Unsloth model and tokenizer loading (owns the `import unsloth` order)
    tracking   MLflow: the store, the training run and its tags
    cleaning   the text cleaning rules and filters of preprocess
    corpus     parsing, hashing, splitting and writing the corpus (preprocess)
    training   SFTConfig, LoRA, resume, throughput and the step log (train)
    launch     data-parallel relaunch under torchrun (train)
    generation batched generation and scoring passes (evaluate, ask)
    metrics    ROUGE-L, BLEU, chrF, perplexity, degenerate answers (evaluate)

The stage scripts in stages/ are thin commands over these modules, and dvc.yaml lists, for each
stage, exactly the modules it imports: editing one re-runs only the stages that use it.
Paths are relative to the repository root, the working directory DVC runs the stages in.
"""
