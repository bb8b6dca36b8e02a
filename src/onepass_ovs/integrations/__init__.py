"""Bridges to other runtimes and engines (ONNX Runtime, Ray Data); each needs its optional extra."""
