"""Exporting a chosen student: safetensors, config, ONNX, TorchScript, INT8, with parity checks."""
