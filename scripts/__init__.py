"""The command-line entry points, installed as `vlm_vision.commands`: each module has `main(argv=None)`, run by the
`vlm-vision` console script (`vlm_vision.cli`) or as `python scripts/<name>.py` in a checkout."""
