"""The study report: front points and test accuracy (``build``), rendered as HTML/PNG/CSV/Markdown (``render``)."""
