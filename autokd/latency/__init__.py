"""Latency measured on the runtime that will run the student.

``meter`` (torch), ``onnx_export``/``quantize`` (ONNX files), ``retiming`` (the front, together);
``protocol`` and ``remote`` (the timing protocol, the latency server, its client and upload guard) import
neither torch nor timm, so a target device can run ``autokd latency-server`` without them. This file must
import nothing.
"""
