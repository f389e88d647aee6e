"""The latency server on a target device, its client and the guard on uploaded ONNX files (torch-free)."""
