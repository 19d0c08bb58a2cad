"""The pipeline's stages: exactly the stages of dvc.yaml, one module each (`sempcyc <stage>` runs it).

Each is a leaf: it imports the shared modules of the package and the runtime, never another stage or command.
"""
