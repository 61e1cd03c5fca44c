"""Product data that ships in the wheel: the default calibration text of `llmc quantize`, with its
provenance and license in README.md. llmc.resources finds it."""
