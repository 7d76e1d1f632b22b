"""Planning: every decision a run acts on, made once from the config and the world size,
before a process group exists or a weight is read (docs/architecture.md, "The plan").

Depends only on the layers below it (checkpoint files, model facts, LoRA matching,
config); everything that acts (the pipeline builder, the parallelizers, the engine, the
recipe) reads the plan and re-derives none of it.
"""
